"""Multi-head attention with a pluggable score function.

A score function maps per-head queries (B, h, Lq, d) and keys (B, h, Lk, d) to
scores (B, h, Lq, Lk): rows are queries, the softmax runs over keys. The default,
``scaled_dot``, additionally runs through ``F.scaled_dot_product_attention`` when
attention probabilities are not requested, so the analysis hooks cost nothing on
the training path.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from soho.models.config import AttentionConfig


class ScaledDotScore(nn.Module):
    """q·k / sqrt(d), the Transformer/BERT score."""

    uses_sdpa = True

    def __init__(self, config: AttentionConfig, head_dim: int, num_heads: int):
        super().__init__()
        self.scale = 1.0 / math.sqrt(head_dim)

    def forward(self, query: Tensor, key: Tensor) -> Tensor:
        return torch.matmul(query, key.transpose(-1, -2)) * self.scale


SCORE_FUNCTIONS: Dict[str, Type[nn.Module]] = {
    "scaled_dot": ScaledDotScore,
}


class MultiHeadAttention(nn.Module):
    """Query, key and value projections plus the attention itself (BERT's ``attention.self``)."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, config: AttentionConfig):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.dropout = dropout
        self.score = SCORE_FUNCTIONS[config.score](config, self.head_dim, num_heads)

    def _split_heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        hidden_states: Tensor,
        key_padding_mask: Tensor,
        key_value_states: Optional[Tensor] = None,
        output_attentions: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """hidden_states (B, Lq, D) query the keys of ``key_value_states`` (default: themselves).

        key_padding_mask (B, Lk) is True for keys that may be attended to.
        Returns the context (B, Lq, D) and, on request, probabilities (B, h, Lq, Lk).
        """
        source = hidden_states if key_value_states is None else key_value_states
        query = self._split_heads(self.query(hidden_states))
        key = self._split_heads(self.key(source))
        value = self._split_heads(self.value(source))
        allowed = key_padding_mask[:, None, None, :]
        dropout = self.dropout if self.training else 0.0
        if self.score.uses_sdpa and not output_attentions:
            context = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, dropout_p=dropout)
            probs = None
        else:
            scores = self.score(query, key)
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
            probs = scores.softmax(dim=-1)
            context = torch.matmul(F.dropout(probs, dropout, self.training), value)
        context = context.transpose(1, 2).flatten(2)
        return context, probs
