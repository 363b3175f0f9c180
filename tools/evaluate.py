"""Evaluate a soho checkpoint on one split.

The ``soho-evaluate`` command as a script (the code is in soho/cli/evaluate.py).
"""
import sys

from soho.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
