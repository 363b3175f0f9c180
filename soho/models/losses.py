"""Pre-training losses as plain functions. Labels of -100 are ignored throughout."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from soho.distributed import all_gather, all_gather_with_grad, is_distributed, rank, rank_share

IGNORE_INDEX = -100


def masked_token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy over positions whose label is not ``IGNORE_INDEX`` (MLM, MVM).

    Returns 0 (with a graph) when no position is labelled, so a batch without masked
    tokens neither crashes nor yields NaN.
    """
    logits = logits.reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1)
    if not (labels != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)


def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Masked language modelling: logits (N, L, V), labels (N, L)."""
    return masked_token_loss(logits, labels)


def mvm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Masked visual modelling: logits (M, K) over dictionary entries, labels (M,) entry indices."""
    return masked_token_loss(logits, labels)


def itm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Classification image-text matching: logits (N, 2), labels (N,) with 1 = matched."""
    return F.cross_entropy(logits.float(), labels)


def contrastive_itm_loss(scores: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """Contrastive image-text matching: scores (N, 1 + K) of each caption's candidate images, its own
    image in column 0, K negatives after it; softmax cross-entropy towards column 0.

    ``valid`` (N, 1 + K) False drops a candidate from the softmax (another copy of the caption's own image
    is no negative).
    """
    scores = scores.float()
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    return F.cross_entropy(scores, torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device))


def ranked_first(scores: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """Fraction of rows whose column 0 (the positive) scores strictly above every other valid column.

    Strict, so a scorer that gives every candidate the same score is at 0, not at 1.
    """
    negatives = scores[:, 1:].float()
    if valid is not None:
        negatives = negatives.masked_fill(~valid[:, 1:], float("-inf"))
    if negatives.shape[1] == 0:
        return scores.new_ones(()).float()
    return (scores[:, 0].float() > negatives.max(1).values).float().mean()


def ranked_first_chance(valid: Tensor) -> Tensor:
    """Expected :func:`ranked_first` of random scores: the mean of 1 / (number of valid candidates)."""
    return (1.0 / valid.sum(1).float()).mean()


def itc_loss(image_embeds: Tensor, text_embeds: Tensor, temperature: Tensor,
             image_ids: Optional[Tensor] = None, text_image_ids: Optional[Tensor] = None,
             gather: bool = True) -> Tuple[Tensor, Tensor]:
    """Symmetric InfoNCE between L2-normalised image (B, E) and text (N, E) embeddings.

    With ``gather`` (training), negatives come from the whole global batch: the embeddings of all
    ranks are gathered with their gradients, and each direction's mean over this rank's rows is
    scaled by :func:`~soho.distributed.rank_share`, so that DDP's average of the ranks' losses and
    gradients equals one process on the whole batch. Without it (evaluation, where ranks may hold
    different numbers of batches and must not wait for each other) negatives stay local.

    With several captions per image, ``image_ids`` (B,) and ``text_image_ids`` (N,) say which
    texts match which images; every match is a positive and the target mass is spread
    evenly over them. Without ids, row i of each side matches row i of the other.
    Returns the loss and the local text-to-image similarity (N, B_global) / temperature.
    """
    gather = gather and is_distributed()
    if image_ids is None or text_image_ids is None:
        if image_embeds.shape[0] != text_embeds.shape[0]:
            raise ValueError("itc_loss needs image_ids and text_image_ids when images and texts differ in number")
        image_ids = torch.arange(image_embeds.shape[0], device=image_embeds.device)
        if gather:
            image_ids = image_ids + rank() * image_embeds.shape[0]
        text_image_ids = image_ids
    all_images = all_gather_with_grad(image_embeds) if gather else image_embeds
    all_texts = all_gather_with_grad(text_embeds) if gather else text_embeds
    all_image_ids = all_gather(image_ids) if gather else image_ids
    all_text_ids = all_gather(text_image_ids) if gather else text_image_ids

    logits_t2i = text_embeds.float() @ all_images.float().t() / temperature
    logits_i2t = image_embeds.float() @ all_texts.float().t() / temperature
    targets_t2i = (text_image_ids[:, None] == all_image_ids[None, :]).float()
    targets_i2t = (image_ids[:, None] == all_text_ids[None, :]).float()
    targets_t2i = targets_t2i / targets_t2i.sum(1, keepdim=True)
    targets_i2t = targets_i2t / targets_i2t.sum(1, keepdim=True)
    loss_t2i = -(targets_t2i * logits_t2i.log_softmax(dim=1)).sum(1).mean()
    loss_i2t = -(targets_i2t * logits_i2t.log_softmax(dim=1)).sum(1).mean()
    if gather:
        loss_t2i = loss_t2i * rank_share(text_embeds.shape[0], text_embeds.device)
        loss_i2t = loss_i2t * rank_share(image_embeds.shape[0], image_embeds.device)
    return (loss_t2i + loss_i2t) / 2, logits_t2i


def accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Fraction of labelled positions (label != -100) whose arg-max is right; NaN when none."""
    labels = labels.reshape(-1)
    predictions = logits.reshape(-1, logits.shape[-1]).argmax(-1)
    labelled = labels != IGNORE_INDEX
    if not labelled.any():
        return torch.tensor(float("nan"), device=logits.device)
    return (predictions[labelled] == labels[labelled]).float().mean()
