"""Visual Genome (v1.2 / v1.4 release files) -> ``pretrain`` and, optionally, ``relations`` shards.

Inputs, as the release at https://homes.cs.washington.edu/~ranjay/visualgenome/api.html unpacks:

- ``image_data.json``: ``[{"image_id" (v1.0: "id"), "url", "width", "height", "coco_id", "flickr_id"}]``;
  ``url`` names the image's folder (``.../rak248/VG_100K_2/1.jpg``), ``coco_id`` is an int or null.
- ``region_descriptions.json``: ``[{"id" (the data readme says "image_id"), "regions": [{"region_id" (v1.0: "id"),
  "image_id", "phrase", "x", "y", "width", "height"}]}]``.
- ``relationships.json``: ``[{"image_id", "relationships": [{"relationship_id", "predicate", "synsets",
  "subject": {"object_id", "x", "y", "w", "h", "name" or "names": [...], "synsets"}, "object": {...}}]}]``.
- ``VG_100K/`` and ``VG_100K_2/`` (``images.zip`` and ``images2.zip``): ``<image_id>.jpg``.

``pretrain`` (SOHO / UNITER use region descriptions as captions) has one sample per image: its
distinct region phrases as ``captions`` plus every region with its box, so the writer rescales the
boxes when it resizes. Images whose ``coco_id`` is in COCO's Karpathy val or test split, or whose
``flickr_id`` names a Flickr30k Karpathy val or test image (VG images are Flickr images; UNITER
removes these too), are left out (``excluded_overlap``), so the retrieval test images are never
seen in pre-training. ``relations`` (visual relation probing, no exclusion) has one sample per
image: every subject-predicate-object triple with boxes.

Annotation files are read whole with ``json.load`` (``region_descriptions.json`` is ~700 MB on
disk, 3-5 GB in memory); each is indexed once by image id and its entries are released as their
images are planned, and ``relationships.json`` is only loaded once ``pretrain`` is planned.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Set, Tuple, Union
from urllib.parse import urlparse

from soho.data.convert.inputs import load_json, require_file
from soho.data.convert.karpathy import karpathy_image_splits
from soho.data.convert.writer import Conversion, Problem, Sample, safe_key

SOURCE = "visual_genome"
IMAGE_FOLDERS = ("VG_100K", "VG_100K_2")
REGION_COUNTS = ("regions_read", "regions_kept", "malformed", "empty_phrase", "empty_box", "clipped_box",
                 "repeated_caption")
"""Tallies in the manifest (``regions``) of what happened to the regions of every planned sample
(an image the writer then finds missing or corrupt still counts)."""
RELATION_COUNTS = ("relationships_read", "relationships_kept", "malformed", "empty_predicate", "missing_name",
                   "empty_box", "clipped_box")

PathLike = Union[str, Path]
Item = Union[Sample, Problem]


@dataclass(frozen=True)
class VGImage:
    """One valid ``image_data.json`` entry."""
    image_id: str
    width: int
    height: int
    coco_id: Optional[int]
    flickr_id: Optional[int]
    file: Path

    @property
    def key(self) -> str:
        return safe_key(self.image_id)


@dataclass
class AnnotationIndex:
    """A per-image annotation file indexed by image id: ``{image_id: (position in file, entry)}``.

    Entries are popped as their images are planned, so what is left at the end has no image."""
    path: Path
    entries: Dict[str, Tuple[int, Any]]
    problems: List[Problem]
    """Entries that cannot be indexed: no image id, or a second entry for the same image."""


# ----------------------------------------------------------------------------- reading the files

def load_json_list(path: Path, what: str) -> List[Any]:
    """The top-level JSON list of ``path``; an error naming the file when it is missing or not a list."""
    data = load_json(path, f"Visual Genome {what}")
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list with one entry per image, got a {type(data).__name__}")
    return data


def first_entry(path: Path, what: str, chunk_size: int = 1 << 20) -> Any:
    """The first element of the JSON list in ``path`` (``None`` for an empty list), read without loading the file.

    Checks a large file's layout before any work, when the whole file is only loaded later."""
    require_file(path, f"Visual Genome {what}")
    decoder = json.JSONDecoder()
    text = ""
    with open(path, encoding="utf-8") as stream:
        while True:
            chunk = stream.read(chunk_size)
            text += chunk
            body = text.lstrip()
            if body[:1] not in ("", "["):
                raise ValueError(f"{path}: expected a JSON list with one entry per image")
            element = body[1:].lstrip()
            if element.startswith("]"):
                return None
            if element:
                try:
                    return decoder.raw_decode(element)[0]
                except json.JSONDecodeError:
                    pass  # the first element continues in the next chunk
            if not chunk:
                raise ValueError(f"{path}: ends before the first entry of its JSON list")


def _entry_image_id(entry: Any) -> Optional[str]:
    """An entry's image id as a string: ``image_id``, or ``id`` where a release wrote that instead."""
    if not isinstance(entry, dict):
        return None
    value = entry.get("image_id", entry.get("id"))
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        return None
    return str(value)


def _check_entry(entry: Any, path: Path, list_key: str) -> None:
    """Stop before any work when a file's entries do not look like the release's (e.g. a wrong file given)."""
    if entry is not None and (_entry_image_id(entry) is None or not isinstance(entry.get(list_key), list)):
        keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise ValueError(f"{path}: its first entry {keys} has no image id ('id' or 'image_id') and "
                         f"'{list_key}' list; is this the Visual Genome file?")


def index_by_image(entries: List[Any], path: Path) -> AnnotationIndex:
    index: Dict[str, Tuple[int, Any]] = {}
    problems: List[Problem] = []
    for position, entry in enumerate(entries):
        image_id = _entry_image_id(entry)
        if image_id is None:
            problems.append(Problem(f"{path.stem}_entry_{position}", "bad_record",
                                    f"{path.name} entry {position}: no image id ('id' or 'image_id')"))
        elif image_id in index:
            problems.append(Problem(safe_key(image_id), "duplicate_annotation",
                                    f"{path.name} entry {position}: image {image_id} already has entry "
                                    f"{index[image_id][0]}, which is used"))
        else:
            index[image_id] = (position, entry)
    return AnnotationIndex(path, index, problems)


# ----------------------------------------------------------------------------- values inside entries

def clean_text(value: Any) -> str:
    """Whitespace runs (VG phrases carry trailing spaces and newlines) collapsed to one space; ``""`` for non-text."""
    return " ".join(value.split()) if isinstance(value, str) else ""


def _optional_int(value: Any) -> Optional[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def clip_box(x: Any, y: Any, w: Any, h: Any, width: int, height: int) -> Tuple[Optional[List[float]], bool]:
    """A VG box (corner, size) as ``[x0, y0, x1, y1]`` clipped to the image, and whether clipping changed it.

    ``None`` when a value is not a number or nothing of the box is inside the image (zero or negative size)."""
    if not all(_is_number(v) for v in (x, y, w, h)):
        return None, False
    box = [max(0, x), max(0, y), min(width, x + w), min(height, y + h)]
    if box[2] <= box[0] or box[3] <= box[1]:
        return None, False
    return box, box != [x, y, x + w, y + h]


def image_file(images: Path, image_id: str, url: Any) -> Path:
    """The image's file: in the folder its url names, else in the other VG folder, else directly in ``images``.

    When it is nowhere, the url's place is returned and the writer lists the image as missing."""
    parts = urlparse(url).path.split("/") if isinstance(url, str) else []
    folder = parts[-2] if len(parts) >= 2 else ""
    name = parts[-1] if parts and parts[-1].endswith(".jpg") else f"{image_id}.jpg"
    folders = ([folder] if folder in IMAGE_FOLDERS else []) + [f for f in IMAGE_FOLDERS if f != folder]
    candidates = [images / f / name for f in folders] + [images / name]
    return next((path for path in candidates if path.is_file()), candidates[0])


def parse_image(entry: Dict[str, Any], image_id: str, position: int, images: Path) -> Union[VGImage, Problem]:
    width, height = entry.get("width"), entry.get("height")
    if not (_is_number(width) and _is_number(height) and width > 0 and height > 0):
        return Problem(safe_key(image_id), "bad_record",
                       f"image_data.json entry {position}: image {image_id} has width={width!r}, height={height!r}")
    return VGImage(image_id, width, height, _optional_int(entry.get("coco_id")), _optional_int(entry.get("flickr_id")),
                   image_file(images, image_id, entry.get("url")))


# ----------------------------------------------------------------------------- samples

def pretrain_sample(image: VGImage, entry: Dict[str, Any], where: str, counts: Counter) -> Item:
    """One image's regions: distinct phrases as captions, every region with a phrase and a box inside the image
    under ``regions``. A phrase counts even when its box is empty: the caption describes the whole image."""
    regions = entry.get("regions")
    if not isinstance(regions, list):
        return Problem(image.key, "bad_record", f"{where}: no 'regions' list")
    captions: List[str] = []
    seen: Set[str] = set()
    kept: List[Dict[str, Any]] = []
    for region in regions:
        counts["regions_read"] += 1
        if not isinstance(region, dict):
            counts["malformed"] += 1
            continue
        phrase = clean_text(region.get("phrase"))
        if not phrase:
            counts["empty_phrase"] += 1
            continue
        # Repeats (VG has many, often differing only in case) would be drawn twice in one training step.
        if phrase.casefold() in seen:
            counts["repeated_caption"] += 1
        else:
            seen.add(phrase.casefold())
            captions.append(phrase)
        box, clipped = clip_box(region.get("x"), region.get("y"), region.get("width"), region.get("height"),
                                image.width, image.height)
        if box is None:
            counts["empty_box"] += 1
            continue
        counts["clipped_box"] += clipped
        counts["regions_kept"] += 1
        kept.append({"phrase": phrase, "box": box, "region_id": region.get("region_id", region.get("id"))})
    if not captions:
        return Problem(image.key, "no_captions",
                       f"{where}: {len(regions)} regions, none with a phrase")
    record = {"image_id": image.image_id, "captions": captions, "regions": kept, "coco_id": image.coco_id,
              "flickr_id": image.flickr_id, "source": SOURCE}
    return Sample(image.key, record, {"": image.file})


def _relation_end(value: Any, image: VGImage) -> Tuple[Optional[Dict[str, Any]], str]:
    """A subject or object as ``{"name", "box", "object_id"}``, or ``None`` and the reason."""
    if not isinstance(value, dict):
        return None, "malformed"
    name = value.get("name")
    if name is None and isinstance(value.get("names"), list) and value["names"]:
        name = value["names"][0]  # relationships.json writes "name" for some objects and "names" for others
    name = clean_text(name).lower()
    if not name:
        return None, "missing_name"
    box, clipped = clip_box(value.get("x"), value.get("y"), value.get("w"), value.get("h"), image.width, image.height)
    if box is None:
        return None, "empty_box"
    return {"name": name, "box": box, "object_id": value.get("object_id")}, "clipped_box" if clipped else ""


def relations_sample(image: VGImage, entry: Dict[str, Any], where: str, counts: Counter) -> Item:
    """One image's relationships; names and predicates lower-cased (VG mixes "ON", "On", "on") as probe labels."""
    relationships = entry.get("relationships")
    if not isinstance(relationships, list):
        return Problem(image.key, "bad_record", f"{where}: no 'relationships' list")
    relations: List[Dict[str, Any]] = []
    for relationship in relationships:
        counts["relationships_read"] += 1
        if not isinstance(relationship, dict):
            counts["malformed"] += 1
            continue
        predicate = clean_text(relationship.get("predicate")).lower()
        if not predicate:
            counts["empty_predicate"] += 1
            continue
        subject, subject_note = _relation_end(relationship.get("subject"), image)
        object_, object_note = _relation_end(relationship.get("object"), image)
        if subject is None or object_ is None:
            counts[subject_note if subject is None else object_note] += 1
            continue
        counts["clipped_box"] += bool(subject_note or object_note)
        counts["relationships_kept"] += 1
        relations.append({"predicate": predicate, "subject": subject, "object": object_,
                          "relationship_id": relationship.get("relationship_id")})
    if not relations:
        return Problem(image.key, "no_relations",
                       f"{where}: {len(relationships)} relationships, none usable")
    record = {"image_id": image.image_id, "relations": relations, "coco_id": image.coco_id, "source": SOURCE}
    return Sample(image.key, record, {"": image.file})


# ----------------------------------------------------------------------------- streams

def karpathy_overlap(image: VGImage, coco: Mapping[int, str], flickr30k: Mapping[int, str]) -> Optional[str]:
    """Why ``image`` stays out of pre-training, or ``None``: ``coco`` and ``flickr30k`` map the COCO and
    Flickr ids of those datasets' Karpathy val/test images to their split."""
    if image.coco_id in coco:
        return f"coco_id {image.coco_id} is in COCO Karpathy {coco[image.coco_id]}"
    if image.flickr_id in flickr30k:
        return f"flickr_id {image.flickr_id} is in Flickr30k Karpathy {flickr30k[image.flickr_id]}"
    return None


def per_image(image_data: List[Any], images: Path, annotations: AnnotationIndex,
              make_sample: Callable[[VGImage, Dict[str, Any], str], Item],
              excluded: Optional[Callable[[VGImage], Optional[str]]] = None) -> Iterator[Item]:
    """One sample or problem per ``image_data.json`` entry, in its order, then every annotation entry
    left without an image. ``make_sample`` gets the image, its annotation entry and where that entry is;
    ``excluded`` says why an image is left out (``excluded_overlap``), or ``None`` to keep it."""
    name = annotations.path.name
    seen: Set[str] = set()
    for position, entry in enumerate(image_data):
        image_id = _entry_image_id(entry)
        if image_id is None:
            yield Problem(f"image_data_entry_{position}", "bad_record",
                          f"image_data.json entry {position}: no image id ('image_id' or 'id')")
            continue
        if image_id in seen:
            yield Problem(safe_key(image_id), "duplicate_image",
                          f"image_data.json entry {position}: image {image_id} was listed before")
            continue
        seen.add(image_id)
        annotation_position, annotation = annotations.entries.pop(image_id, (None, None))
        image = parse_image(entry, image_id, position, images)
        if isinstance(image, Problem):
            yield image
            continue
        reason = excluded(image) if excluded is not None else None
        if reason is not None:
            yield Problem(image.key, "excluded_overlap", f"image {image_id}: {reason}")
        elif annotation is None:
            yield Problem(image.key, "missing_annotation", f"image {image_id} has no entry in {name}")
        else:
            yield make_sample(image, annotation, f"{name} entry {annotation_position} (image {image_id})")
    yield from annotations.problems
    for image_id, (position, _) in annotations.entries.items():
        yield Problem(safe_key(image_id), "unknown_image",
                      f"{name} entry {position}: image {image_id} has no usable entry in image_data.json")
    annotations.entries.clear()


def _relations_stream(image_data: List[Any], images: Path, path: Path, counts: Counter) -> Iterator[Item]:
    # Loaded only now: with the region index already released, the two large files are never in memory together.
    annotations = index_by_image(load_json_list(path, "relationships file"), path)
    yield from per_image(image_data, images, annotations, partial(relations_sample, counts=counts))


def visual_genome_conversion(image_data: PathLike, region_descriptions: PathLike, images: PathLike,
                             relationships: Optional[PathLike] = None, exclude_coco: Optional[PathLike] = None,
                             exclude_flickr30k: Optional[PathLike] = None) -> Conversion:
    """The ``pretrain`` split (and ``relations`` when ``relationships`` is given) of Visual Genome.

    ``images`` holds ``VG_100K/`` and ``VG_100K_2/``; ``exclude_coco`` and ``exclude_flickr30k`` are
    Karpathy's ``dataset_coco.json`` and ``dataset_flickr30k.json``, whose val and test images are left
    out of ``pretrain``. Missing files and files whose layout is not the release's raise an error naming
    the file here, before any work."""
    image_data, region_descriptions, images = Path(image_data), Path(region_descriptions), Path(images)
    if not images.is_dir():
        raise FileNotFoundError(f"Visual Genome image directory not found: {images} (it holds VG_100K/ and VG_100K_2/)")
    coco = karpathy_image_splits(exclude_coco, "coco") if exclude_coco is not None else {}
    flickr30k = karpathy_image_splits(exclude_flickr30k, "flickr30k") if exclude_flickr30k is not None else {}
    image_entries = load_json_list(image_data, "image_data.json")
    if image_entries and (_entry_image_id(image_entries[0]) is None or "url" not in image_entries[0]):
        raise ValueError(f"{image_data}: its first entry has no image id and url; is this image_data.json?")
    regions = load_json_list(region_descriptions, "region_descriptions.json")
    _check_entry(regions[0] if regions else None, region_descriptions, "regions")
    region_index = index_by_image(regions, region_descriptions)
    del regions  # the index holds the entries; popping them releases them as images are planned

    region_counts = Counter(dict.fromkeys(REGION_COUNTS, 0))
    splits: Dict[str, Iterable[Item]] = {
        "pretrain": per_image(image_entries, images, region_index, partial(pretrain_sample, counts=region_counts),
                              partial(karpathy_overlap, coco=coco, flickr30k=flickr30k))}
    tasks = {"pretrain": "image_text"}
    # Filled while the writer plans the splits, which it finishes before writing the manifest.
    extra: Dict[str, Any] = {"excluded_coco_ids": len(coco), "excluded_flickr30k_ids": len(flickr30k),
                             "regions": region_counts}
    if relationships is not None:
        relationships = Path(relationships)
        _check_entry(first_entry(relationships, "relationships file"), relationships, "relationships")
        relation_counts = Counter(dict.fromkeys(RELATION_COUNTS, 0))
        splits["relations"] = _relations_stream(image_entries, images, relationships, relation_counts)
        tasks["relations"] = "relations"
        extra["relationships"] = relation_counts
    inputs = {"image_data": str(image_data), "region_descriptions": str(region_descriptions), "images": str(images),
              "relationships": None if relationships is None else str(relationships),
              "exclude_coco": None if exclude_coco is None else str(exclude_coco),
              "exclude_flickr30k": None if exclude_flickr30k is None else str(exclude_flickr30k)}
    return Conversion("visual_genome", splits, tasks, inputs=inputs, extra=extra)
