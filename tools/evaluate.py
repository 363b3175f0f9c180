"""Evaluate a soho checkpoint (a ``save_pretrained`` directory) without fine-tuning.

Zero-shot image-text retrieval on a split of image-caption shards, with any of the
three protocols (``itm_all``, ``itc``, ``itc_itm``):

    python tools/evaluate.py retrieval --checkpoint runs/synthetic/pretrained \\
        --shards data/synthetic/retrieval_test --protocols itc itc_itm --k 16

Writes ``results.json`` (metrics per protocol, chance levels, cost, arguments) and
``predictions.jsonl`` (the top-ranked images of every caption, per protocol) to --output.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from soho.data.retrieval import read_retrieval_split  # noqa: E402
from soho.eval.retrieval import PROTOCOLS, chance_recall, encode_gallery, retrieve  # noqa: E402
from soho.models.soho import SohoForPretraining  # noqa: E402
from soho.processing import SohoProcessor  # noqa: E402


def evaluate_retrieval(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = SohoForPretraining.from_pretrained(args.checkpoint).to(device).eval()
    processor = SohoProcessor.from_pretrained(args.checkpoint)
    split = read_retrieval_split(args.shards, processor, args.batch_size, args.max_images)
    captions_per_image = torch.bincount(split.text_image, minlength=len(split.image_ids)).tolist()
    gallery = encode_gallery(model, split.image_batches, split.text_batches, split.text_image)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    results = {"task": "retrieval", "checkpoint": str(args.checkpoint), "shards": args.shards,
               "images": len(split.image_ids), "texts": len(split.captions), "skipped": split.skipped,
               "chance": chance_recall(len(split.image_ids), captions_per_image), "protocols": {},
               "arguments": vars(args)}
    with (output / "predictions.jsonl").open("w") as predictions:
        for protocol in args.protocols:
            result = retrieve(model, gallery, protocol, k=args.k, itc_weight=args.itc_weight,
                              batch_size=args.fusion_batch_size)
            results["protocols"][protocol] = {"metrics": result.metrics, "cost": result.cost}
            logging.info("%s: %s (%.1f s, %d fusion passes)", protocol,
                         " ".join(f"{k}={v:.2f}" for k, v in result.metrics.items()),
                         result.cost["total_seconds"], result.cost["fusion_passes"])
            top = result.text_to_image.topk(min(10, len(split.image_ids)), dim=1)
            for text, (scores, images) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
                ranked = [split.image_ids[i] for i, s in zip(images, scores) if s != float("-inf")]
                predictions.write(json.dumps({"protocol": protocol, "caption": split.captions[text],
                                              "image_id": split.image_ids[split.text_image[text]],
                                              "top_images": ranked}) + "\n")
    (output / "results.json").write_text(json.dumps(results, indent=2))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = parser.add_subparsers(dest="task", required=True)
    retrieval = tasks.add_parser("retrieval", help="zero-shot image-text retrieval")
    retrieval.add_argument("--checkpoint", required=True, help="a save_pretrained directory (with its processor)")
    retrieval.add_argument("--shards", default="data/synthetic/retrieval_test")
    retrieval.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=["itc", "itc_itm"])
    retrieval.add_argument("--k", type=int, default=16, help="itc_itm shortlist size (default: %(default)s)")
    retrieval.add_argument("--itc-weight", type=float, default=0.0,
                           help="add this multiple of the ITC cosine to the ITM margin in itc_itm")
    retrieval.add_argument("--max-images", type=int, default=None, help="evaluate on the first N images only")
    retrieval.add_argument("--batch-size", type=int, default=64, help="images or captions per encoding batch")
    retrieval.add_argument("--fusion-batch-size", type=int, default=512, help="pairs per fusion pass")
    retrieval.add_argument("--device", default=None)
    retrieval.add_argument("--output", default="runs/evaluate/retrieval")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    results = evaluate_retrieval(args)
    print(json.dumps({p: r["metrics"] for p, r in results["protocols"].items()} | {"chance": results["chance"]},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
