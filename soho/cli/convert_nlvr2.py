"""Convert NLVR2 (official JSON lines + the authors' image archives) to nlvr2_{train,dev,test1[,test2]} shards.

    git clone https://github.com/lil-lab/nlvr.git
    # images: request them at https://goo.gl/forms/yS29stWnFWzrDBFH3, then unpack
    # train_img.zip, dev_img.zip, test1_img.zip (and test2.zip) into /data/nlvr2_images
    python data_scripts/convert_nlvr2.py --annotations nlvr/nlvr2/data --images /data/nlvr2_images --out data/nlvr2

The image folder then holds images/train/<directory>/, dev/, test1/ (and test2/). test2 is
converted when both test2.json and test2/ are there; --splits picks splits explicitly.
"""
from __future__ import annotations

import argparse
import sys

from soho.data.convert.nlvr2 import SPLITS, convert_nlvr2
from soho.data.convert.writer import command_line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", required=True, help="nlvr2/data/ of lil-lab/nlvr (train.json, dev.json, ...)")
    parser.add_argument("--images", required=True, help="folder the authors' image archives were unpacked into")
    parser.add_argument("--splits", nargs="+", choices=SPLITS, default=None,
                        help="default: train dev test1, and test2 when its file and images are there")
    return command_line(parser, lambda args: convert_nlvr2(args.annotations, args.images, args.splits), argv)


if __name__ == "__main__":
    sys.exit(main())
