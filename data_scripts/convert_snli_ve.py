"""Convert SNLI-VE to soho shards.

The ``soho-convert-snli-ve`` command as a script (the code is in soho/cli/convert_snli_ve.py).
"""
import sys

from soho.cli.convert_snli_ve import main

if __name__ == "__main__":
    sys.exit(main())
