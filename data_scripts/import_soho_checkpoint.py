"""Import a checkpoint of the original SOHO release as a soho checkpoint.

The ``soho-import-soho-checkpoint`` command as a script (the code is in soho/cli/import_soho_checkpoint.py).
"""
import sys

from soho.cli.import_soho_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
