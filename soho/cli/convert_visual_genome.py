"""Convert Visual Genome to soho shards: ``pretrain`` (region descriptions as captions, COCO and Flickr30k
Karpathy val/test images left out) and, with --relationships, ``relations`` (subject-predicate-object with boxes).

--root is the unpacked release (image_data.json, region_descriptions.json, VG_100K/, VG_100K_2/ from
https://homes.cs.washington.edu/~ranjay/visualgenome/api.html); loading region_descriptions.json
takes several GB of memory. VG images are Flickr images: --exclude-flickr30k leaves out those that
are Flickr30k Karpathy val/test images (by flickr_id), as UNITER does.

    python data_scripts/convert_visual_genome.py --root data/raw/visual_genome \\
        --exclude-coco data/raw/karpathy/dataset_coco.json \\
        --exclude-flickr30k data/raw/karpathy/dataset_flickr30k.json \\
        --relationships data/raw/visual_genome/relationships.json --out data/vg
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from soho.data.convert.visual_genome import visual_genome_conversion
from soho.data.convert.writer import Conversion, command_line


def build(args: argparse.Namespace) -> Conversion:
    conversion = visual_genome_conversion(
        image_data=args.image_data or args.root / "image_data.json",
        region_descriptions=args.region_descriptions or args.root / "region_descriptions.json",
        images=args.images or args.root, relationships=args.relationships, exclude_coco=args.exclude_coco,
        exclude_flickr30k=args.exclude_flickr30k)
    for path, option, dataset in ((args.exclude_coco, "--exclude-coco", "COCO"),
                                  (args.exclude_flickr30k, "--exclude-flickr30k", "Flickr30k")):
        if path is None:
            print(f"warning: without {option}, {dataset} Karpathy val/test images stay in 'pretrain' and "
                  f"{dataset} retrieval results are no longer held out", file=sys.stderr)
    return conversion


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True,
                        help="the unpacked release: image_data.json, region_descriptions.json, VG_100K/, VG_100K_2/")
    parser.add_argument("--image-data", type=Path, help="default: <root>/image_data.json")
    parser.add_argument("--region-descriptions", type=Path, help="default: <root>/region_descriptions.json")
    parser.add_argument("--images", type=Path, help="directory holding VG_100K/ and VG_100K_2/ (default: <root>)")
    parser.add_argument("--relationships", type=Path,
                        help="relationships.json: also write the 'relations' split (visual relation probing)")
    parser.add_argument("--exclude-coco", type=Path,
                        help="Karpathy's dataset_coco.json: its val and test images are left out of 'pretrain'")
    parser.add_argument("--exclude-flickr30k", type=Path,
                        help="Karpathy's dataset_flickr30k.json: its val and test images are left out of 'pretrain'")
    return command_line(parser, build, argv)


if __name__ == "__main__":
    sys.exit(main())
