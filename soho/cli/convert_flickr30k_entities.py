r"""Convert Flickr30k Entities (phrases with their boxes) to soho shards (docs/DATA.md).

    git clone https://github.com/BryanPlummer/flickr30k_entities
    python data_scripts/convert_flickr30k_entities.py --entities flickr30k_entities \
        --images /datasets/flickr30k-images --out data/flickr30k_entities --workers 8

``--entities`` holds train.txt, val.txt, test.txt and annotations.zip (read as it is, or its
extracted Annotations/ and Sentences/). Writes ``entities_train``, ``entities_val``, ``entities_test``.
Use an output root of its own: each conversion writes its own ``manifest.json``.
"""
from __future__ import annotations

import argparse
import sys

from soho.data.convert.flickr30k_entities import SPLIT_FILES, flickr30k_entities_conversion
from soho.data.convert.writer import command_line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entities", required=True,
                        help="flickr30k_entities checkout: train.txt, val.txt, test.txt, annotations.zip")
    parser.add_argument("--images", required=True, help="the flickr30k-images folder (<flickr id>.jpg)")
    parser.add_argument("--splits", nargs="+", choices=list(SPLIT_FILES), default=None,
                        help="output splits to write (default: all)")
    return command_line(
        parser, lambda args: flickr30k_entities_conversion(args.entities, args.images, args.splits), argv)


if __name__ == "__main__":
    sys.exit(main())
