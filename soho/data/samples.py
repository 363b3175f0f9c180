"""Decoding the raw samples of a shard: the JSON record, the image, the captions.

Each decoder raises :class:`SampleError` naming why a sample cannot be used; streams count and log
these skips by reason.
"""
from __future__ import annotations

import io
import json
import zlib
from typing import Any, Dict, List, Tuple

from PIL import Image

from soho.data.shards import Sample

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


class SampleError(Exception):
    """A sample that cannot be used; ``reason`` is the counter name."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def decode_image(sample: Sample) -> Image.Image:
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise SampleError("missing_image", f"keys {sorted(k for k in sample if not k.startswith('__'))}")
    try:
        image = Image.open(io.BytesIO(sample[key]))
        image.load()
    except Exception as error:  # PIL raises many types for corrupt data
        raise SampleError("corrupt_image", repr(error)) from None
    return image.convert("RGB")


def decode_json(sample: Sample) -> Dict[str, Any]:
    if "json" not in sample:
        raise SampleError("missing_json")
    try:
        record = json.loads(sample["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SampleError("bad_json", repr(error)) from None
    if not isinstance(record, dict):
        raise SampleError("bad_json", "top level is not an object")
    return record


def record_captions(record: Dict[str, Any]) -> List[str]:
    """A record's ``captions``: a non-empty list of non-empty strings, or a ``missing_captions`` skip."""
    texts = record.get("captions")
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise SampleError("missing_captions", f"captions={texts!r}")
    return texts


def decode_captioned_image(sample: Sample) -> Tuple[Dict[str, Any], List[str], Image.Image]:
    """The JSON record, its non-empty ``captions`` and the decoded image of an image-caption sample."""
    record = decode_json(sample)
    return record, record_captions(record), decode_image(sample)


def stable_id(text: str) -> int:
    """An integer id for an image id string, identical on every rank and run."""
    return zlib.crc32(text.encode()) & 0x7FFFFFFF
