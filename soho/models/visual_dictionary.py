"""The visual dictionary: nearest-neighbour quantisation of grid features, updated by EMA.

Mechanism (as the SOHO release): the entries are a (K, D) buffer; each
feature maps to the entry at the smallest squared L2 distance; in training the entries
move towards the mean of their assigned features through an EMA of counts and sums
(summed over all ranks first, Laplace-smoothed, in fp32). Features get a
straight-through gradient; the dictionary gets none.

Additions over the release, all off by default except the first: unused entries keep
their value instead of collapsing to zero, optional initialisation from data, optional
restart of dead entries, and usage statistics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from soho.distributed import all_reduce_sum, is_distributed
from soho.models.config import VisualDictionaryConfig

# Rows per lookup chunk are chosen so that one chunk's (rows, K) fp32 distance matrix stays
# near 64 MiB: full-resolution grids (tens of thousands of cells x 2048 entries) would
# otherwise need gigabytes at once.
_LOOKUP_CHUNK_ELEMENTS = 1 << 24


@dataclass
class VDOutput:
    quantized: Tensor
    """(N, D) entry of each feature, in the input dtype, with the straight-through gradient."""
    indices: Tensor
    """(N,) entry index of each feature, looked up before this step's update."""


class VisualDictionary(nn.Module):
    """K entries of width ``dim``, kept in fp32 buffers that are saved with the state dict."""

    def __init__(self, config: VisualDictionaryConfig, dim: int):
        super().__init__()
        if dim < 1:
            raise ValueError(f"visual dictionary width must be >= 1, got {dim}")
        self.config = config
        self.size = config.size
        self.dim = dim
        embedding = torch.randn(config.size, dim)
        self.register_buffer("embedding", embedding)
        # Deliberate deviation from the release, whose sums start at zero so that every entry
        # unused by the first batch collapses to the origin. Starting from count 1 and
        # sum = entry, an unused entry keeps (up to Laplace smoothing) its value while its
        # statistics decay, and remains a reachable code.
        self.register_buffer("ema_count", torch.ones(config.size))
        self.register_buffer("ema_sum", embedding.clone())
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("initialized", torch.tensor(config.init != "data"))
        # Per-entry counts of the last update, summed over ranks, so that usage() reports
        # global statistics without a collective of its own.
        self._last_counts: Optional[Tensor] = None

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, momentum={self.config.momentum}, init={self.config.init!r}"

    def current_momentum(self) -> float:
        """EMA coefficient gamma for the next update."""
        config = self.config
        if config.momentum_schedule == "constant":
            return config.momentum
        progress = min(1.0, self.num_updates.item() / config.ramp_steps)
        return config.momentum_start + (config.momentum - config.momentum_start) * progress

    @torch.no_grad()
    def lookup(self, features: Tensor) -> Tensor:
        """(N,) index of the nearest entry to each (N, D) feature by squared L2 distance."""
        self._check_features(features)
        with torch.autocast(features.device.type, enabled=False):
            entries = self.embedding.float()
            entry_norms = entries.pow(2).sum(1)
            chunk = max(1, _LOOKUP_CHUNK_ELEMENTS // self.size)
            indices = []
            for x in features.detach().float().split(chunk):
                distances = x.pow(2).sum(1, keepdim=True) + entry_norms - 2.0 * x @ entries.t()
                indices.append(distances.argmin(dim=1))
            return torch.cat(indices)

    def forward(self, features: Tensor, mask: Optional[Tensor] = None) -> VDOutput:
        """Quantise (N, D) features; in training mode, then update the dictionary.

        ``mask`` (N,) marks the valid (unpadded) rows: only they seed or update entries.
        Every rank must call this in training mode at the same time (the update is a
        collective), whatever its number of valid rows.
        """
        self._check_features(features)
        if mask is None:
            valid = torch.ones(features.shape[0], dtype=torch.bool, device=features.device)
        elif mask.shape != features.shape[:1]:
            raise ValueError(f"mask must be ({features.shape[0]},), got shape {tuple(mask.shape)}")
        else:
            valid = mask.to(device=features.device, dtype=torch.bool)

        if self.training and not self.initialized.item():
            # Seed before the lookup so this batch is already quantised against its own data.
            seeds = self._sample_features(features, valid, self.size)
            if seeds is not None:
                self._reset_entries(torch.arange(self.size, device=seeds.device), seeds)
                self.initialized.fill_(True)

        indices = self.lookup(features)
        if self.training and self.config.entries_after_update:
            self._update(features, indices, valid)
        entries = self.embedding[indices].to(features.dtype)
        # Same value and gradient as x + (e - x).detach(), but the value is exactly e in
        # low precision too: x - x.detach() is an exact zero, (e - x) + x is rounded twice.
        quantized = entries + (features - features.detach())
        if self.training and not self.config.entries_after_update:
            self._update(features, indices, valid)
        return VDOutput(quantized=quantized, indices=indices)

    @torch.no_grad()
    def usage(self, indices: Tensor, mask: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """Perplexity exp(H) of the entry distribution, fractions of entries used and live.

        In training mode the counts are those of the last update, already summed over all
        ranks (``indices`` must come from that forward); otherwise they are this process's
        ``indices``. "Live" entries have an EMA count of at least ``dead_threshold``.
        """
        if self.training and self._last_counts is not None:
            counts = self._last_counts
        else:
            kept = indices if mask is None else indices[mask.bool()]
            counts = torch.bincount(kept, minlength=self.size).float()
        probs = counts / counts.sum().clamp(min=1.0)
        entropy = -(probs * probs.clamp(min=1e-12).log()).sum()
        return {
            "perplexity": entropy.exp(),
            "used_fraction": (counts > 0).float().mean(),
            "live_fraction": (self.ema_count >= self.config.dead_threshold).float().mean(),
        }

    def _check_features(self, features: Tensor) -> None:
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be (N, {self.dim}), got shape {tuple(features.shape)}")

    @torch.no_grad()
    def _update(self, features: Tensor, indices: Tensor, valid: Tensor) -> None:
        with torch.autocast(features.device.type, enabled=False):
            x = features.detach().float()[valid]
            idx = indices[valid]
            # Counts ride along as an extra column so one all-reduce carries both statistics.
            stats = torch.zeros(self.size, self.dim + 1, device=x.device)
            stats.index_add_(0, idx, torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1))
            all_reduce_sum(stats)
            if not torch.isfinite(stats).all():
                # A diverging step (its optimizer step is skipped) must not leave NaN in the entries for good.
                # The sums are the same on every rank, so every rank skips the update together.
                self._last_counts = None
                return
            sums, counts = stats[:, :-1], stats[:, -1]
            self._last_counts = counts

            gamma = self.current_momentum()
            self.ema_count.mul_(gamma).add_(counts, alpha=1.0 - gamma)
            self.ema_sum.mul_(gamma).add_(sums, alpha=1.0 - gamma)
            total = self.ema_count.sum()
            eps = self.config.epsilon
            smoothed = (self.ema_count + eps) / (total + self.size * eps) * total
            self.embedding.copy_(self.ema_sum / smoothed[:, None])
            self.num_updates += 1

            if self.config.restart_dead and self.num_updates.item() % self.config.restart_every == 0:
                # ema_count is identical on every rank, so all ranks agree on the dead set
                # and enter the collective in _sample_features together.
                dead = (self.ema_count < self.config.dead_threshold).nonzero().squeeze(1)
                if dead.numel():
                    seeds = self._sample_features(features, valid, dead.numel())
                    if seeds is not None:
                        self._reset_entries(dead, seeds)

    @torch.no_grad()
    def _sample_features(self, features: Tensor, valid: Tensor, num: int) -> Optional[Tensor]:
        """``num`` valid, finite features drawn at random, identical on every rank (None if no rank has any).

        Each rank offers ``num`` of its own valid features (distinct where it has enough);
        the pooled offers are then chosen from with a generator seeded by the update count,
        which all ranks share. A rank without valid rows still joins the all-gather, with
        its offer flagged unusable.
        """
        with torch.autocast(features.device.type, enabled=False):
            pool = features.detach().float()[valid]
            pool = pool[torch.isfinite(pool).all(1)]
            offer = pool.new_zeros(num, self.dim + 1)
            if pool.shape[0] >= num:
                offer[:, :-1] = pool[torch.randperm(pool.shape[0], device=pool.device)[:num]]
            elif pool.shape[0] > 0:
                offer[:, :-1] = pool[torch.randint(pool.shape[0], (num,), device=pool.device)]
            offer[:, -1] = float(pool.shape[0] > 0)
            if is_distributed():
                gathered = [torch.empty_like(offer) for _ in range(dist.get_world_size())]
                dist.all_gather(gathered, offer)
                offer = torch.cat(gathered)
            candidates = offer[offer[:, -1] > 0, :-1]
            if candidates.shape[0] == 0:
                return None
            generator = torch.Generator().manual_seed(int(self.num_updates.item()) + 1)
            if candidates.shape[0] >= num:
                choice = torch.randperm(candidates.shape[0], generator=generator)[:num]
            else:
                choice = torch.randint(candidates.shape[0], (num,), generator=generator)
            return candidates[choice.to(candidates.device)]

    def _reset_entries(self, entries: Tensor, values: Tensor) -> None:
        # Count 1 and sum = value: the new entry weighs like one feature in the next EMA steps.
        self.embedding[entries] = values
        self.ema_count[entries] = 1.0
        self.ema_sum[entries] = values
