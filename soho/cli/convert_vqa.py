"""Convert VQA v2 (official question/annotation JSON + COCO images) to vqa_* shards and an answer vocabulary.

    # from https://visualqa.org/download.html, unzipped into /data/vqav2:
    #   v2_Questions_{Train,Val,Test}_mscoco.zip, v2_Annotations_{Train,Val}_mscoco.zip
    # from https://cocodataset.org/#download, unzipped into /data/coco: train2014/ val2014/ test2015/
    python data_scripts/convert_vqa.py --vqa-dir /data/vqav2 --images /data/coco --out data/vqav2 \\
        --minival-images 5000 --max-short-side 600 --max-long-side 1000

Writes vqa_train, vqa_val_train + vqa_minival (vqa_val without a --minival-* option), vqa_test and
vqa_test_dev (questions only, for the evaluation server), and <out>/answer_vocabulary.json: the
3,129 most frequent normalised train + val answers, loadable by soho.eval.vqa.AnswerVocabulary.load.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from soho.data.convert.vqa import SPLITS, VOCABULARY_FILE, VOCABULARY_SIZE, convert_vqa
from soho.data.convert.writer import Conversion, command_line


def build(args: argparse.Namespace) -> Conversion:
    if args.answer_vocabulary_size < 0 or args.minival_images < 0:
        raise ValueError("--answer-vocabulary-size and --minival-images must be >= 0")
    vocabulary = Path(args.out) / VOCABULARY_FILE if args.answer_vocabulary_size else None
    return convert_vqa(args.vqa_dir, args.images, args.splits, args.minival_images, args.minival_question_ids,
                       vocabulary, args.answer_vocabulary_size)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vqa-dir", required=True,
                        help="folder holding the VQA v2 JSON files (directly or in subfolders such as Questions/)")
    parser.add_argument("--images", required=True, help="COCO root holding train2014/, val2014/ and test2015/")
    parser.add_argument("--splits", nargs="+", choices=list(SPLITS), default=list(SPLITS),
                        help="default: %(default)s")
    minival = parser.add_mutually_exclusive_group()
    minival.add_argument("--minival-images", type=int, default=0,
                         help="hold out the N val images with the smallest sha256 of their id as vqa_minival; "
                              "the rest of val becomes vqa_val_train")
    minival.add_argument("--minival-question-ids", default=None,
                         help="hold out these val questions instead: a JSON list of ids or of objects with "
                              "question_id (e.g. LXMERT's minival.json), or one id per line")
    parser.add_argument("--answer-vocabulary-size", type=int, default=VOCABULARY_SIZE,
                        help=f"answers in <out>/{VOCABULARY_FILE} (0: do not write it; default: %(default)s)")
    return command_line(parser, build, argv)


if __name__ == "__main__":
    sys.exit(main())
