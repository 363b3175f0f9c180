"""The visual dictionary: nearest-neighbour quantisation of grid features, updated by EMA.

Mechanism (REFERENCE §1, as the SOHO release): entries are a K x D buffer; each
feature maps to the entry at the smallest squared L2 distance; in training the
entries move towards the mean of their assigned features by an EMA of counts and
sums (summed over all ranks first, Laplace-smoothed), in fp32; the features receive
a straight-through gradient and the dictionary none.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from soho.distributed import all_reduce_sum, is_distributed
from soho.models.config import VisualDictionaryConfig


@dataclass
class VDOutput:
    quantized: Tensor
    """(N, D) entry vectors with the straight-through gradient of the input, in the input dtype."""
    indices: Tensor
    """(N,) entry index of each feature (looked up before this step's update)."""


class VisualDictionary(nn.Module):
    def __init__(self, config: VisualDictionaryConfig, dim: int):
        super().__init__()
        self.config = config
        self.size = config.size
        self.dim = dim
        embedding = torch.randn(config.size, dim)
        self.register_buffer("embedding", embedding)
        # Deliberate deviation from the release, whose sums start at zero so that every
        # entry unused in the first batch collapses to the origin: starting from count 1
        # and sum = entry, an unused entry keeps its value while its statistics decay.
        self.register_buffer("ema_count", torch.ones(config.size))
        self.register_buffer("ema_sum", embedding.clone())
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("initialized", torch.tensor(config.init == "normal"))
        self._last_counts: Optional[Tensor] = None

    def current_momentum(self) -> float:
        config = self.config
        if config.momentum_schedule == "constant":
            return config.momentum
        progress = min(1.0, self.num_updates.item() / config.ramp_steps)
        return config.momentum_start + (config.momentum - config.momentum_start) * progress

    @torch.no_grad()
    def lookup(self, features: Tensor) -> Tensor:
        """Index of the nearest entry by squared L2 distance, in fp32."""
        with torch.autocast(features.device.type, enabled=False):
            x = features.float()
            entries = self.embedding.float()
            distances = (x.pow(2).sum(1, keepdim=True) + entries.pow(2).sum(1)[None, :]
                         - 2.0 * x @ entries.t())
            return distances.argmin(dim=1)

    def forward(self, features: Tensor, mask: Optional[Tensor] = None) -> VDOutput:
        """Quantise (N, D) features; in training mode also update the dictionary.

        ``mask`` (N,) marks the valid (unpadded) rows; only they update the statistics.
        """
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be (N, {self.dim}), got shape {tuple(features.shape)}")
        valid = torch.ones(features.shape[0], dtype=torch.bool, device=features.device) if mask is None \
            else mask.bool()
        if self.training and not bool(self.initialized):
            self._seed_entries(features, valid, torch.arange(self.size, device=features.device))
            self.initialized.fill_(True)
        indices = self.lookup(features)
        entries = self.embedding[indices].to(features.dtype)
        quantized = features + (entries - features).detach()
        if self.training:
            self._update(features, indices, valid)
        return VDOutput(quantized=quantized, indices=indices)

    @torch.no_grad()
    def _update(self, features: Tensor, indices: Tensor, valid: Tensor) -> None:
        with torch.autocast(features.device.type, enabled=False):
            x = features.float()[valid]
            idx = indices[valid]
            counts = torch.zeros(self.size, device=x.device).index_add_(0, idx, torch.ones_like(idx, dtype=torch.float))
            sums = torch.zeros(self.size, self.dim, device=x.device).index_add_(0, idx, x)
            all_reduce_sum(counts)
            all_reduce_sum(sums)
            self._last_counts = counts
            gamma = self.current_momentum()
            self.ema_count.mul_(gamma).add_(counts, alpha=1 - gamma)
            self.ema_sum.mul_(gamma).add_(sums, alpha=1 - gamma)
            total = self.ema_count.sum()
            eps = self.config.epsilon
            smoothed = (self.ema_count + eps) / (total + self.size * eps) * total
            self.embedding.copy_(self.ema_sum / smoothed[:, None])
            self.num_updates += 1
            if self.config.restart_dead and self.num_updates.item() % self.config.restart_every == 0:
                dead = (self.ema_count < self.config.dead_threshold).nonzero().squeeze(1)
                if dead.numel():
                    self._seed_entries(features, valid, dead)

    @torch.no_grad()
    def _seed_entries(self, features: Tensor, valid: Tensor, entries: Tensor) -> None:
        """Set ``entries`` to randomly drawn valid features, identically on every rank.

        Each rank contributes a fixed-size sample of its features;
        the pooled candidates are then chosen with a generator seeded by the update
        count, which all ranks share.
        """
        with torch.autocast(features.device.type, enabled=False):
            pool = features.detach().float()[valid]
            if pool.shape[0] == 0:  # still take part in the collective below
                pool = features.detach().float()
            take = entries.numel()
            # Distinct features where there are enough, so seeded entries do not coincide.
            local = torch.randperm(pool.shape[0], device=pool.device)[:take] if pool.shape[0] >= take \
                else torch.randint(pool.shape[0], (take,), device=pool.device)
            candidates = pool[local]
            if is_distributed():
                gathered = [torch.empty_like(candidates) for _ in range(dist.get_world_size())]
                dist.all_gather(gathered, candidates.contiguous())
                candidates = torch.cat(gathered)
            generator = torch.Generator().manual_seed(int(self.num_updates.item()) + 1)
            choice = torch.randperm(candidates.shape[0], generator=generator)[:take].to(candidates.device)
            new = candidates[choice]
            self.embedding[entries] = new
            self.ema_count[entries] = 1.0
            self.ema_sum[entries] = new

    @torch.no_grad()
    def usage(self, indices: Tensor, mask: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """Batch perplexity exp(H) of entry use, fraction of entries used, fraction still live.

        In training the counts are the ones just reduced over all ranks.
        """
        if self.training and self._last_counts is not None:
            counts = self._last_counts
        else:
            idx = indices if mask is None else indices[mask.bool()]
            counts = torch.bincount(idx, minlength=self.size).float()
        probs = counts / counts.sum().clamp(min=1.0)
        entropy = -(probs * probs.clamp(min=1e-12).log()).sum()
        return {
            "perplexity": entropy.exp(),
            "used_fraction": (counts > 0).float().mean(),
            "live_fraction": (self.ema_count >= self.config.dead_threshold).float().mean(),
        }
