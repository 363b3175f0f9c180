"""The settings of a synthetic world, and its splits."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Literal

from soho.config import ConfigError, to_dict
from soho.data.synthetic.vocabulary import VE_LABELS

GENERATOR_VERSION = 3
"""Bumped whenever the output for a given config changes, so :func:`~soho.data.synthetic.build.ensure_world`
regenerates. 2: written by ``soho/data/convert/writer.py`` (its manifest, and shards of exactly
``shard_size`` samples where an image's VE or VQA samples used to stay in one shard); samples unchanged.
3: image-caption records also hold each caption's claim (``claims``), so any caption's truth on any scene graph
can be decided."""

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
    """Samples per shard."""
    num_workers: int = 2
    """Processes drawing samples; the output does not depend on it."""
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
