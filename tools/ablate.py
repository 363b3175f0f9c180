"""Pre-train and score every variant of an ablation sweep.

The ``soho-ablate`` command as a script (the code is in soho/cli/ablate.py).
"""
import sys

from soho.cli.ablate import main

if __name__ == "__main__":
    sys.exit(main())
