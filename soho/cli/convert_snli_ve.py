"""Convert SNLI-VE (official snli_ve_*.jsonl + Flickr30k images) to ve_{train,dev,test} shards.

    # snli_ve_{train,dev,test}.jsonl: the download links in https://github.com/necla-ml/SNLI-VE
    # flickr30k-images/: the Flickr30k images (request form at https://shannon.cs.illinois.edu/DenotationGraph/)
    python data_scripts/convert_snli_ve.py --annotations /data/snli_ve --images /data/flickr30k-images \\
        --out data/snli_ve

Every hypothesis is one sample with its premise image: the full set takes about 18 times the
disk of the image folder (see docs/DATA.md); --max-short-side shrinks it.
"""
from __future__ import annotations

import argparse
import sys

from soho.data.convert.snli_ve import SPLITS, convert_snli_ve
from soho.data.convert.writer import command_line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", required=True, help="folder with snli_ve_train.jsonl, _dev.jsonl, _test.jsonl")
    parser.add_argument("--images", required=True, help="the Flickr30k images folder (flickr30k-images/)")
    parser.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS), help="default: %(default)s")
    return command_line(parser, lambda args: convert_snli_ve(args.annotations, args.images, args.splits), argv)


if __name__ == "__main__":
    sys.exit(main())
