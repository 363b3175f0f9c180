"""Plot a run's training curves: losses and accuracies over the steps, with chance levels, as PNG.

    python tools/plot_metrics.py runs/synthetic
    python tools/plot_metrics.py runs/finetune/vqa_synthetic/metrics.jsonl --out figures/vqa

Reads ``metrics.jsonl`` (a run directory or the file) and writes ``losses.png`` and ``accuracy.png``
(default: ``curves/`` beside the file). Needs matplotlib: ``pip install -e ".[analysis]"``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run directory holding metrics.jsonl, or the metrics file itself")
    parser.add_argument("--out", default=None, help="where the PNG files go (default: curves/ beside metrics.jsonl)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    metrics = Path(args.run)
    if metrics.is_dir():
        metrics = metrics / "metrics.jsonl"
    try:
        # Imported here so that --help, and the message naming the missing extra, need no matplotlib.
        from soho.analysis.curves import plot_metrics

        written = plot_metrics(metrics, args.out or metrics.parent / "curves")
    except (ModuleNotFoundError, OSError, ValueError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
