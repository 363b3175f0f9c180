"""Drawing a scene graph: a dark textured background, the objects, pixel noise; then encoding it."""
from __future__ import annotations

import functools
import io
import math
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from soho.data.synthetic.vocabulary import COLOUR_RGB


def _normalised(points: Sequence[Tuple[float, float]]) -> np.ndarray:
    """Stretch a polygon to span exactly [-1, 1] on both axes, so it fills its box."""
    p = np.asarray(points, dtype=np.float64)
    low, high = p.min(0), p.max(0)
    return (p - low) / (high - low) * 2 - 1


def _ring(n: int, radius: float, phase: float) -> List[Tuple[float, float]]:
    return [(radius * np.cos(phase + 2 * np.pi * k / n), radius * np.sin(phase + 2 * np.pi * k / n))
            for k in range(n)]


_ARM = 0.4  # half-width of the cross's arms, relative to the box half-side
SHAPE_POLYGONS = {
    "triangle": _normalised([(0, -1), (1, 1), (-1, 1)]),
    "diamond": _normalised([(0, -1), (1, 0), (0, 1), (-1, 0)]),
    "hexagon": _normalised(_ring(6, 1, 0)),
    "star": _normalised([p for pair in zip(_ring(5, 1, -np.pi / 2), _ring(5, 0.45, -np.pi / 2 + np.pi / 5))
                         for p in pair]),
    "cross": np.array([(-_ARM, -1), (_ARM, -1), (_ARM, -_ARM), (1, -_ARM), (1, _ARM), (_ARM, _ARM), (_ARM, 1),
                       (-_ARM, 1), (-_ARM, _ARM), (-1, _ARM), (-1, -_ARM), (-_ARM, -_ARM)], dtype=np.float64),
}
"""Unit polygons spanning [-1, 1]^2: every shape touches all four sides of its box."""


@functools.lru_cache(maxsize=4)
def _grid(side: int) -> np.ndarray:
    return np.mgrid[0:side, 0:side].astype(np.float32) / side


def _background(kind: str, side: int, rng: np.random.Generator) -> np.ndarray:
    """Low-contrast dark-to-grey texture; objects stay far brighter or more saturated than it."""
    base = rng.uniform(30, 100) + rng.uniform(-12, 12, size=3)
    yy, xx = _grid(side)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (math.cos(angle) * xx + math.sin(angle) * yy) - 0.5
    if kind == "gradient":
        texture = ramp * rng.uniform(20, 45)
    elif kind == "stripes":
        across = math.cos(angle + math.pi / 2) * xx + math.sin(angle + math.pi / 2) * yy
        texture = ramp * rng.uniform(0, 20) + np.sin(2 * np.pi * rng.uniform(3, 10) * across) * rng.uniform(8, 18)
    else:
        grid = rng.normal(0, 1, size=(5, 5)).astype(np.float32)
        blotches = np.asarray(Image.fromarray(grid).resize((side, side), Image.BICUBIC))
        texture = blotches * rng.uniform(8, 16)
    # Per-channel adds: broadcasting (side, side, 1) against (3,) is several times slower.
    return np.dstack([texture + np.float32(b) for b in base])


def render(scene: Dict, rng: np.random.Generator, supersample: int = 2) -> Image.Image:
    """Draw a scene graph: background, objects in list order (later on top), then pixel noise."""
    side = scene["width"]
    background = np.clip(_background(scene["background"], side, rng), 0, 255).astype(np.uint8)
    canvas = Image.fromarray(background)
    if supersample > 1:
        # Nearest is exact here: the reduce below maps untouched background back to itself.
        canvas = canvas.resize((side * supersample, side * supersample), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for obj in scene["objects"]:
        fill = tuple(int(v) for v in np.clip(np.array(COLOUR_RGB[obj["colour"]]) + rng.integers(-12, 13, 3), 0, 255))
        x0, y0, x1, y1 = (v * supersample for v in obj["box"])
        if obj["shape"] == "circle":
            draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
        else:
            unit = SHAPE_POLYGONS[obj["shape"]]
            cx, cy, half_w, half_h = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
            draw.polygon([(cx + u * half_w, cy + v * half_h) for u, v in unit], fill=fill)
    if supersample > 1:
        canvas = canvas.reduce(supersample)
    # Uniform rather than Gaussian noise: 5x cheaper to draw, and just as hard to see through.
    amplitude = rng.uniform(10, 28)
    noise = (rng.random((side, side, 3), dtype=np.float32) - 0.5) * amplitude
    noisy = np.asarray(canvas, dtype=np.float32) + noise
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def encode_image(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    if image_format == "jpg":
        # 4:4:4 chroma: with 4:2:0 a small object's colour bleeds into the background.
        image.save(buffer, format="JPEG", quality=95, subsampling=0)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()
