"""Convert VQA v2 to soho shards.

The ``soho-convert-vqa`` command as a script (the code is in soho/cli/convert_vqa.py).
"""
import sys

from soho.cli.convert_vqa import main

if __name__ == "__main__":
    sys.exit(main())
