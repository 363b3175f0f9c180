"""SNLI-VE (Xie et al., 2019) from its official files to ``ve_*`` shards.

Inputs, as published:

- annotations: ``snli_ve_train.jsonl``, ``snli_ve_dev.jsonl``, ``snli_ve_test.jsonl`` from
  https://github.com/necla-ml/SNLI-VE (direct downloads in its README, or made by its
  ``snli_ve_generator.py`` from SNLI 1.0). One JSON object per line: SNLI's keys
  (``pairID`` such as ``"2248275918.jpg#1r1e"``, ``captionID``, ``gold_label``,
  ``annotator_labels``, ``sentence1`` = the caption the hypothesis was written against,
  ``sentence2`` = the hypothesis, and their parses) plus the premise image as
  ``Flikr30kID`` (sic) = ``"2248275918.jpg"``. The newer generator under ``vet/tools/``
  names it ``Flickr30K_ID`` and drops the ``.jpg``; both are read.
- images: the Flickr30k images folder (``flickr30k-images/<id>.jpg``).

Every hypothesis is one sample carrying its premise image, so an image is stored once per
hypothesis about it (about 18 times on average).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence, Union

from soho.data.convert.inputs import first_json_line, read_json_lines, require_file
from soho.data.convert.writer import Conversion, Problem, Sample, safe_key

SPLITS = ("train", "dev", "test")
LABELS = ("entailment", "neutral", "contradiction")
"""SNLI's gold labels, as ``soho.tasks.ve.VisualEntailmentTask.labels`` reads them (not imported: it would pull
in torch)."""
IMAGE_FIELDS = ("Flikr30kID", "Flickr30K_ID")
"""The premise image: the released files' (misspelt) key, then the newer generator's."""


def annotation_file(annotations: Path, split: str) -> Path:
    return annotations / f"snli_ve_{split}.jsonl"


def image_name(example: Dict[str, Any]) -> Optional[str]:
    """The premise's file name in the Flickr30k folder, or ``None`` when the example names none."""
    for field in IMAGE_FIELDS:
        value = example.get(field)
        if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
            name = str(value).strip()
            if "/" in name or "\\" in name:
                return None
            return name if name.lower().endswith(".jpg") else f"{name}.jpg"
    return None


def check_json_lines(path: Path) -> None:
    """Fail before any work when ``path`` is missing or is not SNLI-VE's JSON lines.

    SNLI's own files look alike but name no image; re-packaged files of other projects are JSON arrays."""
    require_file(path, "SNLI-VE annotation file", "see https://github.com/necla-ml/SNLI-VE")
    first = first_json_line(path)
    if first is None or "pairID" not in first:
        raise ValueError(f"{path} is not SNLI-VE's JSON lines: its first line is not an object with a 'pairID'")
    if not any(field in first for field in IMAGE_FIELDS):
        raise ValueError(f"{path} names no premise image ({' or '.join(IMAGE_FIELDS)}): SNLI itself rather than "
                         f"SNLI-VE? Use the files of https://github.com/necla-ml/SNLI-VE")


def make_sample(example: Dict[str, Any], images: Path, path: Path, number: int) -> Union[Sample, Problem]:
    """Line ``number`` of ``path``, parsed, -> its sample, or the problem that keeps it out."""
    where = f"{path}:{number}"
    pair_id = example.get("pairID")
    if not isinstance(pair_id, str) or not pair_id:
        return Problem(f"{path.name}:{number}", "bad_record", f"{where}: pairID={pair_id!r}")
    key = safe_key(pair_id)
    label = example.get("gold_label")
    if label == "-":  # SNLI's mark for "no 3 of 5 annotators agreed"; the released files have none
        return Problem(key, "no_gold_label",
                       f"{where}: gold_label '-' (annotator_labels {example.get('annotator_labels')!r})")
    if label not in LABELS:
        return Problem(key, "bad_label", f"{where}: gold_label={label!r} (expected one of {', '.join(LABELS)})")
    hypothesis = example.get("sentence2")
    if not isinstance(hypothesis, str) or not hypothesis.strip():
        return Problem(key, "bad_record", f"{where}: sentence2 (the hypothesis)={hypothesis!r}")
    name = image_name(example)
    if name is None:
        return Problem(key, "bad_record", f"{where}: no premise image file name in {' / '.join(IMAGE_FIELDS)}")
    record = {"pair_id": pair_id, "image_id": Path(name).stem, "hypothesis": hypothesis, "label": label,
              "premise": example.get("sentence1"), "source": "snli_ve", "caption_id": example.get("captionID"),
              "annotator_labels": example.get("annotator_labels")}
    return Sample(key, record, {"": images / name})


def split_stream(path: Path, images: Path) -> Iterator[Union[Sample, Problem]]:
    for number, example in read_json_lines(path):
        yield example if isinstance(example, Problem) else make_sample(example, images, path, number)


def convert_snli_ve(annotations: Union[str, Path], images: Union[str, Path],
                    splits: Sequence[str] = SPLITS) -> Conversion:
    """The plan for ``ve_<split>`` shards from ``annotations`` (the folder of ``snli_ve_*.jsonl``) and
    ``images`` (the Flickr30k images folder); every file is checked here, before any work."""
    annotations, images = Path(annotations), Path(images)
    unknown = [split for split in splits if split not in SPLITS]
    if unknown:
        raise ValueError(f"unknown SNLI-VE split(s) {unknown}; expected some of {', '.join(SPLITS)}")
    for split in splits:
        check_json_lines(annotation_file(annotations, split))
    if not images.is_dir():
        raise FileNotFoundError(f"Flickr30k images folder not found: {images} (flickr30k-images/ of Flickr30k)")
    return Conversion(
        converter="snli_ve",
        splits={f"ve_{split}": split_stream(annotation_file(annotations, split), images) for split in splits},
        tasks={f"ve_{split}": "ve" for split in splits},
        inputs={"annotations": {split: str(annotation_file(annotations, split)) for split in splits},
                "images": str(images)},
    )
