"""VALUE probes of a checkpoint.

The ``soho-analyze`` command as a script (the code is in soho/cli/analyze.py).
"""
import sys

from soho.cli.analyze import main

if __name__ == "__main__":
    sys.exit(main())
