"""Pre-train soho. Runs the embedded synthetic default when given no arguments:

    accelerate launch tools/pretrain.py
    accelerate launch tools/pretrain.py --config configs/pretrain/coco_vg_r101.yaml train.batch_size=16
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from soho.cli.train import run

DEFAULT_CONFIG = Path("configs", "pretrain", "synthetic.yaml")
"""Relative to the working directory, as the data/ and runs/ paths inside it are: the root of a soho checkout."""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
    parser.add_argument("--resume", default=None, help="'auto' or a checkpoint directory (same as train.resume=...)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100 optim.rest.lr=3e-4")
    args = parser.parse_args(argv)
    if args.config == str(DEFAULT_CONFIG) and not DEFAULT_CONFIG.is_file():
        parser.error(f"no {DEFAULT_CONFIG} in {Path.cwd()}: run from the root of a soho checkout or pass --config")
    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    return run(parser, args.config, overrides, default_task="pretraining")


if __name__ == "__main__":
    sys.exit(main())
