"""NLVR2 (Suhr et al., ACL 2019) from its official files to ``nlvr2_*`` shards.

Inputs, as the authors publish them:

- annotations: https://github.com/lil-lab/nlvr, folder ``nlvr2/data/``: ``train.json``,
  ``dev.json``, ``test1.json`` (public test, "Test-P") and, in later releases, ``test2.json``
  ("Test-U"). Despite the extension these are JSON lines: one object per line with
  ``identifier`` (``<split>-<set_id>-<pair_id>-<sentence_id>``), ``sentence``, ``label``
  (the strings ``"True"`` / ``"False"``), ``left_url``, ``right_url``, ``writer``, ``synset``,
  ``query``, ``validation``, ``extra_validations`` and, in ``train.json`` only, ``directory``.
- images: the archives the authors send on request (``train_img.zip``, ``dev_img.zip``,
  ``test1_img.zip``, ``test2.zip``) unpacked into one folder, which then holds
  ``images/train/<directory>/<pair>-img0.png``, ``dev/<pair>-img0.png``, ``test1/...`` and
  ``test2/...``, where ``<pair>`` is the identifier without its last ``-<sentence_id>``;
  ``-img0`` is the left image and ``-img1`` the right one.

Every sentence is one sample with both images (a pair with two sentences is stored twice).
Not every ``.png`` is a PNG (the README says so): the writer decodes by content and stores
each image under its real format's extension.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple, Union

from soho.data.convert.inputs import first_json_line, read_json_lines, require_file
from soho.data.convert.writer import Conversion, Problem, Sample, safe_key

logger = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test1", "test2")
REQUIRED_SPLITS = ("train", "dev", "test1")
"""What ``convert_nlvr2`` converts by default; ``test2`` is added when its file and images are there."""
KEPT_FIELDS = ("writer", "synset", "query", "left_url", "right_url")
"""Official fields copied into the record as they are (when present)."""
_IDENTIFIER = re.compile(r"^(?P<pair>[A-Za-z0-9]+-\d+-\d+)-\d+$")


def annotation_file(annotations: Path, split: str) -> Path:
    return annotations / f"{split}.json"


def image_folder(images: Path, split: str) -> Path:
    """Where the authors' archive of ``split`` unpacks: ``images/train/`` for train, ``<split>/`` for the others."""
    return images / "images" / "train" if split == "train" else images / split


def parse_label(value: Any) -> Optional[bool]:
    """``"True"`` / ``"False"`` as the official files write them (JSON booleans accepted too); ``None`` otherwise."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return None


def check_json_lines(path: Path) -> None:
    """Fail before any work when ``path`` is missing or is not JSON lines of NLVR2 examples.

    Re-packaged files of other projects (LXMERT, ALBEF, X-VLM) are one JSON array with other keys."""
    require_file(path, "NLVR2 annotation file", "expected nlvr2/data/ of lil-lab/nlvr")
    first = first_json_line(path)
    if first is None or "identifier" not in first:
        raise ValueError(f"{path} is not NLVR2's JSON lines: its first line is not an object with an 'identifier' "
                         f"(use the files in nlvr2/data/ of https://github.com/lil-lab/nlvr)")


def make_sample(example: Dict[str, Any], split: str, folder: Path, path: Path, number: int) -> Union[Sample, Problem]:
    """Line ``number`` of ``path``, parsed, -> its sample, or the problem that keeps it out."""
    where = f"{path}:{number}"
    identifier = example.get("identifier")
    match = _IDENTIFIER.match(identifier) if isinstance(identifier, str) else None
    if match is None:
        return Problem(f"{path.name}:{number}", "bad_record",
                       f"{where}: identifier={identifier!r} (expected <split>-<set>-<pair>-<sentence>)")
    key = safe_key(identifier)
    sentence = example.get("sentence")
    if not isinstance(sentence, str) or not sentence.strip():
        return Problem(key, "bad_record", f"{where}: sentence={sentence!r}")
    label = parse_label(example.get("label"))
    if label is None:
        return Problem(key, "bad_label", f"{where}: label={example.get('label')!r} (expected 'True' or 'False')")
    if split == "train":
        directory = example.get("directory")
        if not isinstance(directory, (int, str)) or isinstance(directory, bool) or str(directory) == "":
            return Problem(key, "bad_record", f"{where}: directory={directory!r} (the train images' numbered folder)")
        folder = folder / str(directory)
    pair = match.group("pair")
    record = {"identifier": identifier, "sentence": sentence, "label": label,
              "left_id": f"{pair}-img0", "right_id": f"{pair}-img1", "source": "nlvr2",
              **{name: example[name] for name in KEPT_FIELDS if name in example}}
    return Sample(key, record, {"left": folder / f"{pair}-img0.png", "right": folder / f"{pair}-img1.png"})


def split_stream(path: Path, split: str, folder: Path) -> Iterator[Union[Sample, Problem]]:
    for number, example in read_json_lines(path):
        yield example if isinstance(example, Problem) else make_sample(example, split, folder, path, number)


def default_splits(annotations: Path, images: Path) -> Tuple[str, ...]:
    """train, dev and test1, and test2 where both its file and its images are there."""
    if not annotation_file(annotations, "test2").is_file():
        return REQUIRED_SPLITS
    if not image_folder(images, "test2").is_dir():
        logger.warning("not converting test2: %s is there but its images (%s) are not",
                       annotation_file(annotations, "test2"), image_folder(images, "test2"))
        return REQUIRED_SPLITS
    return REQUIRED_SPLITS + ("test2",)


def convert_nlvr2(annotations: Union[str, Path], images: Union[str, Path],
                  splits: Optional[Sequence[str]] = None) -> Conversion:
    """The plan for ``nlvr2_<split>`` shards from ``annotations`` (``nlvr2/data/``) and ``images`` (archives unpacked).

    Every requested split's file and image folder must exist; they are checked here, before any work."""
    annotations, images = Path(annotations), Path(images)
    splits = tuple(splits) if splits else default_splits(annotations, images)
    unknown = [split for split in splits if split not in SPLITS]
    if unknown:
        raise ValueError(f"unknown NLVR2 split(s) {unknown}; expected some of {', '.join(SPLITS)}")
    for split in splits:
        check_json_lines(annotation_file(annotations, split))
        folder = image_folder(images, split)
        if not folder.is_dir():
            raise FileNotFoundError(f"NLVR2 {split} images not found: {folder} (unpack the authors' archives into "
                                    f"{images}: images/train/<directory>/, dev/, test1/, test2/)")
    return Conversion(
        converter="nlvr2",
        splits={f"nlvr2_{split}": split_stream(annotation_file(annotations, split), split, image_folder(images, split))
                for split in splits},
        tasks={f"nlvr2_{split}": "nlvr2" for split in splits},
        inputs={"annotations": {split: str(annotation_file(annotations, split)) for split in splits},
                "images": {split: str(image_folder(images, split)) for split in splits}},
    )
