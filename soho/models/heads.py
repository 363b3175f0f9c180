"""Small prediction heads on top of the cross-modal Transformer."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.activations import ACT2FN


class MLMHead(nn.Module):
    """BERT's prediction head: dense, activation, LayerNorm, then the tied word embeddings + bias."""

    def __init__(self, hidden_size: int, vocab_size: int, hidden_act: str = "gelu", layer_norm_eps: float = 1e-12):
        super().__init__()
        self.transform = nn.Linear(hidden_size, hidden_size)
        self.activation = ACT2FN[hidden_act]
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, states: Tensor, word_embeddings: Tensor) -> Tensor:
        """The decoder is the word-embedding matrix, passed in rather than stored, so the
        tie survives any wrapping or re-materialisation of parameters (FSDP, safetensors)."""
        return F.linear(self.norm(self.activation(self.transform(states))), word_embeddings, self.bias)


class MVMHead(nn.Module):
    """Predicts the dictionary entry of masked cells: logits (N, K) over the K entries.

    ``cosine``: the release's cosine similarity to each entry, divided by a temperature.
    ``classifier``: a learned linear layer over the entries, as BEiT predicts tokenizer
    codes. Trained grids' entries can point in nearly the same direction as their
    neighbours and differ mostly in norm; cosine logits then barely tell them apart.
    """

    def __init__(self, hidden_size: int, num_entries: int, score: str = "cosine", temperature: float = 0.1,
                 hidden_act: str = "gelu", layer_norm_eps: float = 1e-12):
        super().__init__()
        self.transform = nn.Linear(hidden_size, hidden_size)
        self.activation = ACT2FN[hidden_act]
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.score = score
        self.temperature = temperature
        self.decoder = nn.Linear(hidden_size, num_entries) if score == "classifier" else None

    def forward(self, states: Tensor, dictionary: Tensor) -> Tensor:
        """states (N, D), dictionary (K, D) -> logits (N, K)."""
        hidden = self.norm(self.activation(self.transform(states)))
        if self.decoder is not None:
            return self.decoder(hidden)
        entries = F.normalize(dictionary.float(), dim=-1)
        return F.normalize(hidden.float(), dim=-1) @ entries.t() / self.temperature


class ClassifierHead(nn.Module):
    """Linear classifier over a pooled vector (ITM: 2 classes, 1 = matched)."""

    def __init__(self, hidden_size: int, num_classes: int):
        super().__init__()
        self.classifier = nn.Linear(hidden_size, num_classes)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.classifier(pooled)


class ScoreHead(nn.Module):
    """One scalar per pooled vector (contrastive ITM: how well the pair matches, compared across images)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.score = nn.Linear(hidden_size, 1)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.score(pooled).squeeze(-1)


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
