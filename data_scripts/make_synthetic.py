"""Generate the synthetic shapes world.

The ``soho-make-synthetic`` command as a script (the code is in soho/cli/make_synthetic.py).
"""
import sys

from soho.cli.make_synthetic import main

if __name__ == "__main__":
    sys.exit(main())
