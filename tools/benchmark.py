"""Measure model size and training, data and retrieval speed.

The ``soho-benchmark`` command as a script (the code is in soho/cli/benchmark.py).
"""
import sys

from soho.cli.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
