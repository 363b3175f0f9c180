"""Multi-head attention with a pluggable score function (arXiv 2208.08104).

A score function maps per-head queries (B, h, Lq, d) and keys (B, h, Lk, d) to
scores (B, h, Lq, Lk): rows are queries, the softmax runs over keys. The default,
``scaled_dot``, additionally runs through ``F.scaled_dot_product_attention`` when
attention probabilities are not requested, so the analysis hooks cost nothing on
the training path.

Learned score weights are plain parameters (not ``nn.Linear``) so the model's BERT
initialisation, which re-draws every Linear, leaves their start values alone: W = I/√d
and b = 0 make the general family compute exactly ``scaled_dot`` until training moves
them, so BERT's query and key projections keep their meaning. A BERT checkpoint has
no such weights: loading one leaves them at these start values.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from soho.models.config import AttentionConfig

SCORE_ACTIVATION_FUNCTIONS: Dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu": F.relu,
    "gelu": F.gelu,
    "leaky_relu": F.leaky_relu,
    "elu": F.elu,
    "softplus": F.softplus,
}

# Swin v2's cap on a learned cosine scale: it keeps the scale from growing until attention is one-hot.
MAX_COSINE_SCALE = 100.0


def _weight_heads(config: AttentionConfig, num_heads: int) -> int:
    """Leading size of a learned score weight: 1 broadcasts one weight over all heads."""
    return 1 if config.share_weights else num_heads


class ScoreFunction(nn.Module):
    """Queries (B, h, Lq, d) and keys (B, h, Lk, d) -> scores (B, h, Lq, Lk), one row per query."""

    uses_sdpa = False

    def __init__(self, config: AttentionConfig, head_dim: int, num_heads: int):
        super().__init__()


class DotScore(ScoreFunction):
    """qᵀk."""

    def forward(self, query: Tensor, key: Tensor) -> Tensor:
        return torch.matmul(query, key.transpose(-1, -2))


class ScaledDotScore(ScoreFunction):
    """qᵀk / √d, the Transformer/BERT score."""

    uses_sdpa = True

    def __init__(self, config: AttentionConfig, head_dim: int, num_heads: int):
        super().__init__(config, head_dim, num_heads)
        self.scale = 1.0 / math.sqrt(head_dim)

    def forward(self, query: Tensor, key: Tensor) -> Tensor:
        return torch.matmul(query, key.transpose(-1, -2)) * self.scale


class CosineScore(ScoreFunction):
    """s · qᵀk / (‖q‖‖k‖), s learned per head (log space, capped) or fixed.

    Cosines alone lie in [-1, 1], so two keys' probabilities differ by at most a
    factor e²: without the scale s the softmax stays nearly uniform over long inputs.
    """

    def __init__(self, config: AttentionConfig, head_dim: int, num_heads: int):
        super().__init__(config, head_dim, num_heads)
        log_scale = torch.full((_weight_heads(config, num_heads), 1, 1), math.log(config.cosine_scale))
        if config.learn_cosine_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale, persistent=False)

    def forward(self, query: Tensor, key: Tensor) -> Tensor:
        cosine = torch.matmul(F.normalize(query, dim=-1), F.normalize(key, dim=-1).transpose(-1, -2))
        return cosine * self.log_scale.clamp(max=math.log(MAX_COSINE_SCALE)).exp()


class GeneralQWKScore(ScoreFunction):
    """qᵀWk with a learned d×d W per head (or shared), starting at I/√d, i.e. at ``scaled_dot``."""

    def __init__(self, config: AttentionConfig, head_dim: int, num_heads: int):
        super().__init__(config, head_dim, num_heads)
        identity = torch.eye(head_dim) / math.sqrt(head_dim)
        self.weight = nn.Parameter(identity.repeat(_weight_heads(config, num_heads), 1, 1))

    def forward(self, query: Tensor, key: Tensor) -> Tensor:
        return torch.matmul(torch.matmul(query, self.weight), key.transpose(-1, -2))


class GeneralKWQScore(GeneralQWKScore):
    """kᵀWq = qᵀWᵀk: the key-side bilinear form, built key × query and turned back to query rows."""

    def forward(self, query: Tensor, key: Tensor) -> Tensor:
        return torch.matmul(torch.matmul(key, self.weight), query.transpose(-1, -2)).transpose(-1, -2)


class BiasedGeneralScore(GeneralQWKScore):
    """qᵀ(Wk + b). The qᵀb term is the same for every key, so it cancels in the softmax
    (b gets no gradient): attention equals ``general_qwk`` with the same W."""

    def __init__(self, config: AttentionConfig, head_dim: int, num_heads: int):
        super().__init__(config, head_dim, num_heads)
        self.bias = nn.Parameter(torch.zeros(_weight_heads(config, num_heads), head_dim, 1))

    def forward(self, query: Tensor, key: Tensor) -> Tensor:
        return super().forward(query, key) + torch.matmul(query, self.bias)


class ActivatedGeneralScore(BiasedGeneralScore):
    """act(qᵀ(Wk + b)); unlike in ``biased_general`` the bias survives a non-linear act.
    Bounded acts (tanh, sigmoid) cap scores, and with them how peaked attention can get."""

    def __init__(self, config: AttentionConfig, head_dim: int, num_heads: int):
        super().__init__(config, head_dim, num_heads)
        self.activation = SCORE_ACTIVATION_FUNCTIONS[config.activation]

    def forward(self, query: Tensor, key: Tensor) -> Tensor:
        return self.activation(super().forward(query, key))


class AdditiveScore(ScoreFunction):
    """vᵀtanh(W₁q + W₂k) (Bahdanau), W₁, W₂: d'×d, v: d'.

    tanh does not factor over queries and keys, so it runs on a (B, h, Lq, Lk, d')
    tensor, kept for backward: d' times the memory of the scores themselves, which is
    why d' (``additive_hidden_size``) can be smaller than the head width.
    """

    def __init__(self, config: AttentionConfig, head_dim: int, num_heads: int):
        super().__init__(config, head_dim, num_heads)
        hidden = config.additive_hidden_size or head_dim
        heads = _weight_heads(config, num_heads)
        # No weights reproduce a dot product here. Entries of std 1/√d keep W₁q + W₂k at the
        # inputs' own scale (tanh not saturated from the start); v of std 1/√d' keeps scores of order one.
        self.query_weight = nn.Parameter(torch.randn(heads, hidden, head_dim) / math.sqrt(head_dim))
        self.key_weight = nn.Parameter(torch.randn(heads, hidden, head_dim) / math.sqrt(head_dim))
        self.vector = nn.Parameter(torch.randn(heads, hidden) / math.sqrt(hidden))

    def forward(self, query: Tensor, key: Tensor) -> Tensor:
        projected_query = torch.matmul(query, self.query_weight.transpose(-1, -2))
        projected_key = torch.matmul(key, self.key_weight.transpose(-1, -2))
        hidden = torch.tanh(projected_query.unsqueeze(-2) + projected_key.unsqueeze(-3))
        return torch.matmul(hidden, self.vector[:, None, :, None]).squeeze(-1)


SCORE_FUNCTIONS: Dict[str, Type[ScoreFunction]] = {
    "dot": DotScore,
    "scaled_dot": ScaledDotScore,
    "cosine": CosineScore,
    "general_qwk": GeneralQWKScore,
    "general_kwq": GeneralKWQScore,
    "biased_general": BiasedGeneralScore,
    "activated_general": ActivatedGeneralScore,
    "additive": AdditiveScore,
}


def added_parameters(module: nn.Module) -> int:
    """Number of parameters the score functions inside ``module`` add to a BERT-shaped model."""
    params = {id(p): p for m in module.modules() if isinstance(m, ScoreFunction) for p in m.parameters()}
    return sum(p.numel() for p in params.values())


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
