"""Pre-train soho. Runs the embedded synthetic default when given no arguments:

    accelerate launch tools/pretrain.py
    accelerate launch tools/pretrain.py --config configs/pretrain/coco_vg_r101.yaml train.batch_size=16
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from soho.config import ConfigError  # noqa: E402
from soho.tasks import load_run_config  # noqa: E402
from soho.train.trainer import train  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "synthetic.yaml"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
    parser.add_argument("--resume", default=None, help="'auto' or a checkpoint directory (same as train.resume=...)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100 optim.rest.lr=3e-4")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    try:
        config = load_run_config(args.config, overrides, default_task="pretraining")
    except ConfigError as error:
        parser.error(str(error))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        results = train(config)
    except ConfigError as error:  # raised while setting up (tokenizer, checkpoint), before any step
        parser.error(str(error))
    print(json.dumps({"task": results["task"], "steps": results["steps"],
                      **{name: split["metrics"] for name, split in results["splits"].items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
