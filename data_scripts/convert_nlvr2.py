"""Convert NLVR2 to soho shards.

The ``soho-convert-nlvr2`` command as a script (the code is in soho/cli/convert_nlvr2.py).
"""
import sys

from soho.cli.convert_nlvr2 import main

if __name__ == "__main__":
    sys.exit(main())
