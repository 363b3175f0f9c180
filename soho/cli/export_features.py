r"""Export a checkpoint's features for a shard split or a folder of images: image grids and dictionary
entries, image, text and fused [CLS] states, and ITC embeddings where the checkpoint has them.

    accelerate launch tools/export_features.py --checkpoint runs/synthetic/pretrained \
        --shards data/synthetic/retrieval_test --out runs/features/retrieval_test
    python tools/export_features.py --checkpoint runs/synthetic/pretrained --images /data/photos \
        --captions /data/photos/captions.csv --out runs/features/photos --features image text itc

Writes part files (safetensors, or numpy .npz with --format numpy) from every process, and index.json,
images.jsonl and texts.jsonl (one line per row, in an order that does not depend on the number of
processes); soho.features.load_features reads them back. The features are described in soho/features.py.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

import torch
from accelerate import Accelerator

from soho.data.shards import SkipCounter, expand_urls
from soho.errors import UserError
from soho.features import (
    FEATURES,
    FORMATS,
    check_features,
    export_features,
    folder_items,
    folder_listing,
    shard_items,
)
from soho.models.soho import SohoForPretraining
from soho.processing import SohoProcessor


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a save_pretrained directory (with its processor)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", help="image-text shards: a directory, brace pattern or glob")
    source.add_argument("--images", help="a folder of images (every image file under it, or those --captions names)")
    parser.add_argument("--captions", default=None,
                        help="with --images: a captions file (as soho-convert-captions reads) giving the texts")
    parser.add_argument("--image-key", default="path",
                        help="with --captions: the image column (default: %(default)s)")
    parser.add_argument("--caption-key", default="caption",
                        help="with --captions: the caption column (default: %(default)s)")
    parser.add_argument("--out", required=True, help="output directory (an earlier export there is replaced)")
    parser.add_argument("--features", nargs="+", choices=FEATURES, default=None,
                        help="what to export (default: everything the checkpoint and the source give)")
    parser.add_argument("--format", choices=list(FORMATS), default="safetensors",
                        help="of the part files (default: %(default)s)")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                        help="of the stored features (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default: %(default)s)")
    parser.add_argument("--part-size", type=int, default=10000,
                        help="images per part file and process, rounded up to whole batches (default: %(default)s)")
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no",
                        help="autocast the passes (stored features are --dtype either way)")
    parser.add_argument("--device", default=None, help="cpu to stay off an available GPU")
    args = parser.parse_args(argv)
    if args.captions and not args.images:
        parser.error("--captions goes with --images (shards carry their captions)")
    if args.batch_size < 1 or args.part_size < 1:
        parser.error("--batch-size and --part-size must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    accelerator = Accelerator(cpu=args.device == "cpu" or not torch.cuda.is_available(),
                              mixed_precision=args.mixed_precision)
    skips = SkipCounter()
    try:
        model = SohoForPretraining.from_pretrained(args.checkpoint).to(accelerator.device).eval()
        processor = SohoProcessor.from_pretrained(args.checkpoint)
        if args.shards:
            expand_urls(args.shards)  # a missing split is one line here, not a traceback in every process
            items = shard_items(args.shards, accelerator.process_index, accelerator.num_processes, skips)
            inputs, total, with_captions = {"shards": args.shards}, None, True
        else:
            listing = folder_listing(args.images, args.captions, image_key=args.image_key,
                                     caption_key=args.caption_key)
            items = folder_items(args.images, listing, accelerator.process_index, accelerator.num_processes, skips)
            inputs, total = {"images": args.images, "captions": args.captions}, len(listing)
            with_captions = args.captions is not None
        features = check_features(args.features, model, with_captions)
    except (OSError, ValueError, UserError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    index = export_features(model, processor, items, args.out, features, accelerator, args.batch_size,
                            args.part_size, args.format, args.dtype, skips,
                            {"checkpoint": args.checkpoint, **inputs}, total)
    if accelerator.is_main_process:
        print(json.dumps({key: index[key] for key in ("features", "images", "texts", "skipped", "seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
