"""Running a checkpoint over image-caption pairs and keeping what the analysis reads.

:func:`capture` returns, for one batch, every layer's attention probabilities and hidden states over
the single stream [text; image], the padding masks of both modalities and the image grid (its size,
the CNN stride that maps a cell to a pixel box, and each cell's dictionary entry).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from soho.data.retrieval import read_retrieval_split
from soho.models.soho import SohoModel
from soho.processing import SohoProcessor


@dataclass
class Capture:
    """What one forward pass over N image-caption pairs shows; CPU tensors."""

    attentions: Tuple[Tensor, ...]
    """Per layer (N, heads, L, L) probabilities over [text; image], rows are queries, L = Lt + Lv."""
    hidden_states: Tuple[Tensor, ...]
    """Per layer (N, L, D), embeddings (the first layer's input) first: layers + 1 entries."""
    input_ids: Tensor
    """(N, Lt) the caption tokens."""
    text_mask: Tensor
    """(N, Lt) True on real text tokens ([CLS] first)."""
    image_mask: Tensor
    """(N, Lv) True on grid cells inside the unpadded image, row-major over the h x w grid."""
    image_index: Tensor
    """(N,) the row of the batch's images that pair n shows."""
    grid_size: Tuple[int, int]
    """(h, w) of the image grid; Lv = h * w."""
    stride: int
    """Pixels per grid cell side: cell (i, j) covers rows i*stride.. and columns j*stride.. of the image."""
    entries: Optional[Tensor] = None
    """(N, h, w) visual dictionary entry of each cell, when the model has a dictionary."""

    @property
    def text_length(self) -> int:
        return self.text_mask.shape[1]


def _soho_model(model: nn.Module) -> SohoModel:
    """The :class:`SohoModel` itself, or the one a pre-training or task model holds as ``.soho``."""
    soho = model if isinstance(model, SohoModel) else getattr(model, "soho", None)
    if not isinstance(soho, SohoModel):
        raise TypeError(f"expected a SohoModel or a model holding one as .soho, got {type(model).__name__}")
    return soho


@torch.no_grad()
def capture(model: nn.Module, batch: Dict[str, Tensor]) -> Capture:
    """Encode ``batch`` (pixel_values, pixel_mask, input_ids, attention_mask, optionally token_type_ids
    and image_index; text n goes with image ``image_index[n]``, by default image n) and capture it.

    The model must be in eval mode: in training mode dropout would change what is measured and the
    visual dictionary would update itself from the batch.
    """
    soho = _soho_model(model)
    if soho.training:
        raise ValueError("capture needs the model in eval mode (model.eval()): training mode applies dropout "
                         "and updates the visual dictionary")
    device = next(soho.parameters()).device
    inputs = {name: batch[name].to(device) for name in ("pixel_values", "pixel_mask", "input_ids",
                                                         "attention_mask", "token_type_ids", "image_index")
              if batch.get(name) is not None}
    image_index = inputs.pop("image_index", torch.arange(len(inputs["input_ids"]), device=device))
    grid = soho.embed_image(inputs.pop("pixel_values"), inputs.pop("pixel_mask", None))
    out = soho(**inputs, grid=grid, image_index=image_index, output_attentions=True, output_hidden_states=True)

    text_mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
    pairs, text_length = text_mask.shape
    length = text_length + out.image_mask.shape[1]
    layers = soho.config.encoder.num_hidden_layers
    if out.attentions is None or len(out.attentions) != layers or any(
            a.shape != (pairs, a.shape[1], length, length) for a in out.attentions):
        shapes = None if out.attentions is None else [tuple(a.shape) for a in out.attentions]
        raise ValueError(f"the analysis needs one ({pairs}, heads, {length}, {length}) attention map over "
                         f"[text; image] per layer ({layers} layers), the encoder returned {shapes}")
    if out.hidden_states is None or len(out.hidden_states) != layers + 1 or any(
            h.shape[:2] != (pairs, length) for h in out.hidden_states):
        shapes = None if out.hidden_states is None else [tuple(h.shape) for h in out.hidden_states]
        raise ValueError(f"the analysis needs {layers + 1} hidden states of ({pairs}, {length}, D) over "
                         f"[text; image], the encoder returned {shapes}")
    return Capture(
        attentions=tuple(a.float().cpu() for a in out.attentions),
        hidden_states=tuple(h.float().cpu() for h in out.hidden_states),
        input_ids=inputs["input_ids"].cpu(),
        text_mask=text_mask.cpu(),
        image_mask=out.image_mask.cpu(),
        image_index=image_index.cpu(),
        grid_size=tuple(grid.mask.shape[1:]),
        stride=soho.backbone.stride,
        entries=None if grid.indices is None else grid.indices[image_index].cpu(),
    )


def image_caption_batches(shards: Union[str, List[str]], processor: SohoProcessor, batch_size: int,
                          max_batches: Optional[int] = None) -> Tuple[List[Dict[str, Tensor]], Dict[str, int]]:
    """Each image of an image-caption split with its first caption, in split order, in batches for
    :func:`capture`; and the counts of skipped broken samples (see :func:`read_retrieval_split`)."""
    max_images = None if max_batches is None else batch_size * max_batches
    split = read_retrieval_split(shards, processor, batch_size, max_images=max_images)
    first_caption: Dict[int, int] = {}
    for caption, image in enumerate(split.text_image.tolist()):
        first_caption.setdefault(image, caption)
    batches = []
    for number, (pixel_values, pixel_mask) in enumerate(split.image_batches):
        images = range(number * batch_size, number * batch_size + len(pixel_values))
        texts = [split.captions[first_caption[image]] for image in images]
        batches.append({"pixel_values": pixel_values, "pixel_mask": pixel_mask, **processor(text=texts)})
    return batches, split.skipped
