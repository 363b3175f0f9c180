r"""Convert your own images and captions to soho shards: a folder of images and a CSV, TSV, JSON lines or
JSON file of (image path, caption[, split]) rows (docs/DATA.md, "Your own images and captions").

    python data_scripts/convert_captions.py --images /data/photos --captions /data/photos/captions.csv \
        --out data/captions --max-short-side 600 --max-long-side 1000

Each image becomes one sample with all its captions, in the split its rows name (a ``split`` column)
or in ``--split``. open_clip's CSV layout: ``--format tsv --image-key filepath --caption-key title``;
LAVIS's annotation files: ``--image-key image``. Every row that cannot be used is listed in
``<out>/manifest.json`` with its file and line.
"""
from __future__ import annotations

import argparse
import sys

from soho.data.convert.captions import captions_conversion
from soho.data.convert.writer import command_line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="the folder the image paths of the captions file start from")
    parser.add_argument("--captions", required=True, help="a .csv, .tsv, .jsonl or .json file of captions")
    parser.add_argument("--format", choices=("csv", "tsv", "jsonl", "json"), default=None,
                        help="the captions file's format (default: from its suffix)")
    parser.add_argument("--image-key", default="path", help="column or field of the image path (default: %(default)s)")
    parser.add_argument("--caption-key", default="caption",
                        help="column or field of the caption (default: %(default)s)")
    parser.add_argument("--split-key", default="split",
                        help="column or field naming each row's split, when the file has it (default: %(default)s)")
    parser.add_argument("--split", default="pretrain",
                        help="the split of rows that name none (default: %(default)s)")
    parser.add_argument("--source", default=None,
                        help="data set name stored in every record (default: the captions file's name)")
    return command_line(parser, lambda args: captions_conversion(
        args.images, args.captions, args.source, args.split, args.format, args.image_key, args.caption_key,
        args.split_key), argv)


if __name__ == "__main__":
    sys.exit(main())
