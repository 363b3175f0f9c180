"""Small image files for converter fixtures: real encodings, one truncated file, deterministic content."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


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
