"""Helpers for the converter tests: small image files (real encodings, one truncated), JSON lines,
and reading a converted split back."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from soho.data.shards import SkipCounter, expand_urls, read_shard


def write_image(path, width: int = 48, height: int = 32, seed: int = 0, format: str = "JPEG") -> Path:
    """A noisy RGB image (so encoders cannot shrink it to nothing) written in ``format``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=format)
    return path


def write_corrupt_image(path, width: int = 48, height: int = 32) -> Path:
    """A JPEG cut off halfway: its header reads, its pixels do not."""
    path = write_image(path, width, height, seed=99)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_lines(path: Path, lines) -> None:
    """JSON lines; a str entry is written as it is (for planting broken lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def read_split(root: Path, split: str):
    """Every raw sample of ``root/split``; the shards themselves must read cleanly."""
    skips = SkipCounter()
    samples = [s for url in expand_urls(str(Path(root) / split)) for s in read_shard(url, skips)]
    assert not skips
    return samples
