"""Fine-tune a soho checkpoint on retrieval, NLVR2, visual entailment or VQA, then evaluate it:

    accelerate launch tools/finetune.py --config configs/finetune/ve_synthetic.yaml
    accelerate launch tools/finetune.py --config configs/finetune/vqa_synthetic.yaml init.from_scratch=true \\
        train.output_dir=runs/finetune/vqa_scratch

Writes results.json, predictions_<split>.jsonl, metrics.jsonl and the fine-tuned model/
to train.output_dir.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from soho.config import ConfigError, load_config
from soho.train.config import FinetuneConfig
from soho.train.finetune import finetune


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/finetune/ve_synthetic.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100 init.from_scratch=1")
    args = parser.parse_args(argv)
    try:
        config = load_config(FinetuneConfig, args.config, args.overrides)
    except ConfigError as error:
        parser.error(str(error))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        results = finetune(config)
    except ConfigError as error:  # raised while setting up (e.g. data.answer_vocabulary), before any step
        parser.error(str(error))
    print(json.dumps({"task": results["task"], "steps": results["steps"],
                      **{name: split["metrics"] for name, split in results["splits"].items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
