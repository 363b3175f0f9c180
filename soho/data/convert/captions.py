"""Your own images and captions -> image-text shards: the way to bring a data set soho has no converter for.

Input: a folder of images and a file of rows (image path, caption, optionally split), in one of

- CSV (``.csv``) or TSV (``.tsv``): a header row naming the columns, then one caption per row. This is
  open_clip's ``--dataset-type csv`` layout; its defaults ``--csv-img-key filepath --csv-caption-key title``
  are ``image_key="filepath", caption_key="title"`` here. A caption holding the delimiter must be quoted.
- JSON lines (``.jsonl``): one object per line.
- JSON (``.json``): an array of objects, as LAVIS's caption annotation files
  (``[{"image": "val2014/...jpg", "caption": "...", "image_id": ...}, ...]``: ``image_key="image"``).

In JSON a caption may also be a list of captions. Image paths are relative to the images folder
(absolute ones are used as they are). Every row with the same image path adds a caption to one
sample; the split column (``split_key``), when the file has one, names the output split of the row
(empty: ``default_split``), and an image whose rows name two splits stays in the first one, so no
image is in two splits.

Output: per split, one sample per image, ``{"image_id": <path as written>, "captions": [...],
"source": ...}`` (docs/DATA.md, "Your own images and captions"). Rows that cannot be used are listed
in the manifest with their file and line: ``bad_record`` (no image path, a field too many or too few),
``missing_caption``, ``bad_split`` (not a usable directory name), ``split_conflict``, then, from the
writer, ``missing_image``, ``corrupt_image`` and ``duplicate_key`` (two paths that give one key).
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

from soho.data.convert.inputs import load_json, read_json_lines, require_file
from soho.data.convert.writer import Conversion, Problem, Sample, safe_key

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json"}
"""The file format each suffix means; any other suffix needs the format named."""
DELIMITERS = {"csv": ",", "tsv": "\t"}
_SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")

PathLike = Union[str, Path]


@dataclass
class CaptionRow:
    """One usable row: an image, its captions on this row, and the split it names (None: the default)."""
    image: str
    captions: List[str]
    split: Optional[str]
    key: str
    """What names the row in the manifest: ``<file name>:<line>`` (JSON arrays: ``<file name>_<index>``)."""
    where: str
    """``<file>:<line>`` (JSON arrays: ``<file>[<index>]``), for problems found later."""


def file_format(path: Path, name: Optional[str] = None) -> str:
    """``name`` if given, else the format the suffix of ``path`` means; an error naming both when neither works."""
    if name is not None:
        if name not in DELIMITERS and name not in ("jsonl", "json"):
            raise ValueError(f"unknown captions format {name!r}; expected one of csv, tsv, jsonl, json")
        return name
    if path.suffix.lower() not in FORMATS:
        raise ValueError(f"{path}: cannot tell the format from the suffix {path.suffix!r}; name it "
                         f"(csv, tsv, jsonl, json)")
    return FORMATS[path.suffix.lower()]


def _captions(value: Any) -> Optional[List[str]]:
    """The non-empty captions of a field (a string, or in JSON a list of strings); None if it is neither."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        return None
    return [caption.strip() for caption in value if caption.strip()]


def parse_row(fields: Dict[str, Any], keys: Tuple[str, str, str], key: str, where: str) -> Union[CaptionRow, Problem]:
    """A row's fields -> a :class:`CaptionRow`, or the problem that keeps it out (its ``split`` set when the
    row names a usable one)."""
    image_key, caption_key, split_key = keys
    split = fields.get(split_key)
    split = split.strip() if isinstance(split, str) else split
    if split in (None, ""):
        split = None
    elif not isinstance(split, str) or not _SPLIT_NAME.fullmatch(split):
        return Problem(key, "bad_split", f"{where}: split {split!r} is not a name of letters, digits, _ and -")
    image = fields.get(image_key)
    if not isinstance(image, str) or not image.strip():
        return Problem(key, "bad_record", f"{where}: no image path in {image_key!r} (got {image!r})", split or "")
    captions = _captions(fields.get(caption_key))
    if captions is None:
        return Problem(key, "bad_record", f"{where}: {caption_key!r} is {fields.get(caption_key)!r}, not text",
                       split or "")
    if not captions:
        return Problem(key, "missing_caption", f"{where}: {image.strip()} has an empty caption", split or "")
    return CaptionRow(image.strip(), captions, split, key, where)


def _delimited_rows(path: Path, delimiter: str, keys: Tuple[str, str, str]) -> Iterator[Union[CaptionRow, Problem]]:
    with open(path, newline="", encoding="utf-8") as stream:
        reader = csv.reader(stream, delimiter=delimiter)
        try:
            header = next(reader)
            for fields in reader:
                if not any(field.strip() for field in fields):
                    continue
                key, where = f"{path.name}:{reader.line_num}", f"{path}:{reader.line_num}"
                if len(fields) != len(header):
                    # An unquoted delimiter inside a caption: reading on would cut the caption silently.
                    yield Problem(key, "bad_record", f"{where}: {len(fields)} fields, the header has "
                                                     f"{len(header)} (quote captions that contain {delimiter!r})")
                    continue
                yield parse_row(dict(zip(header, fields)), keys, key, where)
        except (csv.Error, UnicodeDecodeError) as error:
            raise ValueError(f"{path}:{reader.line_num}: not readable as delimited text ({error})") from None


def _json_lines_rows(path: Path, keys: Tuple[str, str, str]) -> Iterator[Union[CaptionRow, Problem]]:
    for number, example in read_json_lines(path):
        if isinstance(example, Problem):
            yield example
        else:
            yield parse_row(example, keys, f"{path.name}:{number}", f"{path}:{number}")


def _json_rows(entries: List[Any], path: Path, keys: Tuple[str, str, str]) -> Iterator[Union[CaptionRow, Problem]]:
    for index, entry in enumerate(entries):
        key, where = f"{path.name}_{index}", f"{path}[{index}]"
        if not isinstance(entry, dict):
            yield Problem(key, "bad_record", f"{where}: not a JSON object")
        else:
            yield parse_row(entry, keys, key, where)


def caption_rows(path: PathLike, format_name: Optional[str] = None, image_key: str = "path",
                 caption_key: str = "caption", split_key: str = "split") -> Iterator[Union[CaptionRow, Problem]]:
    """Every row of a captions file, parsed or as the problem that keeps it out.

    The file, its format and (CSV/TSV) its header are checked here, before the first row is read:
    a missing image or caption column is an error naming the columns the file has."""
    path = Path(path)
    require_file(path, "captions file")
    name = file_format(path, format_name)
    keys = (image_key, caption_key, split_key)
    if name in DELIMITERS:
        with open(path, newline="", encoding="utf-8") as stream:
            try:
                header = next(csv.reader(stream, delimiter=DELIMITERS[name]), [])
            except (csv.Error, UnicodeDecodeError) as error:
                raise ValueError(f"{path}: cannot read its header as {name.upper()} ({error})") from None
        missing = [key for key in (image_key, caption_key) if key not in header]
        if missing:
            raise ValueError(f"{path}: no column {' or '.join(map(repr, missing))} in the header (columns: "
                             f"{', '.join(header) or 'none'}); name the image and caption columns")
        return _delimited_rows(path, DELIMITERS[name], keys)
    if name == "jsonl":
        return _json_lines_rows(path, keys)
    entries = load_json(path, "captions file")
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON array of objects (LAVIS's annotation layout); for one object "
                         f"per line name the file .jsonl")
    return _json_rows(entries, path, keys)


@dataclass
class CaptionIndex:
    """The rows of a captions file grouped into splits of images."""
    splits: Dict[str, Dict[str, List[str]]]
    """split -> image path -> captions, splits and images in the order the file first names them."""
    problems: List[Tuple[str, Problem]]
    """Every row left out, with the split it named ("" when it named none that is usable)."""
    rows: int


def index_captions(rows: Iterator[Union[CaptionRow, Problem]], default_split: str) -> CaptionIndex:
    splits: Dict[str, Dict[str, List[str]]] = {}
    split_of: Dict[str, str] = {}
    problems: List[Tuple[str, Problem]] = []
    count = 0
    for row in rows:
        count += 1
        if isinstance(row, Problem):
            problems.append((row.split, row))
            continue
        split = row.split or default_split
        first = split_of.setdefault(row.image, split)
        if first != split:
            problems.append((split, Problem(row.key, "split_conflict",
                                            f"{row.where}: {row.image} is in split {first!r} already, "
                                            f"this row puts it in {split!r}")))
            continue
        splits.setdefault(split, {}).setdefault(row.image, []).extend(row.captions)
    return CaptionIndex(splits, problems, count)


def _split_stream(images: Dict[str, List[str]], problems: List[Problem], root: Path,
                  source: str) -> Iterator[Union[Sample, Problem]]:
    yield from problems
    for image, captions in images.items():
        record = {"image_id": image, "captions": captions, "source": source}
        yield Sample(safe_key(image), record, {"": root / image})


def captions_conversion(images: PathLike, captions: PathLike, source: Optional[str] = None,
                        default_split: str = "pretrain", format_name: Optional[str] = None,
                        image_key: str = "path", caption_key: str = "caption",
                        split_key: str = "split") -> Conversion:
    """The conversion of the images under ``images`` described by the captions file ``captions``.

    ``source`` names the data set in every record (default: the captions file's stem). The whole file
    is read here, so a wrong file, format or column fails before any work, and so does a file of which
    no row is usable."""
    root, captions = Path(images), Path(captions)
    if not root.is_dir():
        raise NotADirectoryError(f"image folder not found: {root}")
    if not _SPLIT_NAME.fullmatch(default_split):
        raise ValueError(f"split {default_split!r} is not a name of letters, digits, _ and -")
    index = index_captions(caption_rows(captions, format_name, image_key, caption_key, split_key), default_split)
    if not index.rows:
        raise ValueError(f"{captions}: no caption rows")
    if not index.splits:
        examples = "; ".join(problem.detail for _, problem in index.problems[:3])
        raise ValueError(f"{captions}: none of its {index.rows} rows is usable ({examples})")
    # A row that named no usable split is listed under the first split, so every problem has one.
    first = next(iter(index.splits))
    problems: Dict[str, List[Problem]] = {split: [] for split in index.splits}
    for split, problem in index.problems:
        problems[split if split in problems else first].append(problem)
    source = source or captions.stem
    return Conversion(
        converter="captions",
        splits={split: _split_stream(images, problems[split], root, source) for split, images in index.splits.items()},
        tasks={split: "image_text" for split in index.splits},
        inputs={"images": str(root), "captions": str(captions), "source": source},
        extra={"caption_rows": index.rows,
               "captions": {split: sum(map(len, images.values())) for split, images in index.splits.items()}},
    )
