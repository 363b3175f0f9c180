"""COCO and Flickr30k captions in Karpathy's splits -> image-text shards (docs/DATA.md).

Input: ``dataset_coco.json`` or ``dataset_flickr30k.json`` from Karpathy's ``caption_datasets.zip``
(https://cs.stanford.edu/people/karpathy/deepimagesent/), an object
``{"images": [...], "dataset": "coco" | "flickr30k"}`` whose entries are

    {"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "imgid": 0, "split": "test",
     "cocoid": 391895, "sentids": [770337, ...],
     "sentences": [{"tokens": ["a", "man", ...], "raw": "A man with a red helmet on a small moped on a dirt road. ",
                    "imgid": 0, "sentid": 770337}, ...]}

(Flickr30k entries have no ``filepath`` or ``cocoid``; ``filename`` is ``<flickr id>.jpg``), and the
images: for COCO the root holding ``train2014/`` and ``val2014/``, for Flickr30k the
``flickr30k-images/`` folder.

Output: one sample per image with every caption (the ``raw`` text, stripped). Retrieval val/test
keep the first five captions of each image (the 5k/25k COCO and 1k/5k Flickr30k protocols; some
COCO images have six or seven), and the manifest counts the captions cut under ``captions_cut``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from soho.data.convert.inputs import load_json
from soho.data.convert.writer import Conversion, Problem, Sample, safe_key

EVAL_CAPTIONS = 5
"""Captions per image in retrieval val/test, as every published COCO/Flickr30k retrieval number uses."""

KARPATHY_SPLITS = {"coco": ("train", "restval", "val", "test"), "flickr30k": ("train", "val", "test")}

OUTPUT_SPLITS: Dict[str, Dict[str, Tuple[str, ...]]] = {
    "coco": {"retrieval_train": ("train",), "retrieval_restval": ("restval",), "retrieval_val": ("val",),
             "retrieval_test": ("test",), "pretrain": ("train", "restval")},
    "flickr30k": {"retrieval_train": ("train",), "retrieval_val": ("val",), "retrieval_test": ("test",),
                  "pretrain": ("train",)},
}
"""Output split -> the Karpathy splits it takes its images from. ``pretrain`` never sees a val/test image."""

EVAL_OUTPUT_SPLITS = ("retrieval_val", "retrieval_test")


class BadRecord(ValueError):
    """An entry of ``images`` that cannot become a sample or be identified; the message says why."""


def load_karpathy(path: Union[str, Path], dataset: str) -> List[Any]:
    """The ``images`` list of a Karpathy split file, after checking it is the file for ``dataset``."""
    path = Path(path)
    data = load_json(path, "Karpathy split file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: expected an object with an 'images' list (Karpathy's dataset_{dataset}.json)")
    if data.get("dataset") != dataset:
        raise ValueError(f"{path} holds the Karpathy split of {data.get('dataset')!r}, not of {dataset!r}")
    return data["images"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _cocoid(entry: Mapping[str, Any]) -> int:
    cocoid = entry.get("cocoid")
    if not _is_int(cocoid):
        raise BadRecord(f"'cocoid' is {cocoid!r}")
    return cocoid


def _flickr_id(entry: Mapping[str, Any]) -> int:
    """The Flickr id a Flickr30k entry's file is named by (``<flickr id>.jpg``)."""
    filename = entry.get("filename")
    stem = Path(filename).stem if isinstance(filename, str) else ""
    if not (stem.isascii() and stem.isdigit()):
        raise BadRecord(f"'filename' is {filename!r}, not <flickr id>.jpg")
    return int(stem)


IMAGE_IDS = {"coco": _cocoid, "flickr30k": _flickr_id}
"""How an entry's image is identified in other datasets: COCO id, or Flickr id (as Visual Genome's
``coco_id`` / ``flickr_id``)."""


def karpathy_image_splits(path: Union[str, Path], dataset: str,
                          splits: Iterable[str] = ("val", "test")) -> Dict[int, str]:
    """COCO id (``dataset="coco"``) or Flickr id (``"flickr30k"``) -> Karpathy split, of the images in ``splits``.

    What pre-training data (e.g. Visual Genome, which shares ~50k images with COCO and is itself
    made of Flickr images) must leave out to keep the Karpathy val/test images unseen. An image of
    ``splits`` without an id is an error, not a skip: it could not be left out."""
    splits = set(splits)
    unknown = splits - set(KARPATHY_SPLITS[dataset])
    if unknown or not splits:
        raise ValueError(f"unknown or no Karpathy splits {sorted(unknown)}; {dataset} has {KARPATHY_SPLITS[dataset]}")
    ids: Dict[int, str] = {}
    for index, entry in enumerate(load_karpathy(path, dataset)):
        if isinstance(entry, dict) and entry.get("split") in splits:
            try:
                ids[IMAGE_IDS[dataset](entry)] = entry["split"]
            except BadRecord as error:
                raise ValueError(f"{path} images[{index}] ({entry['split']}): {error}; it cannot be left out") from None
    return ids


def _image(entry: Mapping[str, Any], dataset: str) -> Tuple[str, str]:
    """(image id, image file relative to the image root) of an entry."""
    filename = entry.get("filename")
    if not isinstance(filename, str) or not filename:
        raise BadRecord(f"'filename' is {filename!r}")
    if dataset == "flickr30k":
        return Path(filename).stem, filename
    cocoid, filepath = _cocoid(entry), entry.get("filepath")
    if not isinstance(filepath, str) or not filepath:
        raise BadRecord(f"'filepath' is {filepath!r}")
    return str(cocoid), f"{filepath}/{filename}"


def _captions(entry: Mapping[str, Any]) -> Tuple[List[str], List[Any]]:
    """(captions, sentence ids) of an entry, in the file's order."""
    sentences = entry.get("sentences")
    if not isinstance(sentences, list):
        raise BadRecord(f"'sentences' is {type(sentences).__name__}, not a list")
    captions, sentids = [], []
    for number, sentence in enumerate(sentences):
        raw = sentence.get("raw") if isinstance(sentence, dict) else None
        if not isinstance(raw, str) or not raw.strip():
            raise BadRecord(f"sentence {number} has no 'raw' text")
        captions.append(raw.strip())
        sentids.append(sentence.get("sentid"))
    return captions, sentids


def _split_items(entries: Sequence[Any], dataset: str, karpathy_splits: Tuple[str, ...], eval_split: bool,
                 images_root: Path, source: Path, strays: bool) -> Iterator[Union[Sample, Problem]]:
    """Samples of the entries in ``karpathy_splits``; with ``strays``, also a problem for every
    entry that belongs to no Karpathy split (so each such entry is listed exactly once)."""
    known = KARPATHY_SPLITS[dataset]
    for index, entry in enumerate(entries):
        where = f"{source} images[{index}]"
        split = entry.get("split") if isinstance(entry, dict) else None
        if split not in known:
            if strays:
                key = safe_key(f"images_{index}")
                yield Problem(key, "bad_record", f"{where}: 'split' is {split!r}, not one of {known}")
            continue
        if split not in karpathy_splits:
            continue
        try:
            image_id, relative = _image(entry, dataset)
            captions, sentids = _captions(entry)
        except BadRecord as error:
            yield Problem(safe_key(str(entry.get("cocoid", entry.get("filename", f"images_{index}")))),
                          "bad_record", f"{where}: {error}")
            continue
        key = safe_key(image_id)
        if not captions:
            yield Problem(key, "no_captions", f"{where} ({relative}): no sentences")
            continue
        if eval_split:
            if len(captions) < EVAL_CAPTIONS:
                yield Problem(key, "too_few_captions",
                              f"{where} ({relative}): {len(captions)} sentences, retrieval needs {EVAL_CAPTIONS}")
                continue
            captions, sentids = captions[:EVAL_CAPTIONS], sentids[:EVAL_CAPTIONS]
        record = {"image_id": image_id, "captions": captions, "sentids": sentids, "file": relative,
                  "karpathy_split": split, "source": dataset}
        yield Sample(key, record, {"": images_root / relative})


def _captions_cut(entries: Sequence[Any], karpathy_split: str) -> int:
    """Captions beyond the first five of the well-formed entries of a val/test split."""
    return sum(max(0, len(entry["sentences"]) - EVAL_CAPTIONS) for entry in entries
               if isinstance(entry, dict) and entry.get("split") == karpathy_split
               and isinstance(entry.get("sentences"), list))


def karpathy_conversion(dataset: str, karpathy_json: Union[str, Path], images_root: Union[str, Path],
                        splits: Optional[Sequence[str]] = None) -> Conversion:
    """The conversion of ``dataset`` (``"coco"`` or ``"flickr30k"``) into ``splits`` (default: all of
    ``OUTPUT_SPLITS[dataset]``). The split file is read here, so a wrong file fails before any work."""
    if dataset not in OUTPUT_SPLITS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(OUTPUT_SPLITS)}")
    available = OUTPUT_SPLITS[dataset]
    splits = list(available) if splits is None else list(splits)
    unknown = [split for split in splits if split not in available]
    if unknown or not splits:
        raise ValueError(f"unknown or no output splits {unknown}; {dataset} has {list(available)}")
    images_root = Path(images_root)
    if not images_root.is_dir():
        raise NotADirectoryError(f"image folder not found: {images_root}")
    source = Path(karpathy_json)
    entries = load_karpathy(source, dataset)
    streams = {split: _split_items(entries, dataset, available[split], split in EVAL_OUTPUT_SPLITS, images_root,
                                   source, strays=position == 0)
               for position, split in enumerate(splits)}
    cut = {split: _captions_cut(entries, available[split][0]) for split in splits if split in EVAL_OUTPUT_SPLITS}
    return Conversion(
        converter=f"karpathy_{dataset}", splits=streams, tasks={split: "image_text" for split in splits},
        inputs={"karpathy_json": str(source), "images": str(images_root), "entries": len(entries)},
        extra={"eval_captions_per_image": EVAL_CAPTIONS, "captions_cut": cut})


def coco_karpathy_conversion(karpathy_json: Union[str, Path], coco_root: Union[str, Path],
                             splits: Optional[Sequence[str]] = None) -> Conversion:
    """COCO 2014 in Karpathy's splits; ``coco_root`` holds ``train2014/`` and ``val2014/``."""
    return karpathy_conversion("coco", karpathy_json, coco_root, splits)


def flickr30k_karpathy_conversion(karpathy_json: Union[str, Path], images_root: Union[str, Path],
                                  splits: Optional[Sequence[str]] = None) -> Conversion:
    """Flickr30k in Karpathy's splits; ``images_root`` is the ``flickr30k-images/`` folder."""
    return karpathy_conversion("flickr30k", karpathy_json, images_root, splits)
