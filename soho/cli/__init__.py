"""Command-line entry points, one module per console script (``soho-pretrain`` is ``soho.cli.pretrain:main``).

tools/ and data_scripts/ in a checkout run the same functions as scripts, for ``accelerate launch``.
"""
from __future__ import annotations

import sys

from soho.errors import Interrupted, SohoError


def report(prog: str, error: SohoError) -> int:
    """A run's expected end (soho/errors.py) as one line on stderr; returns its exit code."""
    print(f"{prog}: {'stopped' if isinstance(error, Interrupted) else 'error'}: {error}", file=sys.stderr)
    return error.exit_code
