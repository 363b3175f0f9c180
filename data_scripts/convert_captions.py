"""Convert your own images and captions (CSV, TSV, JSON lines, JSON) to soho shards.

The ``soho-convert-captions`` command as a script (the code is in soho/cli/convert_captions.py).
"""
import sys

from soho.cli.convert_captions import main

if __name__ == "__main__":
    sys.exit(main())
