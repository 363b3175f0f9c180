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


def _as_int64(value: int) -> int:
    """A 64-bit unsigned constant as the signed value torch's int64 arithmetic wraps to."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _as_int64(0x9E3779B97F4A7C15)
_MIX_1 = _as_int64(0xBF58476D1CE4E5B9)
_MIX_2 = _as_int64(0x94D049BB133111EB)


def keyed_uniform(seeds: Tensor, count: int) -> Tensor:
    """(len(seeds), count) float32 numbers in [0, 1), each a fixed function of (seed, column).

    SplitMix64's finaliser over int64 tensors, on the seeds' device. A row's numbers depend on
    its seed only, not on which other rows share the batch, so draws made this way are the same
    whether a batch is processed whole or split over ranks, and again after a resume.
    """
    columns = torch.arange(1, count + 1, device=seeds.device, dtype=torch.int64)
    x = seeds.to(torch.int64)[:, None] * _GOLDEN + columns[None, :] * _MIX_2
    # torch shifts int64 arithmetically; the masks make them the logical shifts SplitMix64 needs.
    x = (x ^ ((x >> 30) & ((1 << 34) - 1))) * _MIX_1
    x = (x ^ ((x >> 27) & ((1 << 37) - 1))) * _MIX_2
    x = x ^ ((x >> 31) & ((1 << 33) - 1))
    return ((x >> 40) & ((1 << 24) - 1)).to(torch.float32) / float(1 << 24)


def sample_mvm_mask(indices: Tensor, valid: Tensor, probability: float, seeds: Tensor,
                    anchor: str = "uniform") -> Tensor:
    """SOHO's masked visual modelling mask, (B, h, w) bool.

    Each image is picked with ``probability``; for a picked image one valid cell is drawn at random (the
    anchor) and every valid cell mapped to the same dictionary entry is masked, so the model cannot copy the
    answer from a neighbouring cell with the same entry. ``anchor``: ``uniform`` draws every valid cell
    alike (SOHO), so the entries covering most of the image (background) are masked most often; ``rare``
    draws a cell with weight one over how many cells of its image share its entry, so every entry present
    is masked equally often, objects as often as the background. ``seeds`` (B,) key each image's draws
    (:func:`keyed_uniform`).
    """
    batch = indices.shape[0]
    flat_indices = indices.reshape(batch, -1)
    flat_valid = valid.reshape(batch, -1).bool()
    draws = keyed_uniform(seeds.to(indices.device), 1 + flat_valid.shape[1])
    picked = draws[:, 0] < probability
    scores = draws[:, 1:]
    if anchor == "rare":
        same = (flat_indices[:, :, None] == flat_indices[:, None, :]) & flat_valid[:, None, :]
        # The arg-max of u^(1/w) draws each cell with probability proportional to w (Efraimidis-Spirakis).
        scores = scores.clamp(min=1e-12).log() * same.sum(2).clamp(min=1).float()
    # A random valid cell per image: the arg-max of its scores over valid cells.
    anchor_cell = scores.masked_fill(~flat_valid, float("-inf")).argmax(dim=1)
    anchor_entry = flat_indices.gather(1, anchor_cell[:, None])
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
