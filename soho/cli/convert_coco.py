r"""Convert COCO 2014 captions in Karpathy's splits to soho shards (docs/DATA.md).

    python data_scripts/convert_coco.py --karpathy-json caption_datasets/dataset_coco.json \
        --images /datasets/coco --out data/coco --workers 8

``--images`` holds ``train2014/`` and ``val2014/``. Writes ``retrieval_train``, ``retrieval_restval``,
``retrieval_val``, ``retrieval_test`` (5 captions per image) and ``pretrain`` (train + restval, every
caption); ``--splits`` picks some of them (``pretrain`` repeats the train images on disk).
"""
from __future__ import annotations

import argparse
import sys

from soho.data.convert.karpathy import OUTPUT_SPLITS, coco_karpathy_conversion
from soho.data.convert.writer import command_line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--karpathy-json", required=True, help="dataset_coco.json from Karpathy's caption_datasets.zip")
    parser.add_argument("--images", required=True, help="COCO root holding train2014/ and val2014/")
    parser.add_argument("--splits", nargs="+", choices=list(OUTPUT_SPLITS["coco"]), default=None,
                        help="output splits to write (default: all)")
    return command_line(parser, lambda args: coco_karpathy_conversion(args.karpathy_json, args.images, args.splits),
                        argv)


if __name__ == "__main__":
    sys.exit(main())
