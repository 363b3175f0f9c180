"""Evaluate a soho checkpoint (a ``save_pretrained`` directory) on one split.

Zero-shot image-text retrieval with a pre-trained checkpoint (or a retrieval fine-tuned
one), with any of the three protocols (``itm_all``, ``itc``, ``itc_itm``):

    python tools/evaluate.py retrieval --checkpoint runs/synthetic/pretrained \\
        --shards data/synthetic/retrieval_test --protocols itc itc_itm --k 16

A fine-tuned NLVR2, visual entailment or VQA model, on one or several processes:

    accelerate launch tools/evaluate.py vqa --checkpoint runs/finetune/vqa_synthetic/model \\
        --shards data/synthetic/vqa_test

Writes ``results.json`` (metrics with chance levels, cost, skipped samples, arguments) and
``predictions.jsonl`` to --output.

VQA v2 test-dev / test, whose answers are withheld, for the official evaluation server:

    accelerate launch tools/evaluate.py vqa --predict-only --checkpoint runs/finetune/vqa_v2/model \\
        --shards data/vqav2/vqa_test_dev --output runs/evaluate/vqa_test_dev

also writes ``submission.json`` (``[{"question_id": int, "answer": str}, ...]``, the file to upload)
and reports no accuracy.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from soho.cli import report
from soho.config import ConfigError
from soho.errors import SohoError
from soho.tasks import TASKS, Task
from soho.tasks.base import check_shards, import_modules


def evaluate(args) -> dict:
    accelerator = Accelerator(cpu=args.device == "cpu" or not torch.cuda.is_available())
    output = Path(args.output)
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
    results = TASKS[args.task].evaluate_checkpoint(args, accelerator, output)
    if accelerator.is_main_process:
        results = {"task": args.task, "checkpoint": str(args.checkpoint), "shards": args.shards, **results,
                   "arguments": vars(args)}
        (output / "results.json").write_text(json.dumps(results, indent=2))
    accelerator.wait_for_everyone()
    return results if accelerator.is_main_process else {}


def main(argv=None) -> int:
    # Tasks defined outside soho register when their module is imported, before the parser lists the tasks.
    preparser = argparse.ArgumentParser(add_help=False)
    preparser.add_argument("--import", dest="imports", action="append", default=[])
    imports = preparser.parse_known_args(argv)[0].imports
    try:
        import_modules(imports)
    except ConfigError as error:
        preparser.error(str(error))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import MODULE first: where a task defined outside soho registers (repeatable)")
    tasks = parser.add_subparsers(dest="task", required=True)
    for name, task in TASKS.items():
        if task.evaluate_checkpoint.__func__ is Task.evaluate_checkpoint.__func__:
            continue  # no evaluation of a saved model on one split (pre-training)
        sub = tasks.add_parser(name, help=f"{name} evaluation")
        sub.add_argument("--checkpoint", required=True, help="a save_pretrained directory (with its processor)")
        sub.add_argument("--shards", default=f"data/synthetic/{name}_test")
        sub.add_argument("--batch-size", type=int, default=64, help="examples (images, captions) per batch")
        sub.add_argument("--device", default=None, help="cpu to stay off an available GPU")
        sub.add_argument("--output", default=f"runs/evaluate/{name}")
        task.add_evaluate_arguments(sub)
    args = parser.parse_args(argv)
    if not Path(args.checkpoint).is_dir():
        parser.exit(2, f"{parser.prog}: error: --checkpoint {args.checkpoint}: no such directory\n")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        check_shards("--shards", args.shards)
        results = evaluate(args)
    except SohoError as error:
        return report(parser.prog, error)
    if results:
        print(json.dumps(results.get("submission", results["metrics"]), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
