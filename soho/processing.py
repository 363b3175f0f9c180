"""Turning images and texts into model inputs: resize, normalise, pad, tokenise."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from soho.config import ConfigError, from_dict, to_dict
from soho.tokenizer import load_tokenizer

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
        # Messages name the bare field: from_dict prefixes the path (e.g. "data.image.") when nested.
        for name in ("min_size", "max_size", "size_divisor"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.min_size > self.max_size:
            raise ConfigError(f"min_size ({self.min_size}) must not exceed max_size ({self.max_size})")
        for name in ("mean", "std"):
            if len(getattr(self, name)) != 3:
                raise ConfigError(f"{name} needs one value per RGB channel, got {getattr(self, name)}")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"std must be positive, got {self.std}")


@dataclass
class ProcessorConfig:
    """What ``processor_config.json`` holds."""

    image: ImageTransformConfig = field(default_factory=ImageTransformConfig)
    max_text_length: int = 40
    """Token budget per text, [CLS] and [SEP] included; longer texts are truncated."""

    def __post_init__(self):
        if self.max_text_length < 2:
            raise ConfigError(f"max_text_length must be >= 2 to fit [CLS] and [SEP], got {self.max_text_length}")


def resized_shape(height: int, width: int, min_size: int, max_size: int) -> Tuple[int, int]:
    """Keep the aspect ratio; short side -> min_size unless the long side would pass max_size."""
    if height < 1 or width < 1:
        raise ValueError(f"cannot resize an empty image of {height} x {width} pixels")
    short, long = min(height, width), max(height, width)
    scale = min_size / short
    if long * scale > max_size:
        scale = max_size / long
    return max(1, round(height * scale)), max(1, round(width * scale))


def _to_float_tensor(image: ImageInput) -> Tensor:
    """(3, H, W) float32 in [0, 1] from a PIL image, an H x W x 3 uint8 array or a 3 x H x W float tensor."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"an image array must be H x W x 3 (pass several images as a list), "
                             f"got shape {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"an image array must be uint8, got {image.dtype}")
        # PIL hands out read-only buffers, which torch.from_numpy refuses to share.
        return torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float().div_(255.0)
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"an image tensor must be 3 x H x W (pass several images as a list), "
                             f"got shape {tuple(image.shape)}")
        if not image.is_floating_point():
            raise ValueError(f"an image tensor must be floating point in [0, 1], got {image.dtype}; "
                             "divide uint8 pixels by 255")
        if image.numel() and (image.min() < 0 or image.max() > 1):
            raise ValueError(f"an image tensor must hold values in [0, 1], got [{image.min():.3g}, {image.max():.3g}]")
        return image.float()
    raise TypeError(f"unsupported image type {type(image).__name__}; use a PIL image, an H x W x 3 uint8 "
                    "numpy array or a 3 x H x W float tensor")


class ImageTransform:
    """Resize keeping the aspect ratio, then normalise: one image -> (3, h, w) float32."""

    def __init__(self, config: ImageTransformConfig):
        self.config = config
        self.mean = torch.tensor(config.mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(config.std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: ImageInput) -> Tensor:
        pixels = _to_float_tensor(image)
        height, width = pixels.shape[1:]
        size = resized_shape(height, width, self.config.min_size, self.config.max_size)
        if size != (height, width):
            # Antialiasing matters here: captioned photos are often shrunk by 2-4x.
            pixels = F.interpolate(pixels[None], size=size, mode="bilinear", antialias=True,
                                   align_corners=False)[0]
        return (pixels - self.mean.to(pixels.device)) / self.std.to(pixels.device)


def pad_images(images: Sequence[Tensor], size_divisor: int) -> Tuple[Tensor, Tensor]:
    """Pad (3, h, w) images at the bottom/right to a common size divisible by ``size_divisor``.

    Returns pixel values (B, 3, H, W) with zeros in the padding and a (B, H, W) long mask
    with 1 on real pixels, so the model can drop padded grid cells after the backbone.
    """
    if size_divisor < 1:
        raise ValueError(f"size_divisor must be >= 1, got {size_divisor}")
    if len(images) == 0:
        raise ValueError("pad_images needs at least one image")
    for index, image in enumerate(images):
        if not isinstance(image, Tensor):
            raise TypeError(f"images[{index}] is a {type(image).__name__}, expected a tensor")
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"images[{index}] must be 3 x H x W, got shape {tuple(image.shape)}")
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    height = -(-height // size_divisor) * size_divisor
    width = -(-width // size_divisor) * size_divisor
    pixel_values = images[0].new_zeros(len(images), 3, height, width)
    pixel_mask = torch.zeros(len(images), height, width, dtype=torch.long, device=images[0].device)
    for index, image in enumerate(images):
        pixel_values[index, :, :image.shape[1], :image.shape[2]] = image
        pixel_mask[index, :image.shape[1], :image.shape[2]] = 1
    return pixel_values, pixel_mask


class SohoProcessor:
    """Images and texts in, model inputs out: the image transform plus a tokenizer."""

    def __init__(self, tokenizer, image_config: Optional[ImageTransformConfig] = None, max_text_length: int = 40):
        image_config = ImageTransformConfig() if image_config is None else image_config
        if not isinstance(image_config, ImageTransformConfig):
            raise TypeError(f"image_config must be an ImageTransformConfig, got {type(image_config).__name__}")
        self.config = ProcessorConfig(image=image_config, max_text_length=max_text_length)
        self.tokenizer = tokenizer
        self.transform = ImageTransform(image_config)

    @property
    def image_config(self) -> ImageTransformConfig:
        return self.config.image

    @property
    def max_text_length(self) -> int:
        return self.config.max_text_length

    def __call__(self, images: Union[ImageInput, Sequence[ImageInput], None] = None,
                 text: Union[str, Sequence[str], None] = None,
                 return_tensors: str = "pt") -> Dict[str, Union[Tensor, np.ndarray]]:
        """Batch inputs for the model; a single image or string is a batch of one.

        Images and texts are batched independently (several captions may share an image),
        so their counts need not match.
        """
        if images is None and text is None:
            raise ValueError("give images, text or both")
        if return_tensors not in ("pt", "np"):
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")
        inputs: Dict[str, Tensor] = {}
        if images is not None:
            inputs.update(self._images(images))
        if text is not None:
            inputs.update(self._text(text))
        if return_tensors == "np":
            return {name: value.numpy() for name, value in inputs.items()}
        return inputs

    def _images(self, images: Union[ImageInput, Sequence[ImageInput]]) -> Dict[str, Tensor]:
        batch = [images] if isinstance(images, (Image.Image, np.ndarray, Tensor)) else list(images)
        pixels = []
        for index, image in enumerate(batch):
            try:
                pixels.append(self.transform(image))
            except (TypeError, ValueError) as err:
                raise type(err)(f"images[{index}]: {err}") from None
        pixel_values, pixel_mask = pad_images(pixels, self.image_config.size_divisor)
        return {"pixel_values": pixel_values, "pixel_mask": pixel_mask}

    def _text(self, text: Union[str, Sequence[str]]) -> Dict[str, Tensor]:
        texts: List[str] = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("text is an empty list")
        for index, item in enumerate(texts):
            if not isinstance(item, str):
                raise TypeError(f"text[{index}] is a {type(item).__name__}, expected str")
        encoded = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_text_length,
                                 return_attention_mask=True, return_token_type_ids=True, return_tensors="pt")
        return {name: encoded[name] for name in ("input_ids", "attention_mask", "token_type_ids")}

    def save_pretrained(self, directory: Union[str, Path]) -> None:
        """Write ``processor_config.json`` and the tokenizer files into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / PROCESSOR_CONFIG).write_text(json.dumps(to_dict(self.config), indent=2) + "\n")
        self.tokenizer.save_pretrained(str(directory))

    @classmethod
    def from_pretrained(cls, directory: Union[str, Path]) -> "SohoProcessor":
        """Read a directory written by :meth:`save_pretrained`; local files only."""
        directory = Path(directory)
        config_file = directory / PROCESSOR_CONFIG
        if not config_file.is_file():
            raise FileNotFoundError(f"no {PROCESSOR_CONFIG} in {directory}; write one with "
                                    "SohoProcessor.save_pretrained()")
        try:
            record = json.loads(config_file.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{config_file} is not valid JSON: {err}") from None
        config = from_dict(ProcessorConfig, record)
        return cls(load_tokenizer(directory), config.image, config.max_text_length)
