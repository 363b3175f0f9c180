"""Small prediction heads on top of the cross-modal Transformer."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from soho.models.encoder import ACTIVATIONS


class MLMHead(nn.Module):
    """BERT's prediction head: dense, activation, LayerNorm, then the tied word embeddings + bias."""

    def __init__(self, hidden_size: int, vocab_size: int, hidden_act: str = "gelu", layer_norm_eps: float = 1e-12):
        super().__init__()
        self.transform = nn.Linear(hidden_size, hidden_size)
        self.activation = ACTIVATIONS[hidden_act]
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, states: Tensor, word_embeddings: Tensor) -> Tensor:
        """The decoder is the word-embedding matrix, passed in rather than stored, so the
        tie survives any wrapping or re-materialisation of parameters (FSDP, safetensors)."""
        return F.linear(self.norm(self.activation(self.transform(states))), word_embeddings, self.bias)


class MVMHead(nn.Module):
    """Scores each visual token against every dictionary entry: cosine similarity / temperature."""

    def __init__(self, hidden_size: int, temperature: float, hidden_act: str = "gelu",
                 layer_norm_eps: float = 1e-12):
        super().__init__()
        self.transform = nn.Linear(hidden_size, hidden_size)
        self.activation = ACTIVATIONS[hidden_act]
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.temperature = temperature

    def forward(self, states: Tensor, dictionary: Tensor) -> Tensor:
        """states (N, D), dictionary (K, D) -> logits (N, K)."""
        hidden = F.normalize(self.norm(self.activation(self.transform(states))).float(), dim=-1)
        entries = F.normalize(dictionary.float(), dim=-1)
        return hidden @ entries.t() / self.temperature


class ClassifierHead(nn.Module):
    """Linear classifier over a pooled vector (ITM: 2 classes, 1 = matched)."""

    def __init__(self, hidden_size: int, num_classes: int):
        super().__init__()
        self.classifier = nn.Linear(hidden_size, num_classes)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.classifier(pooled)


class ContrastiveProjection(nn.Module):
    """Projects unimodal features into a shared, L2-normalised space with a learned temperature."""

    def __init__(self, hidden_size: int, embed_dim: int, temperature: float):
        super().__init__()
        self.text_projection = nn.Linear(hidden_size, embed_dim)
        self.image_projection = nn.Linear(hidden_size, embed_dim)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))

    @property
    def temperature(self) -> Tensor:
        # Clamped so the logits can neither vanish nor explode (CLIP caps its scale at 100).
        return self.log_temperature.exp().clamp(min=1e-3, max=0.5)

    def embed_text(self, pooled: Tensor) -> Tensor:
        return F.normalize(self.text_projection(pooled), dim=-1)

    def embed_image(self, pooled: Tensor) -> Tensor:
        return F.normalize(self.image_projection(pooled), dim=-1)
