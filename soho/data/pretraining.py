"""The pre-training stream: image-caption shards -> decoded, masked, batched tensors.

Everything up to the batch happens in DataLoader workers. Each batch carries how
many samples its worker skipped (corrupt image, missing key, bad JSON) and the
worker's position in its deterministic stream, for logging and exact resumption.
"""
from __future__ import annotations

import io
import json
import random
import zlib
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from soho.config import ConfigError
from soho.data.shards import Sample, SkipCounter, expand_urls, fast_forward, worker_stream
from soho.models.masking import mask_tokens
from soho.processing import ImageTransform, ImageTransformConfig, pad_images

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


@dataclass
class PretrainingDataConfig:
    shards: Union[str, List[str], None] = None
    """Directory, brace pattern, glob, or list of them."""
    tokenizer: Optional[str] = None
    """A tokenizer directory; pre-training loads it, code that passes a tokenizer in leaves it unset."""
    image: ImageTransformConfig = field(default_factory=ImageTransformConfig)
    max_text_length: int = 40
    captions_per_image: int = 4
    """Captions drawn per image; they share one backbone pass (SOHO uses 4)."""
    mlm_probability: float = 0.15
    shuffle_buffer: int = 1000
    num_workers: int = 2
    resampled: bool = False
    max_skip_fraction: float = 0.05
    """A run stops with an error once more than this fraction of samples was skipped."""

    def __post_init__(self):
        if self.captions_per_image < 1:
            raise ConfigError(f"captions_per_image must be >= 1, got {self.captions_per_image}")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ConfigError(f"mlm_probability must be in (0, 1), got {self.mlm_probability}")
        if self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ConfigError("num_workers and shuffle_buffer must be >= 0")
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise ConfigError(f"max_skip_fraction must be in [0, 1], got {self.max_skip_fraction}")


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


class PretrainingCollator:
    """Pads images, tokenises captions, applies BERT masking."""

    def __init__(self, tokenizer, max_text_length: int, mlm_probability: float, size_divisor: int):
        self.tokenizer = tokenizer
        self.max_text_length = max_text_length
        self.mlm_probability = mlm_probability
        self.size_divisor = size_divisor
        special = set(tokenizer.all_special_ids)
        self.random_token_ids = [i for i in range(len(tokenizer)) if i not in special]

    def __call__(self, images: Sequence[torch.Tensor], captions: Sequence[Sequence[str]],
                 image_ids: Sequence[int], generator: torch.Generator) -> Dict[str, torch.Tensor]:
        pixel_values, pixel_mask = pad_images(images, self.size_divisor)
        texts = [text for group in captions for text in group]
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_text_length,
                                 return_tensors="pt", return_special_tokens_mask=True)
        maskable = encoded["attention_mask"].bool() & ~encoded["special_tokens_mask"].bool()
        mlm_input_ids, mlm_labels = mask_tokens(
            encoded["input_ids"], maskable, self.tokenizer.mask_token_id, len(self.tokenizer),
            self.mlm_probability, generator, self.random_token_ids)
        counts = torch.tensor([len(group) for group in captions])
        return {
            "pixel_values": pixel_values,
            "pixel_mask": pixel_mask,
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "token_type_ids": encoded.get("token_type_ids", torch.zeros_like(encoded["input_ids"])),
            "mlm_input_ids": mlm_input_ids,
            "mlm_labels": mlm_labels,
            "image_index": torch.arange(len(captions)).repeat_interleave(counts),
            "image_ids": torch.tensor(list(image_ids), dtype=torch.long),
        }


class PretrainingDataset(IterableDataset):
    """Infinite (or one-pass) stream of pre-training batches for one rank.

    ``start_positions`` maps a worker id to the number of shuffled samples that worker
    had already handed out; those are skipped undecoded, so a resumed run sees exactly
    the batches an uninterrupted run would have.
    """

    def __init__(self, config: PretrainingDataConfig, tokenizer, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, repeat: bool = True,
                 start_positions: Optional[Dict[int, int]] = None):
        super().__init__()
        self.config = config
        self.urls = expand_urls(config.shards)
        self.transform = ImageTransform(config.image)
        self.collate = PretrainingCollator(tokenizer, config.max_text_length, config.mlm_probability,
                                           config.image.size_divisor)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.repeat = repeat
        self.start_positions = dict(start_positions or {})

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        samples, skips, worker, reader_seed = worker_stream(self.urls, self.seed, self.rank, self.world_size,
                                                            self.repeat, self.config.shuffle_buffer,
                                                            self.config.resampled)
        position = fast_forward(samples, self.start_positions.get(worker, 0))
        images, captions, image_ids = [], [], []
        reported = SkipCounter()
        for sample in samples:
            position += 1
            key = sample.get("__key__", "?")
            try:
                record, texts, image = decode_captioned_image(sample)
                image = self.transform(image)
            except SampleError as error:
                skips.skip(error.reason, f"{sample.get('__url__', '')}:{key}", error)
                continue
            count = min(self.config.captions_per_image, len(texts))
            images.append(image)
            # Randomness is keyed by stream position, so a resumed stream draws what an
            # uninterrupted one would have.
            captions.append(random.Random(hash((reader_seed, position))).sample(texts, count))
            image_ids.append(stable_id(str(record.get("image_id", key))))
            if len(images) == self.batch_size:
                yield self._batch(images, captions, image_ids, reader_seed, worker, position, skips - reported)
                reported = SkipCounter(skips)
                images, captions, image_ids = [], [], []
        if images and not self.repeat:
            yield self._batch(images, captions, image_ids, reader_seed, worker, position, skips - reported)

    def _batch(self, images, captions, image_ids, reader_seed: int, worker: int, position: int,
               skipped: SkipCounter) -> Dict[str, Any]:
        """Collate, with MLM masks keyed by stream position, plus the stream bookkeeping."""
        generator = torch.Generator().manual_seed(hash((reader_seed, position)) & 0x7FFFFFFF)
        batch = self.collate(images, captions, image_ids, generator)
        batch.update(worker=worker, position=position, skipped=dict(skipped), samples=len(images))
        return batch


def pretraining_loader(dataset: PretrainingDataset, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """Batches are built inside the workers, so the loader passes them through unchanged.

    The loader gets its own generator: drawing its base seed from the global one would
    shift the model's random stream, and a resumed run would diverge from the original.
    """
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None,
                      generator=torch.Generator().manual_seed(dataset.seed))
