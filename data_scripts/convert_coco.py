"""Convert COCO captions in Karpathy's splits to soho shards.

The ``soho-convert-coco`` command as a script (the code is in soho/cli/convert_coco.py).
"""
import sys

from soho.cli.convert_coco import main

if __name__ == "__main__":
    sys.exit(main())
