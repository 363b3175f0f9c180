"""The embedded default data: a procedurally drawn world of shapes, and text that is true of it.

Every image holds 1-4 objects (shape, colour, size) on a dark, textured, noisy background.
Its scene graph (boxes, attributes, pairwise spatial relations) is stored with every sample as
ground truth for probes. All text is generated from scene graphs through small logical forms
("claims") that :func:`holds` / :func:`pair_holds` / :func:`answer` evaluate, so captions are
true, NLVR2 labels, VE labels and VQA answers are correct by construction, and tests can check
them against the stored graphs.

Generation is a pure function of (settings, split, group index): the same seed gives
byte-identical shards whatever the number of worker processes.

Splits (sizes count samples; an image-text sample is one image):

- ``pretrain``, ``retrieval_{train,val,test}``: image + captions.
- ``nlvr2_*``: two images + a statement about both + true/false (one true and one false
  statement per image pair, so labels are exactly balanced).
- ``ve_*``: image + hypothesis + entailment/neutral/contradiction (one of each per image).
- ``vqa_*``: image + question + 10 annotator answers (``vqa_questions_per_image`` per image).
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Literal, Optional, Sequence, Tuple

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw

from soho.config import ConfigError, to_dict

GENERATOR_VERSION = 1
"""Bumped whenever the output for a given config changes, so :func:`ensure_world` regenerates."""

# ----------------------------------------------------------------------------- vocabulary

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star", "hexagon")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "cyan")
SIZES = ("small", "large")
ATTRIBUTES = ("shape", "colour", "size")
RELATIONS = ("left of", "right of", "above", "below")
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
BACKGROUNDS = ("gradient", "stripes", "blotches")

COLOUR_RGB = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (45, 95, 240), "yellow": (240, 225, 45),
    "purple": (160, 70, 210), "orange": (250, 140, 25), "white": (245, 245, 245), "cyan": (50, 215, 225),
}
"""Bright, saturated and at least ~90 apart in RGB, so no colour blends into the dark backgrounds."""
SIZE_RADIUS = {"small": 0.1, "large": 0.18}
"""Half the side of an object's box, as a fraction of the image side."""

# Surface words: the first is the plain one and the most frequent.
SHAPE_WORDS = {"circle": ("circle", "disc"), "square": ("square",), "triangle": ("triangle",),
               "diamond": ("diamond", "rhombus"), "cross": ("cross", "plus sign"), "star": ("star",),
               "hexagon": ("hexagon",)}
COLOUR_WORDS = {c: (c,) for c in COLOURS} | {"purple": ("purple", "violet"), "cyan": ("cyan", "turquoise")}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
OBJECT_NOUNS = ("object", "shape", "item", "thing")
RELATION_WORDS = {
    "left of": ("to the left of", "left of", "on the left of", "on the left side of"),
    "right of": ("to the right of", "right of", "on the right of", "on the right side of"),
    "above": ("above", "over", "higher than"),
    "below": ("below", "under", "beneath", "underneath", "lower than"),
}
BACKGROUND_WORDS = {"gradient": ("shaded", "gradient"), "stripes": ("striped",), "blotches": ("mottled", "cloudy")}
ANY_BACKGROUND_WORDS = ("dark", "noisy", "textured", "grainy")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")

VQA_ANSWERS = ("yes", "no", "0", "1", "2", "3", "4") + COLOURS + SHAPES + SIZES
"""The fixed answer set: every canonical VQA ``answer`` is one of these."""
VQA_ANSWER_SYNONYMS = {
    "yes": ("yeah", "yep"), "no": ("nope",), "0": ("zero", "none"), "1": ("one",), "2": ("two",),
    "3": ("three",), "4": ("four",), "red": ("crimson",), "green": ("lime",), "blue": ("dark blue",),
    "yellow": ("gold",), "purple": ("violet",), "orange": ("amber",), "white": ("light grey",),
    "cyan": ("turquoise", "light blue"), "circle": ("disc", "round"), "square": ("box",),
    "triangle": ("triangular",), "diamond": ("rhombus",), "cross": ("plus", "plus sign"),
    "star": ("star shape",), "hexagon": ("hexagonal",), "small": ("little", "tiny"), "large": ("big",),
}
"""What a careless annotator writes instead; only ever in the ``answers`` list, never as ``answer``."""
VQA_ANSWER_TYPES = ("yes/no", "number", "other")
VQA_QUESTION_TYPES = ("colour", "shape", "size", "count", "yes/no", "relation")
VE_LABELS = ("entailment", "neutral", "contradiction")

DEFAULT_SPLIT_SIZES = {
    "pretrain": 20000,
    "retrieval_train": 5000, "retrieval_val": 1000, "retrieval_test": 1000,
    "nlvr2_train": 10000, "nlvr2_val": 1000, "nlvr2_test": 1000,
    "ve_train": 10000, "ve_val": 1000, "ve_test": 1000,
    "vqa_train": 20000, "vqa_val": 2000, "vqa_test": 2000,
}
SPLITS = tuple(DEFAULT_SPLIT_SIZES)
TASKS = ("pretrain", "retrieval", "nlvr2", "ve", "vqa")


def split_task(split: str) -> str:
    """``"vqa_val"`` -> ``"vqa"``; ``"pretrain"`` -> ``"pretrain"``."""
    return split.rsplit("_", 1)[0] if "_" in split else split


@dataclass
class SyntheticWorldConfig:
    seed: int = 0
    image_size: int = 64
    supersample: int = 2
    """Objects are drawn at this multiple of the image size and box-filtered down (anti-aliasing)."""
    min_objects: int = 1
    max_objects: int = 4
    max_iou: float = 0.0
    """Most IoU between two boxes of an image grown by 1 px (0: a background gap between every
    two objects); no box ever covers another's centre."""
    relation_margin: float = 0.1
    """A pair is in a relation only if its box centres differ by more than this fraction of the side."""
    min_captions: int = 3
    max_captions: int = 5
    retrieval_captions: int = 5
    vqa_questions_per_image: int = 3
    vqa_noise_fraction: float = 0.1
    """Fraction of VQA questions where 1-4 of the 10 annotators wrote a synonym of the answer."""
    image_format: Literal["jpg", "png"] = "jpg"
    split_sizes: Dict[str, int] = field(default_factory=lambda: dict(DEFAULT_SPLIT_SIZES))
    """Samples per split; a split left out is not generated."""
    shard_size: int = 1000
    """Samples per shard (approximate for multi-sample groups: a group never straddles shards)."""
    num_workers: int = 2
    """Processes writing shards; the output does not depend on it."""
    tokenizer_vocab_size: int = 1000

    def __post_init__(self):
        # Small objects would be under 3 px across below this, and shapes unrecognisable.
        if self.image_size < 32:
            raise ConfigError(f"image_size must be >= 32, got {self.image_size}")
        if not 1 <= self.supersample <= 4:
            raise ConfigError(f"supersample must be in [1, 4], got {self.supersample}")
        # Two images of 4 objects is the most the number words (up to "eight") can count.
        if not 1 <= self.min_objects <= self.max_objects <= 4:
            raise ConfigError(f"objects per image must satisfy 1 <= min_objects <= max_objects <= 4, "
                              f"got {self.min_objects}..{self.max_objects}")
        if not 0.0 <= self.max_iou < 1.0:
            raise ConfigError(f"max_iou must be in [0, 1), got {self.max_iou}")
        if not 0.0 <= self.relation_margin < 0.5:
            raise ConfigError(f"relation_margin must be in [0, 0.5), got {self.relation_margin}")
        if not 1 <= self.min_captions <= self.max_captions <= 10:
            raise ConfigError(f"captions per image must satisfy 1 <= min_captions <= max_captions <= 10, "
                              f"got {self.min_captions}..{self.max_captions}")
        if not 1 <= self.retrieval_captions <= 10:
            raise ConfigError(f"retrieval_captions must be in [1, 10], got {self.retrieval_captions}")
        if not 1 <= self.vqa_questions_per_image <= 10:
            raise ConfigError(f"vqa_questions_per_image must be in [1, 10], got {self.vqa_questions_per_image}")
        if not 0.0 <= self.vqa_noise_fraction <= 1.0:
            raise ConfigError(f"vqa_noise_fraction must be in [0, 1], got {self.vqa_noise_fraction}")
        unknown = sorted(set(self.split_sizes) - set(SPLITS))
        if unknown:
            raise ConfigError(f"unknown split(s) in split_sizes: {', '.join(unknown)} (known: {', '.join(SPLITS)})")
        negative = sorted(k for k, v in self.split_sizes.items() if v < 0)
        if negative:
            raise ConfigError(f"split sizes must be >= 0: {', '.join(negative)}")
        if self.shard_size < 1 or self.num_workers < 1:
            raise ConfigError(f"shard_size and num_workers must be >= 1, got {self.shard_size}, {self.num_workers}")
        if self.tokenizer_vocab_size < 100:
            raise ConfigError(f"tokenizer_vocab_size must be >= 100, got {self.tokenizer_vocab_size}")

    def settings(self) -> Dict[str, Any]:
        """Everything the generated bytes depend on (not the worker count)."""
        data = to_dict(self)
        del data["num_workers"]
        return {"generator_version": GENERATOR_VERSION, **data}

    def group_size(self, split: str) -> int:
        """Samples made from one drawn image (or image pair, for NLVR2)."""
        return {"nlvr2": 2, "ve": len(VE_LABELS), "vqa": self.vqa_questions_per_image}.get(split_task(split), 1)


# ----------------------------------------------------------------------------- scenes

def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def box_centre(box: Sequence[float]) -> Tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _inside(point: Tuple[float, float], box: Sequence[float]) -> bool:
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


def _grown(box: Sequence[float], by: float) -> List[float]:
    return [box[0] - by, box[1] - by, box[2] + by, box[3] + by]


def _fits(box: List[float], others: List[Dict], max_iou: float) -> bool:
    # Boxes are compared grown by a pixel, so with max_iou=0 a line of background separates any
    # two objects and same-coloured neighbours do not merge into one blob (counts stay visible).
    # The centre rule keeps every object's middle visible when overlaps are allowed.
    return all(_iou(_grown(box, 1), _grown(o["box"], 1)) <= max_iou and not _inside(box_centre(box), o["box"])
               and not _inside(box_centre(o["box"]), box) for o in others)


def _pick_attribute(rng: np.random.Generator, values: Sequence[str], objects: List[Dict], key: str) -> str:
    # Repeating an attribute already in the image now and then makes counts above one common
    # ("two red objects"), which uniform draws from 8 colours x 7 shapes would rarely give.
    if objects and rng.random() < 0.25:
        return objects[int(rng.integers(len(objects)))][key]
    return values[int(rng.integers(len(values)))]


def relations_of(objects: List[Dict], margin: float) -> List[Dict]:
    """Every (subject, predicate, object) whose box centres differ by more than ``margin`` pixels."""
    relations = []
    for a in objects:
        ax, ay = box_centre(a["box"])
        for b in objects:
            if a is b:
                continue
            bx, by = box_centre(b["box"])
            for predicate, gap in (("left of", bx - ax), ("right of", ax - bx), ("above", by - ay), ("below", ay - by)):
                if gap > margin:
                    relations.append({"subject": a["id"], "predicate": predicate, "object": b["id"]})
    return relations


def _place(rng: np.random.Generator, size: str, objects: List[Dict], config: SyntheticWorldConfig,
           attempts: int = 50) -> Optional[List[float]]:
    """A box of the given size that fits among ``objects``, by rejection sampling; None if none is found."""
    side = config.image_size
    half = SIZE_RADIUS[size] * side
    for _ in range(attempts):
        cx, cy = rng.uniform(half, side - half, size=2)
        box = [round(float(v), 2) for v in (cx - half, cy - half, cx + half, cy + half)]
        if _fits(box, objects, config.max_iou):
            return box
    return None


def sample_scene(rng: np.random.Generator, config: SyntheticWorldConfig) -> Dict:
    """A scene graph: objects with boxes placed by rejection sampling, and their relations."""
    side = config.image_size
    objects: List[Dict] = []
    for _ in range(int(rng.integers(config.min_objects, config.max_objects + 1))):
        size = SIZES[int(rng.integers(len(SIZES)))]
        box = _place(rng, size, objects, config)
        if box is None and size != "small":  # a crowded image may still have room for a small one
            size, box = "small", _place(rng, "small", objects, config)
        if box is None:
            break
        objects.append({"id": len(objects), "shape": _pick_attribute(rng, SHAPES, objects, "shape"),
                        "colour": _pick_attribute(rng, COLOURS, objects, "colour"), "size": size, "box": box})
    return {"width": side, "height": side, "background": BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))],
            "objects": objects, "relations": relations_of(objects, config.relation_margin * side)}


# ----------------------------------------------------------------------------- rendering

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


# ----------------------------------------------------------------------------- logic

@dataclass(frozen=True)
class Description:
    """The objects a noun phrase picks out; an attribute left as None matches anything."""

    shape: Optional[str] = None
    colour: Optional[str] = None
    size: Optional[str] = None

    def matches(self, obj: Dict) -> bool:
        return ((self.shape is None or obj["shape"] == self.shape)
                and (self.colour is None or obj["colour"] == self.colour)
                and (self.size is None or obj["size"] == self.size))

    def select(self, scene: Dict) -> List[Dict]:
        return [o for o in scene["objects"] if self.matches(o)]

    @property
    def attributes(self) -> Tuple[str, ...]:
        return tuple(a for a in ATTRIBUTES if getattr(self, a) is not None)


# Claims are tuples: ("exists", d), ("absent", d), ("count", d, n), ("attribute", d, attr, value)
# (d picks exactly one object and it has that value), ("related", d1, predicate, d2) (some d1 is in
# that relation to some other d2), ("background", kind), ("and", claim, ...). Pair claims (NLVR2):
# ("total", d, n), ("compare", d, "more"|"fewer"|"same") (left vs right), ("both"|"exactly_one"|
# "neither", d), ("side", "left"|"right", claim), ("and", ...). ("neutral", d) marks a VE
# hypothesis the image cannot decide, about an object matching d (or the whole picture if None).

def related(scene: Dict, subject: Dict, predicate: str, obj: Dict) -> bool:
    return any(r["subject"] == subject["id"] and r["predicate"] == predicate and r["object"] == obj["id"]
               for r in scene["relations"])


def holds(claim: Tuple, scene: Dict) -> bool:
    """Whether a single-image claim is true of a scene graph (a closed world: what is not drawn is absent)."""
    kind = claim[0]
    if kind == "and":
        return all(holds(c, scene) for c in claim[1:])
    if kind == "exists":
        return bool(claim[1].select(scene))
    if kind == "absent":
        return not claim[1].select(scene)
    if kind == "count":
        return len(claim[1].select(scene)) == claim[2]
    if kind == "attribute":
        chosen = claim[1].select(scene)
        return len(chosen) == 1 and chosen[0][claim[2]] == claim[3]
    if kind == "related":
        _, first, predicate, second = claim
        return any(related(scene, a, predicate, b) for a in first.select(scene) for b in second.select(scene)
                   if a is not b)
    if kind == "background":
        return scene["background"] == claim[1]
    raise ValueError(f"not a single-image claim: {claim!r}")


def _compare(a: int, b: int) -> str:
    return "more" if a > b else "fewer" if a < b else "same"


def _presence(description: Description, left: Dict, right: Dict) -> str:
    found = bool(description.select(left)) + bool(description.select(right))
    return ("neither", "exactly_one", "both")[found]


def pair_holds(claim: Tuple, left: Dict, right: Dict) -> bool:
    """Whether an NLVR2 claim is true of a (left, right) pair of scene graphs."""
    kind = claim[0]
    if kind == "and":
        return all(pair_holds(c, left, right) for c in claim[1:])
    if kind == "side":
        return holds(claim[2], left if claim[1] == "left" else right)
    if kind == "total":
        return len(claim[1].select(left)) + len(claim[1].select(right)) == claim[2]
    if kind == "compare":
        return _compare(len(claim[1].select(left)), len(claim[1].select(right))) == claim[2]
    if kind in ("both", "exactly_one", "neither"):
        return _presence(claim[1], left, right) == kind
    raise ValueError(f"not a pair claim: {claim!r}")


# VQA programs: ("query", d, attr) reads attr off the one object d picks; ("count", d);
# ("verify", claim) answers yes/no; ("query_related", predicate, d, attr) reads attr off the one
# object in that relation to the one object d picks.

def answer(program: Tuple, scene: Dict) -> Optional[str]:
    """The answer to a VQA program, or None where its presupposition fails (nothing or several picked)."""
    kind = program[0]
    if kind == "count":
        return str(len(program[1].select(scene)))
    if kind == "verify":
        return "yes" if holds(program[1], scene) else "no"
    if kind == "query":
        chosen = program[1].select(scene)
        return chosen[0][program[2]] if len(chosen) == 1 else None
    if kind == "query_related":
        _, predicate, reference, attribute = program
        anchors = reference.select(scene)
        if len(anchors) != 1:
            return None
        found = [o for o in scene["objects"] if o is not anchors[0] and related(scene, o, predicate, anchors[0])]
        return found[0][attribute] if len(found) == 1 else None
    raise ValueError(f"not a VQA program: {program!r}")


# ----------------------------------------------------------------------------- language

def _choice(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _cdf(weights: Sequence[float]) -> np.ndarray:
    cdf = np.cumsum(weights, dtype=np.float64) / np.sum(weights)
    cdf[-1] = 1.0  # rounding must never leave a draw past the end
    return cdf


def _weighted(rng: np.random.Generator, cdf: np.ndarray) -> int:
    return int(np.searchsorted(cdf, rng.random(), side="right"))


def _say(rng: np.random.Generator, words: Sequence[str]) -> str:
    """A wording: the plain first one 60 % of the time, as people mostly use the common word."""
    if len(words) == 1 or rng.random() < 0.6:
        return words[0]
    return words[1 + int(rng.integers(len(words) - 1))]


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


def _with_article(article: str, phrase: str) -> str:
    if article == "a" and phrase[0] in "aeiou":
        article = "an"
    return f"{article} {phrase}" if article else phrase


def noun_phrase(d: Description, rng: np.random.Generator, article: str = "a", plural: bool = False,
                nouns: Sequence[str] = OBJECT_NOUNS) -> str:
    """``a small red circle``, ``the cyan object``, ``large stars`` (size, colour, noun); ``nouns``
    name an object of any shape."""
    words = []
    if d.size:
        words.append(_say(rng, SIZE_WORDS[d.size]))
    if d.colour:
        words.append(_say(rng, COLOUR_WORDS[d.colour]))
    noun = _say(rng, SHAPE_WORDS[d.shape]) if d.shape else _say(rng, nouns)
    words.append(_plural(noun) if plural else noun)
    return _with_article(article, " ".join(words))


def count_phrase(n: int, d: Description, rng: np.random.Generator) -> str:
    """``no red circles``, ``a single star``, ``exactly three objects``."""
    if n == 0:
        return "no " + noun_phrase(d, rng, "", plural=True)
    if n == 1:
        return f"{_choice(rng, ('one', 'one', 'a single', 'exactly one', 'only one'))} {noun_phrase(d, rng, '')}"
    return f"{_choice(rng, ('', '', 'exactly ', 'precisely '))}{NUMBER_WORDS[n]} {noun_phrase(d, rng, '', plural=True)}"


def _be(n: int) -> str:
    return "is" if n == 1 else "are"


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _full(obj: Dict) -> Description:
    return Description(obj["shape"], obj["colour"], obj["size"])


def _partial(obj: Dict, rng: np.random.Generator, exclude: Sequence[str] = ()) -> Description:
    """Some of an object's attributes (at least one), the shape most often, as people name things."""
    keep = {a: a not in exclude and rng.random() < p for a, p in (("shape", 0.8), ("colour", 0.6), ("size", 0.35))}
    if not any(keep.values()):
        keep[next(a for a in ("shape", "colour", "size") if a not in exclude)] = True
    return Description(**{a: obj[a] if keep[a] else None for a in ATTRIBUTES})


_SUBSETS = tuple(sorted((tuple(a for i, a in enumerate(ATTRIBUTES) if mask >> i & 1)
                         for mask in range(1, 2 ** len(ATTRIBUTES))), key=len))
"""Every non-empty set of attributes, smallest first."""


def _unique(obj: Dict, scene: Dict, rng: np.random.Generator, exclude: Sequence[str] = ()) -> Optional[Description]:
    """A description that picks out ``obj`` alone (usually a shortest one), or None if none does."""
    options = []
    for subset in _SUBSETS:
        d = Description(**{a: obj[a] for a in subset})
        if not set(subset) & set(exclude) and len(d.select(scene)) == 1:
            options.append(d)
    if not options:
        return None
    shortest = min(len(d.attributes) for d in options)
    # Mostly the shortest, as people say "the star" rather than "the small red star".
    if rng.random() < 0.7:
        options = [d for d in options if len(d.attributes) == shortest]
    return _choice(rng, options)


def _random_description(rng: np.random.Generator) -> Description:
    """Attributes drawn from the whole vocabulary, so usually of no object in the image."""
    d = Description(shape=_choice(rng, SHAPES), colour=_choice(rng, COLOURS) if rng.random() < 0.6 else None,
                    size=_choice(rng, SIZES) if rng.random() < 0.2 else None)
    return d if rng.random() < 0.8 else Description(colour=_choice(rng, COLOURS))


def _absent(scene: Dict, rng: np.random.Generator) -> Optional[Description]:
    for _ in range(10):
        d = _random_description(rng)
        if not d.select(scene):
            return d
    return None


def _count_subject(objects: List[Dict], rng: np.random.Generator) -> Description:
    """What a count is about: some attributes of an object that is there, or all objects."""
    return Description() if rng.random() < 0.3 else _partial(_choice(rng, objects), rng)


def _candidates(objects: List[Dict], rng: np.random.Generator) -> List[Description]:
    """Every description of some object there, all objects, and one of (usually) nothing there.
    Kept in first-seen order: a set would iterate in a hash order that changes between processes."""
    found = dict.fromkeys([Description()] + [Description(**{a: o[a] for a in subset})
                                             for o in objects for subset in _SUBSETS])
    found[_random_description(rng)] = None
    return list(found)


def _count_claim(scene: Dict, rng: np.random.Generator, truth: bool) -> Optional[Tuple[Description, int]]:
    """A subject and a number that is (``truth``) or is not its count in ``scene``.

    The number comes first, as the count of a random subject, and the subject is then chosen to
    fit: true and false claims then state each number equally often, so it gives nothing away.
    """
    n = len(_count_subject(scene["objects"], rng).select(scene))
    pool = [d for d in _candidates(scene["objects"], rng) if (len(d.select(scene)) == n) == truth]
    return (_choice(rng, pool), n) if pool else None


Statement = Tuple[str, Tuple]

OBJECT_TEMPLATES = (
    "there is {np}", "{np}", "an image of {np}", "an image showing {np}", "a picture of {np}", "a photo of {np}",
    "a drawing of {np}", "an illustration of {np}", "this image contains {np}", "the picture includes {np}",
    "we can see {np}", "i can see {np}", "{np} is visible", "{np} can be seen", "a scene with {np}",
    "{np} is shown", "{np} is depicted here", "the image features {np}",
)
LIST_TEMPLATES = ("{np}", "there is {np}", "an image of {np}", "a picture of {np}", "a photo of {np}",
                  "this image contains {np}", "we can see {np}", "{np} are visible", "a scene with {np}",
                  "the image features {np}", "{np} are shown")
RELATION_TEMPLATES = ("{a} {rel} {b}", "there is {a} {rel} {b}", "{a} is {rel} {b}", "an image with {a} {rel} {b}",
                      "a picture of {a} {rel} {b}", "we can see {a} {rel} {b}", "{a} placed {rel} {b}")
DEFINITE_RELATION_TEMPLATES = ("{a} is {rel} {b}", "{a} sits {rel} {b}", "{a} lies {rel} {b}",
                               "{a} appears {rel} {b}", "{a} is located {rel} {b}", "{a} is positioned {rel} {b}")
COUNT_TEMPLATES = (
    "there {be} {cnp}", "there {be} {cnp} in the image", "there {be} {cnp} in total", "the picture contains {cnp}",
    "the image shows {cnp}", "an image with {cnp}", "{cnp} {be} visible", "{cnp} {be} shown", "we can see {cnp}",
    "i count {cnp}", "altogether there {be} {cnp}", "this picture has {cnp}",
)
ABSENT_TEMPLATES = ("there is no {sg}", "there are no {pl}", "the image contains no {pl}",
                    "the picture does not show {np}", "no {sg} can be seen", "you cannot see {np}")


def _caption_object(scene: Dict, rng: np.random.Generator) -> Statement:
    d = _partial(_choice(rng, scene["objects"]), rng)
    text, claim = _choice(rng, OBJECT_TEMPLATES).format(np=noun_phrase(d, rng)), ("exists", d)
    if rng.random() < 0.25:
        if rng.random() < 0.5:
            word = _say(rng, BACKGROUND_WORDS[scene["background"]])
            claim = ("and", claim, ("background", scene["background"]))
        else:
            word = _choice(rng, ANY_BACKGROUND_WORDS)
        text += f" on {_with_article('a', word)} background"
    return text, claim


def _relation_phrase(scene: Dict, fact: Dict, predicate: str, rng: np.random.Generator,
                     definite: bool) -> Optional[Statement]:
    """``{subject} {predicate} {object}`` for one fact's objects, with definite NPs only where unique."""
    by_id = {o["id"]: o for o in scene["objects"]}
    a, b = by_id[fact["subject"]], by_id[fact["object"]]
    rel = _say(rng, RELATION_WORDS[predicate])
    if definite:
        da, db = _unique(a, scene, rng), _unique(b, scene, rng)
        if da is None or db is None:
            return None
        text = _choice(rng, DEFINITE_RELATION_TEMPLATES).format(
            a=noun_phrase(da, rng, "the"), rel=rel, b=noun_phrase(db, rng, "the"))
    else:
        da, db = _partial(a, rng), _partial(b, rng)
        text = _choice(rng, RELATION_TEMPLATES).format(a=noun_phrase(da, rng), rel=rel, b=noun_phrase(db, rng))
    return text, ("related", da, predicate, db)


def _caption_relation(scene: Dict, rng: np.random.Generator) -> Optional[Statement]:
    if not scene["relations"]:
        return None
    fact = _choice(rng, scene["relations"])
    definite = rng.random() < 0.5
    return _relation_phrase(scene, fact, fact["predicate"], rng, definite) or \
        _relation_phrase(scene, fact, fact["predicate"], rng, False)


def _count_statement(d: Description, n: int, rng: np.random.Generator) -> Statement:
    text = _choice(rng, COUNT_TEMPLATES).format(cnp=count_phrase(n, d, rng), be=_be(n))
    return text, ("count", d, n)


def _caption_total(scene: Dict, rng: np.random.Generator) -> Statement:
    return _count_statement(Description(), len(scene["objects"]), rng)


def _caption_group(scene: Dict, rng: np.random.Generator) -> Statement:
    d = _partial(_choice(rng, scene["objects"]), rng)
    return _count_statement(d, len(d.select(scene)), rng)


def _caption_breakdown(scene: Dict, rng: np.random.Generator) -> Optional[Statement]:
    """``there are two red objects and one blue object``: every colour (or shape) with its count."""
    if len(scene["objects"]) < 2:
        return None
    attribute = _choice(rng, ("colour", "shape"))
    values = sorted({o[attribute] for o in scene["objects"]})
    values = [values[i] for i in rng.permutation(len(values))]
    groups = [Description(**{attribute: v}) for v in values]
    counts = [len(d.select(scene)) for d in groups]
    listed = _join([count_phrase(n, d, rng) for d, n in zip(groups, counts)])
    template = _choice(rng, ("there {be} {list}", "the image shows {list}", "the picture contains {list}",
                             "{list}", "we can see {list}"))
    return template.format(be=_be(counts[0]), list=listed), ("and", *(("count", d, n) for d, n in zip(groups, counts)))


def _caption_list(scene: Dict, rng: np.random.Generator, detailed: bool = False) -> Statement:
    """Every object, fully described (``detailed``) or partly, optionally after the total count."""
    objects = [scene["objects"][i] for i in rng.permutation(len(scene["objects"]))]
    descriptions = [_full(o) if detailed or rng.random() < 0.5 else _partial(o, rng) for o in objects]
    listed = _join([noun_phrase(d, rng) for d in descriptions])
    claims = [("exists", d) for d in descriptions]
    n = len(objects)
    if n > 1 and rng.random() < 0.4:
        text = f"{count_phrase(n, Description(), rng)}: {listed}"
        claims.append(("count", Description(), n))
    else:
        text = _choice(rng, OBJECT_TEMPLATES if n == 1 else LIST_TEMPLATES).format(np=listed)
    return text, ("and", *claims)


def _attribute_statement(obj: Dict, attribute: str, value: str, scene: Dict,
                         rng: np.random.Generator) -> Optional[Statement]:
    """``the circle is red``, ``the red object is a star``, ``the blue star is small``."""
    d = _unique(obj, scene, rng, exclude=(attribute,))
    if d is None:
        return None
    subject = noun_phrase(d, rng, "the")
    if attribute == "shape":
        predicate = noun_phrase(Description(shape=value), rng, "a")
    elif attribute == "colour":
        predicate = _say(rng, COLOUR_WORDS[value])
    else:
        predicate = _say(rng, SIZE_WORDS[value])
    verb = _choice(rng, ("is", "is", "looks", "appears to be")) if attribute != "shape" else "is"
    return f"{subject} {verb} {predicate}", ("attribute", d, attribute, value)


def _caption_attribute(scene: Dict, rng: np.random.Generator) -> Optional[Statement]:
    obj = _choice(rng, scene["objects"])
    attribute = _choice(rng, ATTRIBUTES)
    return _attribute_statement(obj, attribute, obj[attribute], scene, rng)


def _statement_absent(scene: Dict, rng: np.random.Generator, d: Optional[Description] = None) -> Optional[Statement]:
    d = d or _absent(scene, rng)
    if d is None:
        return None
    text = _choice(rng, ABSENT_TEMPLATES).format(sg=noun_phrase(d, rng, ""), pl=noun_phrase(d, rng, "", plural=True),
                                                 np=noun_phrase(d, rng))
    return text, ("absent", d)


CAPTION_KINDS = ((_caption_object, 3), (_caption_relation, 3), (_caption_total, 1), (_caption_group, 2),
                 (_caption_breakdown, 1), (_caption_list, 1), (_caption_attribute, 2))
_CAPTION_CDF = _cdf([w for _, w in CAPTION_KINDS])


def _true_statement(scene: Dict, rng: np.random.Generator) -> Statement:
    while True:
        made = CAPTION_KINDS[_weighted(rng, _CAPTION_CDF)][0](scene, rng)
        if made is not None:
            return made


def captions_for(scene: Dict, rng: np.random.Generator, count: int) -> List[Statement]:
    """``count`` distinct true captions, in random order. One lists every object with all its
    attributes, so each image has at least one caption specific enough for retrieval."""
    captions = [_caption_list(scene, rng, detailed=True)]
    seen = {captions[0][0]}
    for _ in range(50 * count):
        if len(captions) == count:
            break
        text, claim = _true_statement(scene, rng)
        if text not in seen:
            seen.add(text)
            captions.append((text, claim))
    while len(captions) < count:  # only a tiny scene with a large count could run out of wordings
        captions.append(_true_statement(scene, rng))
    return [captions[i] for i in rng.permutation(count)]


# ----------------------------------------------------------------------------- NLVR2

SIDES = ("left", "right")
TOTAL_TEMPLATES = ("there {be} {cnp} in total", "in total there {be} {cnp}", "the two images contain {cnp} altogether",
                   "together the images show {cnp}", "across both images there {be} {cnp}",
                   "the images contain {cnp} in total")
COMPARE_TEMPLATES = {
    "more": ("the {side} image has more {pl} than the {other} image", "the {side} image contains more {pl} than the "
             "{other} one", "there are more {pl} in the {side} image than in the {other} image"),
    "fewer": ("the {side} image has fewer {pl} than the {other} image", "the {side} image contains fewer {pl} than "
              "the {other} one", "there are fewer {pl} in the {side} image than in the {other} image"),
    "same": ("both images have the same number of {pl}", "the two images contain equally many {pl}",
             "the left and right images have the same number of {pl}"),
}
PRESENCE_TEMPLATES = {
    "both": ("both images contain {np}", "each image has at least one {sg}", "there is {np} in both images",
             "{np} appears in each image", "both pictures show {np}"),
    "exactly_one": ("exactly one image contains {np}", "only one of the images has {np}",
                    "{np} appears in just one of the two images", "one image has {np} and the other does not"),
    "neither": ("neither image contains {np}", "no image has {np}", "there is no {sg} in either image",
                "{np} appears in neither image"),
}
SIDES_TEMPLATES = ("the left image has {l} and the right image has {r}",
                   "there {lbe} {l} in the left image and {r} in the right one",
                   "the left picture shows {l}, while the right picture shows {r}",
                   "in the left image there {lbe} {l}, and in the right image there {rbe} {r}")


def _pair_description(left: Dict, right: Dict, rng: np.random.Generator) -> Description:
    """Mostly attributes of an object in one of the images, so statements are about what is there."""
    if rng.random() < 0.2:
        return _random_description(rng)
    return _count_subject(left["objects"] + right["objects"], rng)


def _nlvr2_total(left, right, rng, target: bool, form: str) -> Optional[Statement]:
    # As in _count_claim: the number first, then a subject whose total fits the label.
    n = sum(len(_pair_description(left, right, rng).select(s)) for s in (left, right))
    pool = [d for d in _candidates(left["objects"] + right["objects"], rng)
            if (len(d.select(left)) + len(d.select(right)) == n) == target]
    if n == 0 or not pool:
        return None
    d = _choice(rng, pool)
    return _choice(rng, TOTAL_TEMPLATES).format(be=_be(n), cnp=count_phrase(n, d, rng)), ("total", d, n)


def _nlvr2_compare(left, right, rng, target: bool, op: str) -> Optional[Statement]:
    pool = [d for d in _candidates(left["objects"] + right["objects"], rng)
            if (d.select(left) or d.select(right))
            and (_compare(len(d.select(left)), len(d.select(right))) == op) == target]
    if not pool:
        return None
    d, side = _choice(rng, pool), _choice(rng, SIDES)
    # "the right image has fewer X than the left" is the claim "left has more".
    said = {"more": "fewer", "fewer": "more", "same": "same"}[op] if side == "right" else op
    text = _choice(rng, COMPARE_TEMPLATES[said]).format(side=side, other="left" if side == "right" else "right",
                                                        pl=noun_phrase(d, rng, "", plural=True))
    return text, ("compare", d, op)


def _nlvr2_presence(left, right, rng, target: bool, kind: str) -> Optional[Statement]:
    pool = [d for d in _candidates(left["objects"] + right["objects"], rng)[1:]  # "an object" is no test
            if (_presence(d, left, right) == kind) == target]
    if not pool:
        return None
    d = _choice(rng, pool)
    text = _choice(rng, PRESENCE_TEMPLATES[kind]).format(np=noun_phrase(d, rng), sg=noun_phrase(d, rng, ""))
    return text, (kind, d)


def _side_fact(scene: Dict, rng: np.random.Generator, true: bool) -> Optional[Tuple[str, str, Tuple]]:
    """(phrase, verb, claim) about one image: ``two red objects`` or ``a star``, true or made false."""
    if rng.random() < 0.5:
        made = _count_claim(scene, rng, true)
        if made is None:
            return None
        d, n = made
        return count_phrase(n, d, rng), _be(n), ("count", d, n)
    d = _partial(_choice(rng, scene["objects"]), rng) if true else _absent(scene, rng)
    return None if d is None else (noun_phrase(d, rng), "is", ("exists", d))


def _nlvr2_sides(left, right, rng, target: bool, form: str) -> Optional[Statement]:
    wrong = None if target else _choice(rng, SIDES)
    facts = [_side_fact(scene, rng, side != wrong) for side, scene in zip(SIDES, (left, right))]
    if None in facts:
        return None
    (left_text, lbe, lc), (right_text, rbe, rc) = facts
    text = _choice(rng, SIDES_TEMPLATES).format(l=left_text, r=right_text, lbe=lbe, rbe=rbe)
    return text, ("and", ("side", "left", lc), ("side", "right", rc))


NLVR2_FORMS = ((_nlvr2_total, "total", 2), (_nlvr2_compare, "more", 1), (_nlvr2_compare, "fewer", 1),
               (_nlvr2_compare, "same", 1), (_nlvr2_presence, "both", 1), (_nlvr2_presence, "exactly_one", 1),
               (_nlvr2_presence, "neither", 1), (_nlvr2_sides, "sides", 2))
_NLVR2_CDF = _cdf([w for *_, w in NLVR2_FORMS])


def nlvr2_statement(left: Dict, right: Dict, rng: np.random.Generator, target: bool) -> Statement:
    """A statement about both images whose truth value is ``target`` (checked with :func:`pair_holds`).

    The form ("exactly one image contains ...") is drawn first and only then a statement of
    that form with the wanted truth value, so every form is true about as often as false and
    the label cannot be read off the wording alone.
    """
    while True:
        build, form, _ = NLVR2_FORMS[_weighted(rng, _NLVR2_CDF)]
        for _ in range(20):
            made = build(left, right, rng, target, form)
            if made is not None and pair_holds(made[1], left, right) == target:
                return made


# ----------------------------------------------------------------------------- VE

NEUTRAL_OBJECT_TEMPLATES = (
    "{ref} is made of {material}", "{ref} was cut out of {material}", "{ref} is {feel}",
    "{ref} feels {feel}", "{ref} belongs to {owner}", "{ref} smells like {smell}", "{ref} is {motion}",
    "{owner} painted {ref} {time}", "{ref} weighs more than a {thing}", "a {animal} is hiding behind {ref}",
)
NEUTRAL_SCENE_TEMPLATES = (
    "the picture was taken {time}", "this image was made by {owner}", "the image was printed on {material}",
    "it is {weather} outside", "the artist was {mood} when drawing this", "the shapes were drawn {time}",
    "this picture hangs in a {place}",
)
NEUTRAL_WORDS = {
    "material": ("wood", "metal", "glass", "paper", "plastic", "stone", "clay", "rubber"),
    "feel": ("heavy", "warm", "cold", "soft", "hard", "wet", "fragile", "expensive", "old", "sticky"),
    "owner": ("a child", "my neighbour", "the teacher", "an old man", "a famous artist", "a young student"),
    "smell": ("flowers", "soap", "fresh bread", "the sea"),
    "motion": ("spinning slowly", "about to fall", "floating in water", "vibrating", "melting"),
    "time": ("at night", "in the morning", "in winter", "on a sunny day", "yesterday", "last summer"),
    "thing": ("feather", "brick", "car", "coin"),
    "animal": ("cat", "mouse", "bird", "dog"),
    "weather": ("raining", "snowing", "windy", "hot"),
    "mood": ("happy", "sad", "tired", "bored"),
    "place": ("museum", "classroom", "kitchen", "gallery"),
}
"""Things the renderer never draws, so an image can neither confirm nor rule them out."""


def _exists_statement(d: Description, rng: np.random.Generator) -> Statement:
    return _choice(rng, OBJECT_TEMPLATES).format(np=noun_phrase(d, rng)), ("exists", d)


def _ve_statement(scene: Dict, rng: np.random.Generator, form: str, truth: bool) -> Optional[Statement]:
    """A hypothesis of the given form, true or provably false. The false ones: something absent,
    denying something present, a wrong count, a wrong attribute of a uniquely described object,
    a reversed relation between two uniquely described objects."""
    obj = _choice(rng, scene["objects"])
    if form == "exists":
        d = _partial(obj, rng) if truth else _absent(scene, rng)
        return None if d is None else _exists_statement(d, rng)
    if form == "absent":
        return _statement_absent(scene, rng, None if truth else _partial(obj, rng))
    if form == "count":
        made = _count_claim(scene, rng, truth)
        return None if made is None else _count_statement(*made, rng)
    if form == "attribute":
        attribute = _choice(rng, ATTRIBUTES)
        values = {"shape": SHAPES, "colour": COLOURS, "size": SIZES}[attribute]
        value = obj[attribute] if truth else _choice(rng, [v for v in values if v != obj[attribute]])
        return _attribute_statement(obj, attribute, value, scene, rng)
    if not scene["relations"]:
        return None
    fact = _choice(rng, scene["relations"])
    predicate = fact["predicate"] if truth else INVERSE_RELATION[fact["predicate"]]
    return _relation_phrase(scene, fact, predicate, rng, definite=True)


VE_FORMS = ("exists", "absent", "count", "attribute", "relation")


def _ve_neutral(scene: Dict, rng: np.random.Generator) -> Statement:
    fillers = {k: _choice(rng, v) for k, v in NEUTRAL_WORDS.items()}
    if rng.random() < 0.25:
        return _choice(rng, NEUTRAL_SCENE_TEMPLATES).format(**fillers), ("neutral", None)
    obj = _choice(rng, scene["objects"])
    d = _unique(obj, scene, rng)
    # Objects with a twin in the image cannot be singled out: talk about "one of the ...".
    ref = noun_phrase(d, rng, "the") if d is not None else "one of the " + noun_phrase(_full(obj), rng, "", plural=True)
    return _choice(rng, NEUTRAL_OBJECT_TEMPLATES).format(ref=ref, **fillers), ("neutral", d or _full(obj))


def ve_hypothesis(scene: Dict, rng: np.random.Generator, label: str) -> Statement:
    """A hypothesis with the given VE label: entailed (true), contradicted (false) or undecidable.

    Entailments and contradictions share their forms (drawn first, uniformly), so only the
    scene, not the wording, tells them apart.
    """
    if label == "neutral":
        return _ve_neutral(scene, rng)
    truth = label == "entailment"
    while True:
        form = _choice(rng, VE_FORMS)
        for _ in range(10):
            made = _ve_statement(scene, rng, form, truth)
            if made is not None and holds(made[1], scene) == truth:
                return made


# ----------------------------------------------------------------------------- VQA

Question = Tuple[str, Tuple, str]  # (text, program, question type)
_NOT_SHAPE = ("object", "item", "thing")  # "which shape does the small shape have?" reads badly


def _vqa_attribute(scene: Dict, rng: np.random.Generator, attribute: str) -> Optional[Question]:
    obj = _choice(rng, scene["objects"])
    d = _unique(obj, scene, rng, exclude=(attribute,))
    if d is None:
        return None
    the = noun_phrase(d, rng, "the", nouns=_NOT_SHAPE)
    colour = _choice(rng, ("colour", "color"))
    templates = {
        "colour": (f"what {colour} is {the}?", f"what is the {colour} of {the}?", f"which {colour} does {the} have?",
                   f"{the} is what {colour}?"),
        "shape": (f"what shape is {the}?", f"what is the shape of {the}?", f"what kind of shape is {the}?",
                  f"which shape does {the} have?"),
        "size": (f"what size is {the}?", f"is {the} small or large?", f"how big is {the}?"),
    }[attribute]
    return _choice(rng, templates), ("query", d, attribute), attribute


def _vqa_count(scene: Dict, rng: np.random.Generator) -> Question:
    d = _partial(_choice(rng, scene["objects"]), rng) if rng.random() < 0.7 else \
        (_random_description(rng) if rng.random() < 0.4 else Description())
    pl = noun_phrase(d, rng, "", plural=True)
    text = _choice(rng, (f"how many {pl} are there?", f"how many {pl} are in the image?",
                         f"how many {pl} can you see?", f"what is the number of {pl}?", f"how many {pl} are shown?"))
    return text, ("count", d), "count"


def _vqa_yes_no(scene: Dict, rng: np.random.Generator) -> Optional[Question]:
    want = bool(rng.random() < 0.5)  # balanced yes/no, so the prior alone scores 50 %
    kind = int(rng.integers(4))
    obj = _choice(rng, scene["objects"])
    if kind == 0:
        d = _partial(obj, rng) if want else _absent(scene, rng)
        if d is None:
            return None
        text = _choice(rng, (f"is there {noun_phrase(d, rng)}?", f"does the image contain {noun_phrase(d, rng)}?",
                             f"can you see {noun_phrase(d, rng)}?", f"are there any {noun_phrase(d, rng, '', True)}?"))
        claim = ("exists", d)
    elif kind == 1:
        made = _count_claim(scene, rng, want)
        if made is None:
            return None
        d, n = made
        text = f"are there {count_phrase(n, d, rng)}?" if n > 1 else f"is there {count_phrase(n, d, rng)}?"
        claim = ("count", d, n)
    elif kind == 2:
        attribute = _choice(rng, ("colour", "size", "shape"))
        values = {"shape": SHAPES, "colour": COLOURS, "size": SIZES}[attribute]
        value = obj[attribute] if want else _choice(rng, [v for v in values if v != obj[attribute]])
        made = _attribute_statement(obj, attribute, value, scene, rng)
        if made is None:
            return None
        subject, _, rest = made[0].partition(" is ")
        if not rest:  # "looks"/"appears to be" wordings do not invert into a question
            return None
        text, claim = f"is {subject} {rest}?", made[1]
    else:
        if not scene["relations"]:
            return None
        fact = _choice(rng, scene["relations"])
        predicate = fact["predicate"] if want else INVERSE_RELATION[fact["predicate"]]
        made = _relation_phrase(scene, fact, predicate, rng, definite=True)
        if made is None:
            return None
        _, da, _, db = made[1]
        text = f"is {noun_phrase(da, rng, 'the')} {_say(rng, RELATION_WORDS[predicate])} {noun_phrase(db, rng, 'the')}?"
        claim = made[1]
    return text, ("verify", claim), "yes/no"


def _vqa_relation(scene: Dict, rng: np.random.Generator) -> Optional[Question]:
    if not scene["relations"]:
        return None
    fact = _choice(rng, scene["relations"])
    anchor = next(o for o in scene["objects"] if o["id"] == fact["object"])
    d = _unique(anchor, scene, rng)
    if d is None:
        return None
    rel = _say(rng, RELATION_WORDS[fact["predicate"]])
    the = noun_phrase(d, rng, "the", nouns=_NOT_SHAPE)
    if rng.random() < 0.7:
        attribute = "shape"
        text = _choice(rng, (f"what is {rel} {the}?", f"what shape is {rel} {the}?", f"which shape is {rel} {the}?"))
    else:
        attribute = "colour"
        text = _choice(rng, (f"what colour is the object {rel} {the}?", f"what color is the shape {rel} {the}?"))
    program = ("query_related", fact["predicate"], d, attribute)
    return (text, program, "relation") if answer(program, scene) is not None else None


VQA_KINDS = ((functools.partial(_vqa_attribute, attribute="colour"), 2),
             (functools.partial(_vqa_attribute, attribute="shape"), 1.5),
             (functools.partial(_vqa_attribute, attribute="size"), 0.5),
             (_vqa_count, 2), (_vqa_yes_no, 3), (_vqa_relation, 1.5))
_VQA_CDF = _cdf([w for _, w in VQA_KINDS])


def vqa_question(scene: Dict, rng: np.random.Generator) -> Question:
    """A question whose answer is defined (unique referents) and in :data:`VQA_ANSWERS`."""
    while True:
        made = VQA_KINDS[_weighted(rng, _VQA_CDF)][0](scene, rng)
        if made is not None and answer(made[1], scene) in VQA_ANSWERS:
            return made


def annotator_answers(canonical: str, rng: np.random.Generator, noise_fraction: float) -> List[str]:
    """Ten answers as in VQA v2: all the canonical one, or with 1-4 synonyms among them, so the
    soft score min(#matches / 3, 1) takes values below 1 for the synonyms."""
    answers = [canonical] * 10
    if rng.random() < noise_fraction:
        for position in rng.choice(10, size=int(rng.integers(1, 5)), replace=False):
            answers[int(position)] = _choice(rng, VQA_ANSWER_SYNONYMS[canonical])
    return answers


# ----------------------------------------------------------------------------- samples

def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    # Each split has its own stream, so image pools of different splits are disjoint.
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def _draw(config: SyntheticWorldConfig, rng: np.random.Generator) -> Tuple[Dict, bytes]:
    scene = sample_scene(rng, config)
    return scene, encode_image(render(scene, rng, config.supersample), config.image_format)


def make_group(config: SyntheticWorldConfig, split: str, index: int) -> List[Tuple[Dict[str, Any], Any]]:
    """The samples made from group ``index`` of ``split`` (one image, or an image pair for NLVR2).

    Each item is (sample, meaning): ``sample`` maps ``__key__`` and file extensions to bytes,
    except ``json``, which is the record as a dict; ``meaning`` is the list of caption claims,
    the NLVR2/VE claim, or the VQA program the text was generated from.
    """
    rng = _rng(config.seed, split, index)
    task, ext = split_task(split), config.image_format
    image_id = f"{split}-{index:07d}"
    if task == "nlvr2":
        (left, left_bytes), (right, right_bytes) = _draw(config, rng), _draw(config, rng)
        out = []
        for j, label in enumerate(rng.permutation([True, False]).tolist()):
            sentence, claim = nlvr2_statement(left, right, rng, label)
            identifier = f"{image_id}-{j}"
            record = {"identifier": identifier, "sentence": sentence, "label": label, "left_id": f"{image_id}-left",
                      "right_id": f"{image_id}-right", "source": "synthetic",
                      "scene_graphs": {"left": left, "right": right}}
            out.append(({"__key__": identifier, f"left.{ext}": left_bytes, f"right.{ext}": right_bytes,
                         "json": record}, claim))
        return out
    scene, image = _draw(config, rng)
    if task == "ve":
        out = []
        for j, label in enumerate(rng.permutation(VE_LABELS).tolist()):
            hypothesis, claim = ve_hypothesis(scene, rng, label)
            record = {"pair_id": f"{image_id}-{j}", "image_id": image_id, "hypothesis": hypothesis, "label": label,
                      "source": "synthetic", "scene_graph": scene}
            out.append(({"__key__": record["pair_id"], ext: image, "json": record}, claim))
        return out
    if task == "vqa":
        out, asked = [], set()
        for j in range(config.vqa_questions_per_image):
            for _ in range(20):  # different questions about one image where the scene allows
                question, program, question_type = vqa_question(scene, rng)
                if question not in asked:
                    break
            asked.add(question)
            canonical = answer(program, scene)
            record = {"question_id": f"{image_id}-{j}", "image_id": image_id, "question": question,
                      "answers": annotator_answers(canonical, rng, config.vqa_noise_fraction), "answer": canonical,
                      "answer_type": "yes/no" if canonical in ("yes", "no") else
                      "number" if question_type == "count" else "other",
                      "question_type": question_type, "source": "synthetic", "scene_graph": scene}
            out.append(({"__key__": record["question_id"], ext: image, "json": record}, program))
        return out
    count = config.retrieval_captions if task == "retrieval" else \
        int(rng.integers(config.min_captions, config.max_captions + 1))
    captions = captions_for(scene, rng, count)
    record = {"image_id": image_id, "captions": [text for text, _ in captions], "width": scene["width"],
              "height": scene["height"], "source": "synthetic", "scene_graph": scene}
    return [({"__key__": image_id, ext: image, "json": record}, [claim for _, claim in captions])]


def iter_split(config: SyntheticWorldConfig, split: str, first_group: int = 0,
               last_group: Optional[int] = None) -> Iterator[Tuple[Dict[str, Any], Any]]:
    """Samples of groups [first_group, last_group), stopping at the split's size."""
    total, per_group = config.split_sizes.get(split, 0), config.group_size(split)
    last_group = -(-total // per_group) if last_group is None else last_group
    for group in range(first_group, last_group):
        for j, item in enumerate(make_group(config, split, group)):
            if group * per_group + j < total:
                yield item


def texts_of(record: Dict) -> List[str]:
    """Every piece of text in a record (what the tokenizer learns from)."""
    texts = list(record.get("captions", []))
    texts += [record[k] for k in ("sentence", "hypothesis", "question") if k in record]
    return texts + sorted(set(record.get("answers", [])))


# ----------------------------------------------------------------------------- writing

def _shard_path(root: Path, split: str, shard: int) -> Path:
    return root / split / f"{split}-{shard:06d}.tar"


def _write_shard(job: Tuple[SyntheticWorldConfig, str, int, int, str]) -> Tuple[str, int, int, str, List[str]]:
    """Groups [first, last) of a split into one shard; returns (path, samples, images, sha256, texts)."""
    config, split, first, last, path = job
    texts: List[str] = []
    samples = 0
    partial = path + ".tmp"
    with open(partial, "wb") as stream:
        # Fixed mtime: tar headers carry no wall-clock time, so shards are byte-identical per seed.
        with wds.TarWriter(stream, encoder=False, mtime=0) as writer:
            for sample, _ in iter_split(config, split, first, last):
                record = sample["json"]
                texts += texts_of(record)
                writer.write({**sample, "json": json.dumps(record, separators=(",", ":")).encode()})
                samples += 1
    # Written under a temporary name first: a crash never leaves a plausible-looking partial shard.
    os.replace(partial, path)
    images = (last - first) * (2 if split_task(split) == "nlvr2" else 1)
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return path, samples, images, digest, texts


def _jobs(config: SyntheticWorldConfig, root: Path) -> List[Tuple]:
    jobs = []
    for split in SPLITS:
        total = config.split_sizes.get(split, 0)
        if total == 0:
            continue
        per_group = config.group_size(split)
        groups = -(-total // per_group)
        groups_per_shard = max(1, config.shard_size // per_group)
        (root / split).mkdir(parents=True, exist_ok=True)
        for shard, first in enumerate(range(0, groups, groups_per_shard)):
            last = min(groups, first + groups_per_shard)
            jobs.append((config, split, first, last, str(_shard_path(root, split, shard))))
    return jobs


def _remove_stale(root: Path, keep: set) -> None:
    """Delete shards of an earlier generation that this one does not rewrite: directory readers
    glob ``*.tar`` and would otherwise mix them in."""
    for split in SPLITS:
        for path in (root / split).glob(f"{split}-*.tar*") if (root / split).is_dir() else ():
            if str(path) not in keep:
                path.unlink()


def generate_world(config: SyntheticWorldConfig, root: str | Path) -> Dict[str, Any]:
    """Write every split of ``config.split_sizes`` as webdataset shards under ``root``, train a
    WordPiece tokenizer on all the text into ``root/tokenizer``, and write ``root/manifest.json``
    (returned): settings, counts, shards with sha256, and the time taken."""
    from soho.tokenizer import train_wordpiece_tokenizer

    root = Path(root)
    started = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    # Gone first: a run that dies midway must not leave a manifest vouching for the old shards.
    (root / "manifest.json").unlink(missing_ok=True)
    jobs = _jobs(config, root)
    _remove_stale(root, {job[-1] for job in jobs})
    splits: Dict[str, Dict[str, Any]] = {}
    texts: List[str] = []
    workers = min(config.num_workers, len(jobs))
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_write_shard, jobs))
    else:
        results = [_write_shard(job) for job in jobs]
    for job, (path, samples, images, digest, shard_texts) in zip(jobs, results):
        entry = splits.setdefault(job[1], {"task": split_task(job[1]), "samples": 0, "images": 0, "shards": []})
        entry["samples"] += samples
        entry["images"] += images
        entry["shards"].append({"path": Path(path).relative_to(root).as_posix(), "samples": samples, "sha256": digest})
        texts += shard_texts
    train_wordpiece_tokenizer(texts, root / "tokenizer", vocab_size=config.tokenizer_vocab_size)
    manifest = {
        "generator": "soho.data.synthetic",
        "seed": config.seed,
        "settings": config.settings(),
        "splits": splits,
        "tokenizer": "tokenizer",
        "texts": len(texts),
        "num_workers": workers,
        "seconds": round(time.perf_counter() - started, 2),
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _is_current(root: Path, config: SyntheticWorldConfig) -> bool:
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if manifest.get("settings") != json.loads(json.dumps(config.settings())):
        return False
    shards = [s["path"] for entry in manifest.get("splits", {}).values() for s in entry["shards"]]
    return (root / "tokenizer").is_dir() and all((root / p).is_file() for p in shards)


def ensure_world(root: str | Path, config: Optional[SyntheticWorldConfig] = None) -> Path:
    """``root``, after generating the world there unless a complete one with the same settings exists."""
    config = config or SyntheticWorldConfig()
    root = Path(root)
    if not _is_current(root, config):
        generate_world(config, root)
    return root
