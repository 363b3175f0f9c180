"""Scene graphs: objects with boxes placed by rejection sampling, and their spatial relations."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from soho.data.synthetic.config import SyntheticWorldConfig
from soho.data.synthetic.vocabulary import BACKGROUNDS, COLOURS, SHAPES, SIZE_RADIUS, SIZES


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
