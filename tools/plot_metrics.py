"""Plot a run's training curves (metrics.jsonl) to PNG.

The ``soho-plot-metrics`` command as a script (the code is in soho/cli/plot_metrics.py).
"""
import sys

from soho.cli.plot_metrics import main

if __name__ == "__main__":
    sys.exit(main())
