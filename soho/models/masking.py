"""Masking for MLM (text tokens) and MVM (visual dictionary cells)."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from soho.models.losses import IGNORE_INDEX


def mask_tokens(
    input_ids: Tensor,
    maskable: Tensor,
    mask_token_id: int,
    vocab_size: int,
    probability: float = 0.15,
    generator: Optional[torch.Generator] = None,
    random_token_ids: Optional[Sequence[int]] = None,
) -> Tuple[Tensor, Tensor]:
    """BERT masking: pick ``probability`` of the maskable tokens; 80 % -> [MASK], 10 % -> random, 10 % kept.

    ``maskable`` (N, L) is False for special and padding tokens, which are never picked.
    Random replacements are drawn from ``random_token_ids`` (default: the whole
    vocabulary) so that a special token is never inserted by accident.
    Returns the corrupted ids and labels (original id at picked positions, -100 elsewhere).
    """
    if input_ids.shape != maskable.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and maskable {tuple(maskable.shape)} differ in shape")
    device = input_ids.device
    draw = lambda: torch.rand(input_ids.shape, generator=generator, device=device)  # noqa: E731
    picked = (draw() < probability) & maskable.bool()
    labels = torch.where(picked, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    action = draw()
    to_mask = picked & (action < 0.8)
    to_random = picked & (action >= 0.8) & (action < 0.9)
    corrupted = input_ids.masked_fill(to_mask, mask_token_id)
    if random_token_ids is None:
        random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, device=device)
    else:
        pool = torch.as_tensor(list(random_token_ids), device=device)
        random_ids = pool[torch.randint(len(pool), input_ids.shape, generator=generator, device=device)]
    corrupted = torch.where(to_random, random_ids, corrupted)
    return corrupted, labels


def sample_mvm_mask(
    indices: Tensor,
    valid: Tensor,
    probability: float,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """SOHO's masked visual modelling mask, (B, h, w) bool.

    Each image is picked with ``probability``; for a picked image one valid cell is
    drawn at random and every valid cell mapped to the same dictionary entry is masked,
    so the model cannot copy the answer from a neighbouring cell with the same entry.
    """
    batch = indices.shape[0]
    flat_indices = indices.reshape(batch, -1)
    flat_valid = valid.reshape(batch, -1).bool()
    device = indices.device
    picked = torch.rand(batch, generator=generator, device=device) < probability
    # A random valid cell per image: the arg-max of random scores over valid cells.
    scores = torch.rand(flat_valid.shape, generator=generator, device=device).masked_fill(~flat_valid, -1.0)
    anchor = scores.argmax(dim=1)
    anchor_entry = flat_indices.gather(1, anchor[:, None])
    masked = (flat_indices == anchor_entry) & flat_valid & picked[:, None] & flat_valid.any(1, keepdim=True)
    return masked.view_as(valid)


def visible_entries(indices: Tensor, valid: Tensor, masked: Tensor, num_entries: int) -> Tensor:
    """(B, K) bool: which dictionary entries occur among each image's valid, unmasked cells.

    :func:`sample_mvm_mask` masks every cell of the picked entry, so a masked cell's entry
    is never one of these: MVM can rule them out.
    """
    batch = indices.shape[0]
    shown = valid.reshape(batch, -1).bool() & ~masked.reshape(batch, -1)
    # Cells that are not shown write into a spare column K, which is then dropped.
    slots = indices.reshape(batch, -1).masked_fill(~shown, num_entries)
    table = torch.zeros(batch, num_entries + 1, dtype=torch.bool, device=indices.device)
    return table.scatter_(1, slots, True)[:, :num_entries]
