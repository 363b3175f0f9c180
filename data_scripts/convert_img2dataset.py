"""Convert an img2dataset download (CC3M, SBU, ...) to soho shards.

The ``soho-convert-img2dataset`` command as a script (the code is in soho/cli/convert_img2dataset.py).
"""
import sys

from soho.cli.convert_img2dataset import main

if __name__ == "__main__":
    sys.exit(main())
