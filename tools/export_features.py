"""Export a checkpoint's image, text, fused and ITC features to disk.

The ``soho-export-features`` command as a script (the code is in soho/cli/export_features.py).
"""
import sys

from soho.cli.export_features import main

if __name__ == "__main__":
    sys.exit(main())
