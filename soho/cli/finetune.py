"""Fine-tune a soho checkpoint on any registered task (retrieval, NLVR2, visual entailment, VQA, ...), then
evaluate it:

    accelerate launch tools/finetune.py --config configs/finetune/ve_synthetic.yaml
    accelerate launch tools/finetune.py --config configs/finetune/vqa_synthetic.yaml init.from_scratch=true \\
        train.output_dir=runs/finetune/vqa_scratch

Writes results.json, predictions_<split>.jsonl, metrics.jsonl and the fine-tuned model/
to train.output_dir.
"""
from __future__ import annotations

import argparse
import sys

from soho.cli.train import run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/finetune/ve_synthetic.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100 init.from_scratch=1")
    args = parser.parse_args(argv)
    return run(parser, args.config, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
