"""Downstream task streams: shards of one task's records -> batches.

A task says how a sample becomes a :class:`TaskExample` (an id, one or more images, a text, the raw
target) and how a batch's targets become the ``labels`` tensor; the stream does the rest (shuffling,
splitting over ranks and workers, image transforms, tokenising, padding, counting skips, resuming).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image

from soho.data.samples import SampleError, decode_image
from soho.data.shards import Sample
from soho.data.stream import ShardStream
from soho.processing import ImageTransform, ImageTransformConfig, pad_images


@dataclass
class TaskExample:
    example_id: str
    images: List[Image.Image]
    text: str
    target: Any
    """Class index (NLVR2, VE) or the annotators' answers (VQA); None for an unlabelled split."""
    info: Dict[str, Any]
    """Record fields kept with the prediction (question type, image ids, ...)."""


def record_field(record: Dict[str, Any], name: str, kind: type) -> Any:
    """``record[name]`` if it is a ``kind`` (a non-empty one for strings), else a ``bad_record`` skip."""
    value = record.get(name)
    if not isinstance(value, kind) or (kind is str and not value):
        raise SampleError("bad_record", f"{name}={value!r} (expected a non-empty {kind.__name__})")
    return value


def sample_image(sample: Sample, prefix: str = "") -> Image.Image:
    """The image stored under ``<prefix>.jpg`` (or another image extension); ``prefix=''`` for ``<key>.jpg``."""
    if not prefix:
        return decode_image(sample)
    view = {ext[len(prefix) + 1:]: data for ext, data in sample.items() if ext.startswith(prefix + ".")}
    try:
        return decode_image(view)
    except SampleError as error:
        raise SampleError(error.reason, f"{prefix} image: {error}") from None


Targets = Callable[[Sequence[TaskExample]], torch.Tensor]


class TaskDataset(ShardStream):
    """Batches of one downstream task for one rank (:class:`~soho.data.stream.ShardStream`).

    ``train=True``: an infinite, shuffled stream. ``train=False``: one ordered pass over this rank's
    disjoint slice, with a last partial batch; no example is padded or repeated, so predictions
    gathered from all ranks cover the split exactly once.

    ``decode`` turns a sample into a :class:`TaskExample` (raising :class:`SampleError` for an unusable
    one); ``targets`` turns a batch's examples into its ``labels`` (None: an unlabelled split, no labels).
    Images are padded in example order, an example's images next to each other (NLVR2: left, right).
    """

    def __init__(self, shards: Union[str, List[str]], decode: Callable[[Sample], TaskExample], tokenizer,
                 image: ImageTransformConfig, max_text_length: int, batch_size: int, train: bool,
                 targets: Optional[Targets] = None, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle_buffer: int = 1000, start_positions: Optional[Dict[int, int]] = None):
        super().__init__(shards, batch_size, seed, rank, world_size, repeat=train,
                         shuffle_buffer=shuffle_buffer if train else 0, start_positions=start_positions)
        self.decode_example = decode
        self.targets = targets
        self.transform = ImageTransform(image)
        self.tokenizer = tokenizer
        self.max_text_length = max_text_length
        self.size_divisor = image.size_divisor

    def decode(self, sample: Sample, key: int) -> Tuple[List[torch.Tensor], TaskExample]:
        example = self.decode_example(sample)
        return [self.transform(image) for image in example.images], example

    def collate(self, items, key: int) -> Dict[str, Any]:
        examples = [example for _, example in items]
        pixel_values, pixel_mask = pad_images([pixels for images, _ in items for pixels in images],
                                              self.size_divisor)
        encoded = self.tokenizer([e.text for e in examples], padding=True, truncation=True,
                                 max_length=self.max_text_length, return_tensors="pt", return_token_type_ids=True)
        batch = {
            "pixel_values": pixel_values,
            "pixel_mask": pixel_mask,
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "token_type_ids": encoded["token_type_ids"],
            "example_ids": [e.example_id for e in examples],
            "targets": [e.target for e in examples],
            "info": [e.info for e in examples],
        }
        if self.targets is not None:
            batch["labels"] = self.targets(examples)
        return batch


def class_targets(examples: Sequence[TaskExample]) -> torch.Tensor:
    """The class index of each example (NLVR2, VE)."""
    return torch.tensor([e.target for e in examples], dtype=torch.long)
