"""Reading an image-caption split whole, in order, for retrieval evaluation."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from soho.data.pretraining import scene_claims
from soho.data.samples import SampleError, decode_captioned_image
from soho.data.shards import SkipCounter, expand_urls, stream_samples
from soho.data.synthetic.logic import truth_table
from soho.processing import SohoProcessor

logger = logging.getLogger(__name__)


@dataclass
class RetrievalSplit:
    image_ids: List[str]
    captions: List[str]
    text_image: Tensor
    """(N,) index into ``image_ids`` of each caption."""
    image_batches: List[Tuple[Tensor, Tensor]]
    """(pixel_values, pixel_mask) per batch of images, in ``image_ids`` order."""
    text_batches: List[Dict[str, Tensor]]
    """Tokenised captions per batch, in ``captions`` order."""
    skipped: Dict[str, int]
    truth: Optional[Tensor] = None
    """(N, M) bool: whether each caption is true of each image, where the records say (the synthetic world's
    claims and scene graphs); a caption is true of its own image and maybe of others."""


def read_retrieval_split(shards: Union[str, List[str]], processor: SohoProcessor, batch_size: int = 64,
                         max_images: Optional[int] = None) -> RetrievalSplit:
    """Every image of the split with all its captions (the 5-caption test protocol).

    Broken samples are skipped, logged and counted in ``skipped``, never silently dropped.
    """
    skips = SkipCounter()
    image_ids: List[str] = []
    captions: List[str] = []
    text_image: List[int] = []
    images = []
    meanings = []
    for sample in stream_samples(expand_urls(shards), seed=0, rank=0, world_size=1, worker=0, num_workers=1,
                                 skips=skips, repeat=False):
        if max_images is not None and len(image_ids) >= max_images:
            break
        key = sample.get("__key__", "?")
        try:
            record, texts, image = decode_captioned_image(sample)
        except SampleError as error:
            skips.skip(error.reason, f"{sample.get('__url__', '')}:{key}", error)
            continue
        images.append(image)
        meanings.append(scene_claims(record, range(len(texts))))
        text_image += [len(image_ids)] * len(texts)
        image_ids.append(str(record.get("image_id", key)))
        captions += texts
    if not image_ids:
        raise ValueError(f"no usable image-caption samples in {shards!r} (skipped: {dict(skips)})")
    if skips:
        logger.warning("skipped %d samples of %s: %s", sum(skips.values()), shards, dict(skips))
    image_batches = []
    for start in range(0, len(images), batch_size):
        inputs = processor(images=images[start:start + batch_size])
        image_batches.append((inputs["pixel_values"], inputs["pixel_mask"]))
    text_batches = [processor(text=captions[start:start + batch_size])
                    for start in range(0, len(captions), batch_size)]
    truth = None
    if all(meaning is not None for meaning in meanings):
        truth = torch.tensor(truth_table([claim for meaning in meanings for claim in meaning["claims"]],
                                         [meaning["scene"] for meaning in meanings]))
    return RetrievalSplit(image_ids=image_ids, captions=captions, text_image=torch.tensor(text_image),
                          image_batches=image_batches, text_batches=text_batches, skipped=dict(skips), truth=truth)
