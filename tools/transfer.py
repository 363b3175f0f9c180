"""Fine-tune every task of a transfer study from each start, with several seeds, and tabulate the gains.

The ``soho-transfer`` command as a script (the code is in soho/cli/transfer.py).
"""
import sys

from soho.cli.transfer import main

if __name__ == "__main__":
    sys.exit(main())
