"""Convert an img2dataset webdataset download (Conceptual Captions, SBU Captions, ...) to pretrain shards.

    # CC3M: Train_GCC-training.tsv from https://ai.google.com/research/ConceptualCaptions/download
    sed -i '1s/^/caption\\turl\\n/' Train_GCC-training.tsv
    img2dataset --url_list Train_GCC-training.tsv --input_format tsv --url_col url --caption_col caption \\
        --output_format webdataset --output_folder /data/cc3m_img2dataset --resize_mode no
    python data_scripts/convert_img2dataset.py --input /data/cc3m_img2dataset --source cc3m --out data/cc3m \\
        --max-short-side 600 --max-long-side 1000

    # SBU: sbu-captions-all.tar.gz from https://www.cs.rice.edu/~vo9/sbucaptions/
    img2dataset --url_list sbu-captions-all.json --input_format json --url_col image_urls --caption_col captions \\
        --output_format webdataset --output_folder /data/sbu_img2dataset --resize_mode no
    python data_scripts/convert_img2dataset.py --input /data/sbu_img2dataset --source sbu --out data/sbu \\
        --max-short-side 600 --max-long-side 1000

The manifest's "img2dataset" entry sums img2dataset's own stats files: how many URLs it tried
and how many images it could not download or decode (those never reached its tars).
"""
from __future__ import annotations

import argparse
import sys

from soho.data.convert.img2dataset import convert_img2dataset
from soho.data.convert.writer import command_line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True,
                        help="img2dataset's --output_folder (00000.tar, 00000_stats.json, ...)")
    parser.add_argument("--source", required=True, help="dataset name stored in every record, e.g. cc3m or sbu")
    parser.add_argument("--split", default="pretrain", help="output split (default: %(default)s)")
    return command_line(parser, lambda args: convert_img2dataset(args.input, args.source, args.split), argv)


if __name__ == "__main__":
    sys.exit(main())
