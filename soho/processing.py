"""Turning images and texts into model inputs: resize, normalise, pad, tokenise."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from soho.config import ConfigError, from_dict, to_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PROCESSOR_CONFIG = "processor_config.json"

ImageInput = Union[Image.Image, np.ndarray, Tensor]


@dataclass
class ImageTransformConfig:
    min_size: int = 600
    """Target length of the short side."""
    max_size: int = 1000
    """Cap on the long side; wins over ``min_size`` for very elongated images."""
    size_divisor: int = 32
    """Batches are padded to a multiple of this (the CNN's total stride)."""
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        if self.min_size < 1 or self.max_size < 1 or self.size_divisor < 1:
            raise ConfigError("image.min_size, image.max_size and image.size_divisor must be >= 1")
        if self.min_size > self.max_size:
            raise ConfigError(f"image.min_size ({self.min_size}) must not exceed image.max_size ({self.max_size})")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"image.std must be positive, got {self.std}")


def resized_shape(height: int, width: int, min_size: int, max_size: int) -> Tuple[int, int]:
    """Keep the aspect ratio; short side -> min_size unless the long side would pass max_size."""
    scale = min_size / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def to_tensor(image: ImageInput) -> Tensor:
    """A (3, H, W) float tensor in [0, 1] from a PIL image, an HxWx3 uint8 array or a 3xHxW tensor."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"an image array must be H x W x 3, got shape {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"an image array must be uint8, got {image.dtype}")
        return torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float().div_(255.0)
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"an image tensor must be 3 x H x W, got shape {tuple(image.shape)}")
        return image.float()
    raise TypeError(f"unsupported image type {type(image).__name__}; use a PIL image, numpy array or tensor")


class ImageTransform:
    """Resize keeping the aspect ratio, then normalise: one image -> (3, h, w) float32."""

    def __init__(self, config: ImageTransformConfig):
        self.config = config
        self.mean = torch.tensor(config.mean).view(3, 1, 1)
        self.std = torch.tensor(config.std).view(3, 1, 1)

    def __call__(self, image: ImageInput) -> Tensor:
        pixels = to_tensor(image)
        height, width = pixels.shape[1:]
        size = resized_shape(height, width, self.config.min_size, self.config.max_size)
        if size != (height, width):
            pixels = F.interpolate(pixels[None], size=size, mode="bilinear", antialias=True,
                                   align_corners=False)[0]
        return (pixels - self.mean) / self.std


def pad_images(images: Sequence[Tensor], size_divisor: int) -> Tuple[Tensor, Tensor]:
    """Pad (3, h, w) images at the bottom/right to a common size divisible by ``size_divisor``.

    Returns pixel values (B, 3, H, W) and a (B, H, W) mask with 1 on real pixels.
    """
    if not images:
        raise ValueError("pad_images needs at least one image")
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    height = -(-height // size_divisor) * size_divisor
    width = -(-width // size_divisor) * size_divisor
    pixel_values = images[0].new_zeros(len(images), 3, height, width)
    pixel_mask = torch.zeros(len(images), height, width, dtype=torch.long)
    for i, image in enumerate(images):
        pixel_values[i, :, :image.shape[1], :image.shape[2]] = image
        pixel_mask[i, :image.shape[1], :image.shape[2]] = 1
    return pixel_values, pixel_mask


class SohoProcessor:
    """Images and texts in, model inputs out: the image transform plus a tokenizer."""

    def __init__(self, tokenizer, image_config: Optional[ImageTransformConfig] = None, max_text_length: int = 40):
        self.tokenizer = tokenizer
        self.image_config = image_config or ImageTransformConfig()
        self.transform = ImageTransform(self.image_config)
        self.max_text_length = max_text_length

    def __call__(self, images: Union[ImageInput, Sequence[ImageInput], None] = None,
                 text: Union[str, Sequence[str], None] = None) -> Dict[str, Tensor]:
        if images is None and text is None:
            raise ValueError("give images, text or both")
        inputs: Dict[str, Tensor] = {}
        if images is not None:
            batch = [images] if isinstance(images, (Image.Image, np.ndarray, Tensor)) else list(images)
            inputs["pixel_values"], inputs["pixel_mask"] = pad_images([self.transform(i) for i in batch],
                                                                      self.image_config.size_divisor)
        if text is not None:
            texts: List[str] = [text] if isinstance(text, str) else list(text)
            encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_text_length,
                                     return_tensors="pt")
            inputs["input_ids"] = encoded["input_ids"]
            inputs["attention_mask"] = encoded["attention_mask"]
            inputs["token_type_ids"] = encoded.get("token_type_ids", torch.zeros_like(encoded["input_ids"]))
        return inputs

    def save_pretrained(self, directory: Union[str, Path]) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        record = {"image": to_dict(self.image_config), "max_text_length": self.max_text_length}
        (directory / PROCESSOR_CONFIG).write_text(json.dumps(record, indent=2) + "\n")
        self.tokenizer.save_pretrained(str(directory))

    @classmethod
    def from_pretrained(cls, directory: Union[str, Path]) -> "SohoProcessor":
        from soho.tokenizer import load_tokenizer

        directory = Path(directory)
        config_file = directory / PROCESSOR_CONFIG
        if not config_file.is_file():
            raise FileNotFoundError(f"no {PROCESSOR_CONFIG} in {directory}")
        record = json.loads(config_file.read_text())
        unknown = set(record) - {"image", "max_text_length"}
        if unknown:
            raise ConfigError(f"unknown key(s) in {config_file}: {', '.join(sorted(unknown))}")
        image_config = from_dict(ImageTransformConfig, record.get("image", {}), "image")
        return cls(load_tokenizer(directory), image_config, int(record.get("max_text_length", 40)))
