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
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from soho.data.tasks import CLASSIFICATION_TASKS
from soho.eval.retrieval import PROTOCOLS
from soho.eval.tasks import SplitEvaluation, evaluate_classification, evaluate_retrieval, write_jsonl
from soho.eval.vqa import AnswerVocabulary, submission
from soho.models.soho import SohoForPretraining
from soho.models.tasks import TASK_MODELS
from soho.processing import SohoProcessor


def write_submission(path: Path, result: SplitEvaluation) -> dict:
    """The VQA evaluation server's results file of an unlabelled split; returns what results.json says of it."""
    entries = submission({p["id"]: p["prediction"] for p in result.predictions})
    path.write_text(json.dumps(entries))
    if result.skipped:
        # The server rejects a results file that does not answer every question of the split.
        logging.warning("%d questions were skipped and are missing from %s", sum(result.skipped.values()), path)
    return {"path": str(path), "questions": len(entries)}


def evaluate(args) -> dict:
    accelerator = Accelerator(cpu=args.device == "cpu" or not torch.cuda.is_available())
    processor = SohoProcessor.from_pretrained(args.checkpoint)
    start = time.perf_counter()
    if args.task == "retrieval":
        model = SohoForPretraining.from_pretrained(args.checkpoint).to(accelerator.device).eval()
        result = evaluate_retrieval(model, args.shards, processor, args.protocols, args.k, args.itc_weight,
                                    args.batch_size, args.fusion_batch_size, args.max_images,
                                    args.mixed_precision, accelerator)
    else:
        model = TASK_MODELS[args.task].from_pretrained(args.checkpoint).to(accelerator.device).eval()
        vocabulary = AnswerVocabulary(model.config.labels) if args.task == "vqa" else None
        result = evaluate_classification(model, args.task, args.shards, processor, args.batch_size, accelerator,
                                         vocabulary, labelled=not args.predict_only)
    results = {}
    if accelerator.is_main_process:
        results = {"task": args.task, "checkpoint": str(args.checkpoint), "shards": args.shards,
                   "metrics": result.metrics, "skipped": result.skipped,
                   "cost": {**result.cost, "seconds": time.perf_counter() - start,
                            "processes": accelerator.num_processes},
                   "arguments": vars(args)}
        output = Path(args.output)
        output.mkdir(parents=True, exist_ok=True)
        if args.predict_only:
            results["submission"] = write_submission(output / "submission.json", result)
        write_jsonl(output / "predictions.jsonl", result.predictions)
        (output / "results.json").write_text(json.dumps(results, indent=2))
    accelerator.wait_for_everyone()
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(predict_only=False)
    tasks = parser.add_subparsers(dest="task", required=True)
    for task in ("retrieval",) + CLASSIFICATION_TASKS:
        sub = tasks.add_parser(task, help=f"{task} evaluation")
        sub.add_argument("--checkpoint", required=True, help="a save_pretrained directory (with its processor)")
        sub.add_argument("--shards", default=f"data/synthetic/{task}_test")
        sub.add_argument("--batch-size", type=int, default=64, help="examples (images, captions) per batch")
        sub.add_argument("--device", default=None, help="cpu to stay off an available GPU")
        sub.add_argument("--output", default=f"runs/evaluate/{task}")
        if task == "retrieval":
            sub.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=["itc", "itc_itm"])
            sub.add_argument("--k", type=int, default=16, help="itc_itm shortlist size (default: %(default)s)")
            sub.add_argument("--itc-weight", type=float, default=0.0,
                             help="add this multiple of the ITC cosine to the ITM margin in itc_itm")
            sub.add_argument("--max-images", type=int, default=None, help="evaluate on the first N images only")
            sub.add_argument("--fusion-batch-size", type=int, default=512, help="pairs per fusion pass")
            sub.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no",
                             help="autocast the fusion passes (bf16: ~2.5x faster fusion on a CPU "
                                  "with AVX-512 BF16; scores stay float32)")
        if task == "vqa":
            sub.add_argument("--predict-only", action="store_true",
                             help="for splits whose answers are withheld (VQA v2 test-dev, test): predict every "
                                  "question, with or without answers, and write <output>/submission.json, "
                                  '[{"question_id": int, "answer": str}, ...] for the official evaluation server '
                                  "(question ids must be integers); no accuracy. Without it, questions without "
                                  "answers are skipped as bad_record")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    results = evaluate(args)
    if results:
        print(json.dumps(results.get("submission", results["metrics"]), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
