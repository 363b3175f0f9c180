"""The pre-training stream: image-caption shards -> decoded, masked, batched tensors.

Everything up to the batch happens in DataLoader workers. Each batch carries how
many samples its worker skipped (corrupt image, missing key, bad JSON) and the
worker's position in its deterministic stream, for logging and exact resumption.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from soho.config import ConfigError
from soho.data.samples import decode_captioned_image, stable_id
from soho.data.shards import Sample
from soho.data.stream import ShardStream
from soho.data.synthetic.logic import near_miss_table, truth_table
from soho.models.masking import mask_tokens
from soho.processing import ImageTransform, ImageTransformConfig, pad_images


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
    shuffle_captions: bool = False
    """Give each image of a batch another image's captions: a text-ablated control, whose MVM shows how much
    predicting masked cells uses the caption."""
    eval_shards: Dict[str, str] = field(default_factory=dict)
    """Held-out image-caption splits (name -> shards), evaluated at the end and every ``train.eval_every`` steps."""

    def __post_init__(self):
        if self.captions_per_image < 1:
            raise ConfigError(f"captions_per_image must be >= 1, got {self.captions_per_image}")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ConfigError(f"mlm_probability must be in (0, 1), got {self.mlm_probability}")
        if self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ConfigError("num_workers and shuffle_buffer must be >= 0")
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise ConfigError(f"max_skip_fraction must be in [0, 1], got {self.max_skip_fraction}")


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
        # Drawn after the MLM masks, so adding them left those unchanged.
        image_seeds = torch.randint(0, 1 << 62, (len(captions),), generator=generator)
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
            "image_seeds": image_seeds,
        }


class PretrainingDataset(ShardStream):
    """Batches of images with ``captions_per_image`` captions each, BERT-masked, for one rank
    (:class:`~soho.data.stream.ShardStream`: infinite with ``repeat``, else one pass)."""

    def __init__(self, config: PretrainingDataConfig, tokenizer, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, repeat: bool = True,
                 start_positions: Optional[Dict[int, int]] = None, shards: Union[str, List[str], None] = None):
        super().__init__(config.shards if shards is None else shards, batch_size, seed, rank, world_size, repeat,
                         config.shuffle_buffer, config.resampled, start_positions)
        self.config = config
        self.transform = ImageTransform(config.image)
        self.collator = PretrainingCollator(tokenizer, config.max_text_length, config.mlm_probability,
                                            config.image.size_divisor)

    def decode(self, sample: Sample, key: int) -> Tuple[torch.Tensor, List[str], int, Optional[Dict[str, Any]]]:
        record, texts, image = decode_captioned_image(sample)
        count = min(self.config.captions_per_image, len(texts))
        chosen = random.Random(key).sample(range(len(texts)), count)
        return (self.transform(image), [texts[i] for i in chosen],
                stable_id(str(record.get("image_id", sample.get("__key__", "?")))), scene_claims(record, chosen))

    def collate(self, items, key: int) -> Dict[str, Any]:
        images, captions, image_ids, meanings = zip(*items)
        generator = torch.Generator().manual_seed(key)
        if self.config.shuffle_captions:
            order = torch.randperm(len(items), generator=generator).tolist()
            captions = [captions[i] for i in order]
            if all(meaning is not None for meaning in meanings):
                meanings = [{"scene": meaning["scene"], "claims": meanings[i]["claims"]}
                            for meaning, i in zip(meanings, order)]
        batch = self.collator(images, captions, image_ids, generator)
        if all(meaning is not None for meaning in meanings):
            claims = [claim for meaning in meanings for claim in meaning["claims"]]
            scenes = [meaning["scene"] for meaning in meanings]
            batch["caption_truth"] = torch.tensor(truth_table(claims, scenes))
            batch["caption_near_miss"] = torch.tensor(near_miss_table(claims, scenes))
        return batch


def scene_claims(record: Dict[str, Any], chosen: Sequence[int]) -> Optional[Dict[str, Any]]:
    """The scene graph and the chosen captions' claims, where the record has them (the synthetic world)."""
    claims, scene = record.get("claims"), record.get("scene_graph")
    if not isinstance(claims, list) or not isinstance(scene, dict) or len(claims) != len(record["captions"]):
        return None
    return {"scene": scene, "claims": [claims[i] for i in chosen]}
