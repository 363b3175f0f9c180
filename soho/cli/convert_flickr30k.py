r"""Convert Flickr30k captions in Karpathy's splits to soho shards (docs/DATA.md).

    python data_scripts/convert_flickr30k.py --karpathy-json caption_datasets/dataset_flickr30k.json \
        --images /datasets/flickr30k-images --out data/flickr30k --workers 8

Writes ``retrieval_train``, ``retrieval_val``, ``retrieval_test`` (5 captions per image) and
``pretrain`` (the train images again); ``--splits`` picks some of them.
"""
from __future__ import annotations

import argparse
import sys

from soho.data.convert.karpathy import OUTPUT_SPLITS, flickr30k_karpathy_conversion
from soho.data.convert.writer import command_line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--karpathy-json", required=True,
                        help="dataset_flickr30k.json from Karpathy's caption_datasets.zip")
    parser.add_argument("--images", required=True, help="the flickr30k-images folder (<flickr id>.jpg)")
    parser.add_argument("--splits", nargs="+", choices=list(OUTPUT_SPLITS["flickr30k"]), default=None,
                        help="output splits to write (default: all)")
    return command_line(
        parser, lambda args: flickr30k_karpathy_conversion(args.karpathy_json, args.images, args.splits), argv)


if __name__ == "__main__":
    sys.exit(main())
