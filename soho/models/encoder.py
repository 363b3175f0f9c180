"""The cross-modal Transformer: BERT-compatible text embeddings, layers and pooler.

The modules are our own; their parameters map one-to-one onto a Hugging Face BERT
checkpoint (:func:`bert_state_dict_to_soho`), so a local BERT directory initialises
the encoder, the pooler and the MLM head.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from soho.models.attention import MultiHeadAttention
from soho.models.config import EncoderConfig

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class TextEmbeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout (BERT's ``embeddings``)."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, token_type_ids: Optional[Tensor] = None) -> Tensor:
        length = input_ids.shape[1]
        if length > self.position_embeddings.num_embeddings:
            raise ValueError(f"text of {length} tokens exceeds max_position_embeddings="
                             f"{self.position_embeddings.num_embeddings}")
        positions = torch.arange(length, device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        embeddings = (self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
                      + self.token_type_embeddings(token_type_ids))
        return self.dropout(self.norm(embeddings))


class TransformerLayer(nn.Module):
    """Post-LayerNorm BERT layer: attention, then feed-forward, each with a residual."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.attention = MultiHeadAttention(config.hidden_size, config.num_attention_heads,
                                            config.attention_probs_dropout_prob, config.attention)
        self.attention_output = nn.Linear(config.hidden_size, config.hidden_size)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.intermediate = nn.Linear(config.hidden_size, config.intermediate_size)
        self.output = nn.Linear(config.intermediate_size, config.hidden_size)
        self.output_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.activation = ACTIVATIONS[config.hidden_act]

    def forward(
        self,
        hidden_states: Tensor,
        key_padding_mask: Tensor,
        key_value_states: Optional[Tensor] = None,
        output_attentions: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        context, probs = self.attention(hidden_states, key_padding_mask, key_value_states, output_attentions)
        hidden_states = self.attention_norm(hidden_states + self.dropout(self.attention_output(context)))
        feed_forward = self.output(self.activation(self.intermediate(hidden_states)))
        hidden_states = self.output_norm(hidden_states + self.dropout(feed_forward))
        return hidden_states, probs


@dataclass
class EncoderOutput:
    text_states: Optional[Tensor]
    """(N, Lt, D) final text token states, or None without text."""
    image_states: Optional[Tensor]
    """(N, Lv, D) final visual token states, or None without image."""
    hidden_states: Optional[Tuple[Tensor, ...]] = None
    """Per layer (input first) the (N, Lt + Lv, D) states, text first; on request."""
    attentions: Optional[Tuple[Tensor, ...]] = None
    """Per layer (N, heads, L, L) attention probabilities over [text; image]; on request."""


class Encoder(nn.Module):
    """A stack of Transformer layers over text and visual tokens.

    ``fusion`` decides which tokens attend to which. ``merged`` (SOHO, single stream)
    concatenates [text; image] and lets every token attend to every valid token.
    """

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = config.gradient_checkpointing

    def forward(
        self,
        text: Optional[Tensor] = None,
        text_mask: Optional[Tensor] = None,
        image: Optional[Tensor] = None,
        image_mask: Optional[Tensor] = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> EncoderOutput:
        parts = [(x, m) for x, m in ((text, text_mask), (image, image_mask)) if x is not None]
        if not parts:
            raise ValueError("the encoder needs text, image or both")
        for states, mask in parts:
            if mask is None or mask.shape != states.shape[:2]:
                raise ValueError(f"a (N, L) padding mask matching states of shape {tuple(states.shape)} is required")
        hidden = torch.cat([x for x, _ in parts], dim=1)
        mask = torch.cat([m.bool() for _, m in parts], dim=1)
        all_hidden: List[Tensor] = [hidden] if output_hidden_states else []
        all_attentions: List[Tensor] = []
        checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if checkpoint:
                hidden, probs = torch.utils.checkpoint.checkpoint(
                    layer, hidden, mask, None, output_attentions, use_reentrant=False)
            else:
                hidden, probs = layer(hidden, mask, output_attentions=output_attentions)
            if output_hidden_states:
                all_hidden.append(hidden)
            if output_attentions:
                all_attentions.append(probs)
        text_length = text.shape[1] if text is not None else 0
        return EncoderOutput(
            text_states=hidden[:, :text_length] if text is not None else None,
            image_states=hidden[:, text_length:] if image is not None else None,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
        )


class Pooler(nn.Module):
    """tanh(W · h_[CLS]), BERT's pooler."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, first_token: Tensor) -> Tensor:
        return torch.tanh(self.dense(first_token))


# Hugging Face BERT name fragment -> soho name fragment, applied in order.
_BERT_RENAMES = [
    ("embeddings.LayerNorm.", "text_embeddings.norm."),
    ("embeddings.", "text_embeddings."),
    ("encoder.layer.", "encoder.layers."),
    (".attention.self.", ".attention."),
    (".attention.output.dense.", ".attention_output."),
    (".attention.output.LayerNorm.", ".attention_norm."),
    (".intermediate.dense.", ".intermediate."),
    (".output.dense.", ".output."),
    (".output.LayerNorm.", ".output_norm."),
    ("pooler.dense.", "pooler.dense."),
    ("cls.predictions.transform.dense.", "mlm_head.transform."),
    ("cls.predictions.transform.LayerNorm.", "mlm_head.norm."),
    ("cls.predictions.bias", "mlm_head.bias"),
]


def bert_state_dict_to_soho(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Rename a Hugging Face BERT state dict to soho's names (relative to ``SohoModel`` and heads).

    Keys soho has no counterpart for (NSP head, the untied MLM decoder copy,
    ``position_ids`` buffers) are dropped.
    """
    converted = {}
    for name, tensor in state_dict.items():
        name = name.replace(".gamma", ".weight").replace(".beta", ".bias")
        if name.startswith("bert."):
            name = name[len("bert."):]
        if name.endswith("position_ids") or name.startswith(("cls.seq_relationship", "cls.predictions.decoder")):
            continue
        for old, new in _BERT_RENAMES:
            if name.startswith(old) or (old.startswith(".") and old in name):
                name = name.replace(old, new, 1)
        converted[name] = tensor
    return converted


def read_bert_checkpoint(path: str | Path) -> Tuple[Dict, Dict[str, Tensor]]:
    """Read ``config.json`` and the weights of a local Hugging Face BERT directory.

    Weights come from ``model.safetensors`` or, failing that, ``pytorch_model.bin``
    loaded with ``weights_only=True`` so nothing but tensors is unpickled.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no BERT config.json in {path}")
    config = json.loads(config_file.read_text())
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        weights = load_file(str(path / "model.safetensors"))
    elif (path / "pytorch_model.bin").is_file():
        weights = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {path}")
    return config, weights


def check_bert_config(encoder: EncoderConfig, bert_config: Dict) -> None:
    """Refuse a BERT checkpoint whose shapes disagree with the encoder config."""
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "max_position_embeddings", "type_vocab_size"):
        if key in bert_config and bert_config[key] != getattr(encoder, key):
            raise ValueError(f"BERT checkpoint has {key}={bert_config[key]} but encoder.{key}="
                             f"{getattr(encoder, key)}; make the config match the checkpoint")
