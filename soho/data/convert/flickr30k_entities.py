"""Flickr30k Entities (phrase <-> box annotations of Flickr30k) -> image-text shards with phrases and boxes.

Input: a checkout of https://github.com/BryanPlummer/flickr30k_entities, holding ``train.txt``,
``val.txt``, ``test.txt`` (one Flickr30k image id a line) and ``annotations.zip`` (or its extracted
``Annotations/`` and ``Sentences/`` folders), plus the Flickr30k ``flickr30k-images/`` folder.

- ``Sentences/<id>.txt``: the image's five captions, one a line, with every annotated phrase
  bracketed as ``[/EN#<chain id>/<type>/.../<type> <word> ... <word>]``, e.g.
  ``[/EN#1/people Two young guys] with [/EN#2/bodyparts shaggy hair] look at ...``. Phrases of one
  coreference chain (entity) share the chain id; ``notvisual`` phrases have the null chain id 0.
- ``Annotations/<id>.xml``: PASCAL-VOC-like, ``<size>`` and ``<object>``s, each with one or more
  ``<name>`` (the chain ids it shows) and either ``<bndbox>`` (``xmin ymin xmax ymax``, 1-based
  inclusive pixel indices) or the ``<scene>`` / ``<nobndbox>`` flags (0/1).

Output: one sample per image,

    {"image_id": "1000092795", "captions": ["Two young guys with shaggy hair look at ...", ...],
     "phrases": [{"caption": 0, "first_word": 0, "text": "Two young guys", "entity_id": "1", "types": ["people"]}, ...],
     "entities": {"1": {"boxes": [{"box": [158, 124, 219, 335]}, ...], "scene": false, "no_box": false}, ...},
     "unrelated_captions": [], "source": "flickr30k_entities"}

``captions`` are the plain sentences (words joined by single spaces, as the official parser
gives them), so ``decode_captioned_image`` reads these shards like any image-text split.
``first_word`` is the index of the phrase's first word in the caption's ``split()``. A box is
``[x0, y0, x1, y1]`` in pixel-edge coordinates of the stored image (``[xmin - 1, ymin - 1, xmax,
ymax]`` of the XML; the whole of a W x H image is ``[0, 0, W, H]``), under the key ``box`` so the
writer rescales it when it resizes the image. ``entities`` holds every chain id of the XML or of
a phrase except the null id 0; an object naming several chains gives its box to each of them
(the official ``flickr30k_entities_utils.py`` keeps only the first name).
``unrelated_captions`` lists the captions the dataset's ``UNRELATED_CAPTIONS`` file marks as
not describing the image (0-based), when that file is there.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
import zipfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from soho.data.convert.inputs import require_file
from soho.data.convert.writer import Conversion, Problem, Sample, safe_key

SPLIT_FILES = {"entities_train": "train.txt", "entities_val": "val.txt", "entities_test": "test.txt"}
ARCHIVE = "annotations.zip"
FOLDERS = ("Annotations", "Sentences")
UNRELATED_CAPTIONS = "UNRELATED_CAPTIONS"
NULL_CHAIN = "0"
"""The chain id of ``notvisual`` phrases, which were never boxed: not an entity."""

_PHRASE = re.compile(r"\[/EN#(?P<chain>\d+)(?P<types>(?:/[^/\s\]]+)+) (?P<words>[^\]]*)\]")

Reader = Callable[[str], Optional[bytes]]


class BadRecord(ValueError):
    """An annotation file that cannot be read; the message says where."""


class MissingAnnotation(LookupError):
    """An image of a split list without its ``Sentences`` or ``Annotations`` file; the message names it."""


def parse_sentence(line: str) -> Tuple[str, List[Dict[str, Any]]]:
    """(plain caption, phrases) of one line of a ``Sentences/<id>.txt`` file."""
    words: List[str] = []
    phrases: List[Dict[str, Any]] = []
    position = 0
    for match in _PHRASE.finditer(line):
        words += _plain_words(line[position:match.start()])
        phrase_words = match["words"].split()
        phrases.append({"first_word": len(words), "text": " ".join(phrase_words), "entity_id": match["chain"],
                        "types": match["types"].strip("/").split("/")})
        words += phrase_words
        position = match.end()
    words += _plain_words(line[position:])
    return " ".join(words), phrases


def _plain_words(text: str) -> List[str]:
    if "[/EN#" in text:
        raise BadRecord(f"unbalanced phrase markup in {text.strip()!r}")
    return text.split()


def parse_annotation(data: bytes) -> Dict[str, Dict[str, Any]]:
    """Chain id -> ``{"boxes": [{"box": [x0, y0, x1, y1]}, ...], "scene": bool, "no_box": bool}``
    of an ``Annotations/<id>.xml`` file."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as error:
        raise BadRecord(f"not XML: {error}") from None
    entities: Dict[str, Dict[str, Any]] = {}
    for number, element in enumerate(root.iter("object")):
        names = [name.text.strip() for name in element.findall("name") if name.text and name.text.strip()]
        if not names:
            raise BadRecord(f"<object> {number} has no <name>")
        bndbox = element.find("bndbox")
        box = _pixel_edges(bndbox, number) if bndbox is not None else None
        for name in names:
            entity = entities.setdefault(name, _entity())
            if box is not None:
                entity["boxes"].append({"box": list(box)})
            entity["scene"] = entity["scene"] or _flag(element, "scene", number)
            entity["no_box"] = entity["no_box"] or _flag(element, "nobndbox", number)
    return entities


def _entity() -> Dict[str, Any]:
    return {"boxes": [], "scene": False, "no_box": False}


def _pixel_edges(bndbox: ET.Element, number: int) -> List[int]:
    """The XML's 1-based inclusive pixel indices as pixel-edge coordinates, which rescale exactly."""
    try:
        xmin, ymin, xmax, ymax = (int(bndbox.findtext(tag, "").strip()) for tag in ("xmin", "ymin", "xmax", "ymax"))
    except ValueError:
        raise BadRecord(f"<object> {number} has a <bndbox> without four integer corners") from None
    return [xmin - 1, ymin - 1, xmax, ymax]


def _flag(element: ET.Element, tag: str, number: int) -> bool:
    text = element.findtext(tag)
    if text is None:
        return False
    try:
        return int(text.strip()) > 0
    except ValueError:
        raise BadRecord(f"<object> {number} has <{tag}>{text}</{tag}>, not 0 or 1") from None


def read_split_ids(path: Path) -> List[str]:
    """The image ids of ``train.txt`` / ``val.txt`` / ``test.txt``."""
    require_file(path, "Flickr30k Entities split file")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_unrelated_captions(path: Path) -> Dict[str, List[int]]:
    """Image id -> 0-based indices of the captions ``UNRELATED_CAPTIONS`` marks (``<imageID> <sentence number>``,
    numbers from 1); empty when the file is absent."""
    unrelated: Dict[str, List[int]] = {}
    if not path.is_file():
        return unrelated
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 2 or not fields[1].isdigit() or int(fields[1]) < 1:
            raise ValueError(f"{path}:{number}: expected '<imageID> <sentence number>', got {line!r}")
        unrelated.setdefault(fields[0], []).append(int(fields[1]) - 1)
    return {image_id: sorted(indices) for image_id, indices in unrelated.items()}


def _annotation_source(root: Path) -> Path:
    """The extracted folders' parent or ``annotations.zip``, whichever is there (folders first)."""
    if all((root / folder).is_dir() for folder in FOLDERS):
        return root
    if (root / ARCHIVE).is_file():
        return root / ARCHIVE
    raise FileNotFoundError(f"neither {root / ARCHIVE} nor the extracted {root}/Annotations and {root}/Sentences")


@contextmanager
def _open_annotations(source: Path) -> Iterator[Reader]:
    """``read("Sentences/<id>.txt")`` -> the file's bytes, or None when it is not there."""
    if source.is_dir():
        def read_file(name: str) -> Optional[bytes]:
            path = source / name
            return path.read_bytes() if path.is_file() else None
        yield read_file
        return
    with zipfile.ZipFile(source) as archive:
        # Found by their last two path parts, whatever folder the archive puts them under.
        members = {"/".join(PurePosixPath(name).parts[-2:]): name for name in archive.namelist()
                   if len(PurePosixPath(name).parts) >= 2 and PurePosixPath(name).parts[-2] in FOLDERS}

        def read_member(name: str) -> Optional[bytes]:
            return archive.read(members[name]) if name in members else None
        yield read_member


def _record(image_id: str, read: Reader, unrelated: Sequence[int]) -> Dict[str, Any]:
    """The sample record of one image; raises ``BadRecord`` / ``MissingAnnotation`` naming the file."""
    sentences, annotation = f"Sentences/{image_id}.txt", f"Annotations/{image_id}.xml"
    data = {name: read(name) for name in (sentences, annotation)}
    for name, content in data.items():
        if content is None:
            raise MissingAnnotation(name)
    try:
        lines = [line for line in data[sentences].decode("utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as error:
        raise BadRecord(f"{sentences}: not UTF-8 ({error})") from None
    captions: List[str] = []
    phrases: List[Dict[str, Any]] = []
    for index, line in enumerate(lines):
        try:
            caption, found = parse_sentence(line)
        except BadRecord as error:
            raise BadRecord(f"{sentences} caption {index}: {error}") from None
        captions.append(caption)
        phrases += [{"caption": index, **phrase} for phrase in found]
    try:
        entities = parse_annotation(data[annotation])
    except BadRecord as error:
        raise BadRecord(f"{annotation}: {error}") from None
    for phrase in phrases:
        if phrase["entity_id"] != NULL_CHAIN:
            entities.setdefault(phrase["entity_id"], _entity())
    entities.pop(NULL_CHAIN, None)
    return {"image_id": image_id, "captions": captions, "phrases": phrases, "entities": entities,
            "unrelated_captions": list(unrelated), "source": "flickr30k_entities"}


def _split_items(ids: Sequence[str], split_file: Path, source: Path, images_root: Path,
                 unrelated: Dict[str, List[int]]) -> Iterator[Union[Sample, Problem]]:
    with _open_annotations(source) as read:
        for line, image_id in enumerate(ids, start=1):
            key = safe_key(image_id)
            where = f"{split_file} id {image_id!r} (line {line})"
            try:
                record = _record(image_id, read, unrelated.get(image_id, []))
            except MissingAnnotation as error:
                yield Problem(key, "missing_annotation", f"{where}: {error} is not in {source}")
                continue
            except BadRecord as error:
                yield Problem(key, "bad_record", f"{where}: {error}")
                continue
            if not record["captions"]:
                yield Problem(key, "no_captions", f"{where}: Sentences/{image_id}.txt has no captions")
                continue
            yield Sample(key, record, {"": images_root / f"{image_id}.jpg"})


def flickr30k_entities_conversion(entities_root: Union[str, Path], images_root: Union[str, Path],
                                  splits: Optional[Sequence[str]] = None) -> Conversion:
    """The conversion of the Flickr30k Entities checkout ``entities_root`` into ``splits``
    (default: ``entities_train``, ``entities_val``, ``entities_test``). Split files and the
    annotations are located here, so a wrong path fails before any work."""
    splits = list(SPLIT_FILES) if splits is None else list(splits)
    unknown = [split for split in splits if split not in SPLIT_FILES]
    if unknown or not splits:
        raise ValueError(f"unknown or no output splits {unknown}; Flickr30k Entities has {list(SPLIT_FILES)}")
    entities_root, images_root = Path(entities_root), Path(images_root)
    if not images_root.is_dir():
        raise NotADirectoryError(f"image folder not found: {images_root}")
    source = _annotation_source(entities_root)
    ids = {split: read_split_ids(entities_root / SPLIT_FILES[split]) for split in splits}
    unrelated = read_unrelated_captions(entities_root / UNRELATED_CAPTIONS)
    streams = {split: _split_items(ids[split], entities_root / SPLIT_FILES[split], source, images_root, unrelated)
               for split in splits}
    return Conversion(
        converter="flickr30k_entities", splits=streams, tasks={split: "phrase_grounding" for split in splits},
        inputs={"entities": str(entities_root), "annotations": str(source), "images": str(images_root),
                "ids": {split: len(ids[split]) for split in splits}})
