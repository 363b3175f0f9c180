"""Pre-train soho.

The ``soho-pretrain`` command as a script (the code is in soho/cli/pretrain.py).
"""
import sys

from soho.cli.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
