"""The cross-modal Transformer: BERT-compatible text embeddings, layers and pooler.

The modules are our own; their parameters map one-to-one onto a Hugging Face BERT
checkpoint (:func:`bert_state_dict_to_soho`), so a local BERT directory initialises
the encoder, the pooler and the MLM head.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn
from transformers.activations import ACT2FN

from soho.models.attention import MultiHeadAttention
from soho.models.config import EncoderConfig


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
    """Post-LayerNorm BERT layer: attention, then feed-forward, each with a residual.

    The single-stream (``merged``) layer: every token attends to every valid token.
    Every encoder layer takes the [text; image] sequence and ``text_length``, where the
    image tokens start; this one ignores it, the fusion variants below split on it.
    """

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
        self.activation = ACT2FN[config.hidden_act]
        self.pre_norm = config.pre_norm

    def forward(
        self,
        hidden_states: Tensor,
        key_padding_mask: Tensor,
        text_length: Optional[int] = None,
        output_attentions: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        if self.pre_norm:
            context, probs = self.attend(self.attention_norm(hidden_states), key_padding_mask, text_length,
                                         output_attentions)
            hidden_states = hidden_states + self.dropout(self.attention_output(context))
            feed_forward = self.output(self.activation(self.intermediate(self.output_norm(hidden_states))))
            return hidden_states + self.dropout(feed_forward), probs
        context, probs = self.attend(hidden_states, key_padding_mask, text_length, output_attentions)
        hidden_states = self.attention_norm(hidden_states + self.dropout(self.attention_output(context)))
        feed_forward = self.output(self.activation(self.intermediate(hidden_states)))
        hidden_states = self.output_norm(hidden_states + self.dropout(feed_forward))
        return hidden_states, probs

    def attend(self, hidden_states: Tensor, key_padding_mask: Tensor, text_length: Optional[int],
               output_attentions: bool) -> Tuple[Tensor, Optional[Tensor]]:
        return self.attention(hidden_states, key_padding_mask, output_attentions=output_attentions)


def place_keys(probs: Tensor, start: int, length: int) -> Tensor:
    """Widen (N, h, Lq, Lk) probabilities to all ``length`` keys: the given keys at ``start``, zeros elsewhere."""
    return F.pad(probs, (start, length - start - probs.shape[-1]))


def has_both_modalities(hidden_states: Tensor, text_length: int) -> bool:
    return 0 < text_length < hidden_states.shape[1]


class AsymmetricLayer(TransformerLayer):
    """A merged layer in which only one modality's queries see the other modality (Decoupling's asymmetric attention).

    With ``asymmetric_queries: text`` text queries attend to [text; image] and image queries
    to the image only (``image``: the reverse). The parameters are those of the merged layer,
    so BERT weights and merged checkpoints load unchanged. The two query groups run as two
    calls of the same attention rather than one call with a per-query mask: MultiHeadAttention
    masks keys, not (query, key) pairs, and the split keeps the SDPA fast path.
    """

    def __init__(self, config: EncoderConfig):
        super().__init__(config)
        self.crossing = config.asymmetric_queries

    def attend(self, hidden_states: Tensor, key_padding_mask: Tensor, text_length: Optional[int],
               output_attentions: bool) -> Tuple[Tensor, Optional[Tensor]]:
        if not has_both_modalities(hidden_states, text_length):
            return super().attend(hidden_states, key_padding_mask, text_length, output_attentions)
        length = hidden_states.shape[1]
        contexts, probs = [], []
        for modality, rows in (("text", slice(0, text_length)), ("image", slice(text_length, length))):
            if modality == self.crossing:
                context, p = self.attention(hidden_states[:, rows], key_padding_mask, hidden_states, output_attentions)
            else:
                context, p = self.attention(hidden_states[:, rows], key_padding_mask[:, rows],
                                            output_attentions=output_attentions)
                if output_attentions:
                    p = place_keys(p, rows.start, length)
            contexts.append(context)
            probs.append(p)
        return torch.cat(contexts, dim=1), torch.cat(probs, dim=2) if output_attentions else None


class ModalitySpecificLayer(nn.Module):
    """Two BERT layers with separate weights: text tokens attend only to text, image tokens only to the image."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.text = TransformerLayer(config)
        self.image = TransformerLayer(config)

    def forward(
        self,
        hidden_states: Tensor,
        key_padding_mask: Tensor,
        text_length: int,
        output_attentions: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        length = hidden_states.shape[1]
        states, probs = [], []
        for stream, rows in ((self.text, slice(0, text_length)), (self.image, slice(text_length, length))):
            if rows.start == rows.stop:
                continue
            s, p = stream(hidden_states[:, rows], key_padding_mask[:, rows], output_attentions=output_attentions)
            states.append(s)
            probs.append(place_keys(p, rows.start, length) if output_attentions else None)
        return torch.cat(states, dim=1), torch.cat(probs, dim=2) if output_attentions else None


class CrossAttention(nn.Module):
    """Queries of one modality over the keys and values of the other, BERT's output projection, residual, LayerNorm."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.attention = MultiHeadAttention(config.hidden_size, config.num_attention_heads,
                                            config.attention_probs_dropout_prob, config.attention)
        self.attention_output = nn.Linear(config.hidden_size, config.hidden_size)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.pre_norm = config.pre_norm

    def forward(self, hidden_states: Tensor, other_states: Tensor, other_mask: Tensor,
                output_attentions: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        if self.pre_norm:
            # The other stream's states are normalised by its own layer before they get here, or are the
            # embeddings (normalised too).
            context, probs = self.attention(self.attention_norm(hidden_states), other_mask, other_states,
                                            output_attentions)
            return hidden_states + self.dropout(self.attention_output(context)), probs
        context, probs = self.attention(hidden_states, other_mask, other_states, output_attentions)
        return self.attention_norm(hidden_states + self.dropout(self.attention_output(context))), probs


class CoAttentionLayer(ModalitySpecificLayer):
    """Two streams; each modality queries the other (cross-attention), then itself, then its feed-forward.

    The order of LXMERT's cross-modality layer, with one cross-attention per direction as in
    ViLBERT (LXMERT shares one between both; ViLBERT follows its co-attention block with a
    self-attention block, each with its own feed-forward). Both cross-attentions read this
    layer's input, so neither stream sees the other's update first. With one modality only
    there is nothing to cross to, and the layer is modality-specific.
    """

    def __init__(self, config: EncoderConfig):
        super().__init__(config)
        self.text_cross = CrossAttention(config)
        self.image_cross = CrossAttention(config)

    def forward(
        self,
        hidden_states: Tensor,
        key_padding_mask: Tensor,
        text_length: int,
        output_attentions: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        cross_probs = None
        if has_both_modalities(hidden_states, text_length):
            length = hidden_states.shape[1]
            text, image = hidden_states[:, :text_length], hidden_states[:, text_length:]
            text_mask, image_mask = key_padding_mask[:, :text_length], key_padding_mask[:, text_length:]
            crossed_text, text_probs = self.text_cross(text, image, image_mask, output_attentions)
            crossed_image, image_probs = self.image_cross(image, text, text_mask, output_attentions)
            hidden_states = torch.cat([crossed_text, crossed_image], dim=1)
            if output_attentions:
                cross_probs = torch.cat([place_keys(text_probs, text_length, length),
                                         place_keys(image_probs, 0, length)], dim=2)
        hidden_states, self_probs = super().forward(hidden_states, key_padding_mask, text_length, output_attentions)
        if not output_attentions:
            return hidden_states, None
        if cross_probs is None:
            cross_probs = torch.zeros_like(self_probs)
        # Cross-attention heads first, then self-attention heads: (N, 2 * heads, L, L).
        return hidden_states, torch.cat([cross_probs, self_probs], dim=1)


def build_layers(config: EncoderConfig) -> nn.ModuleList:
    if config.fusion == "co_attention":
        return nn.ModuleList(CoAttentionLayer(config) for _ in range(config.num_hidden_layers))
    if config.fusion == "asymmetric":
        return nn.ModuleList(AsymmetricLayer(config) for _ in range(config.num_hidden_layers))
    specific = config.modality_specific_layers if config.fusion == "modality_specific" else 0
    return nn.ModuleList([ModalitySpecificLayer(config) for _ in range(specific)]
                         + [TransformerLayer(config) for _ in range(config.num_hidden_layers - specific)])


@dataclass
class EncoderOutput:
    text_states: Optional[Tensor]
    """(N, Lt, D) final text token states, or None without text."""
    image_states: Optional[Tensor]
    """(N, Lv, D) final visual token states, or None without image."""
    hidden_states: Optional[Tuple[Tensor, ...]] = None
    """Per layer (input first) the (N, Lt + Lv, D) states, text first; on request."""
    attentions: Optional[Tuple[Tensor, ...]] = None
    """Per layer the attention probabilities over [text; image] keys, rows are queries in the same
    order; on request. (N, heads, L, L) with zeros on the keys a fusion design does not let a query
    see; ``co_attention``: (N, 2 * heads, L, L), its cross-attention heads then its self-attention
    heads (see :class:`Encoder`), the cross-attention heads all zero when only one modality is given."""


class Encoder(nn.Module):
    """A stack of Transformer layers over text and visual tokens.

    ``fusion`` decides which tokens attend to which (Decoupling, arXiv 2102.00529):

    - ``merged`` (SOHO, single stream): every token attends to every valid token of [text; image].
    - ``co_attention``: two streams with separate weights; in every layer each modality first
      queries the other's keys and values, then its own (:class:`CoAttentionLayer`).
    - ``modality_specific``: the first ``modality_specific_layers`` layers run per modality with
      separate weights (text sees only text, image only image), the rest are merged.
    - ``asymmetric``: merged layers in which only ``asymmetric_queries``' queries see the other modality.

    Every design takes and returns the [text; image] sequence in its original positions.
    Attention rows always sum to one over the keys of one attention; a ``co_attention`` layer
    has two attentions per query, so it reports its heads twice: the cross-attention heads (all
    mass on the other modality) and the self-attention heads (all mass on the own modality).
    """

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.layers = build_layers(config)
        self.gradient_checkpointing = config.gradient_checkpointing
        # Pre-LN layers leave their output unnormalised: one LayerNorm after the last layer.
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.pre_norm else None

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
        text_length = text.shape[1] if text is not None else 0
        all_hidden: List[Tensor] = [hidden] if output_hidden_states else []
        all_attentions: List[Tensor] = []
        checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if checkpoint:
                hidden, probs = torch.utils.checkpoint.checkpoint(
                    layer, hidden, mask, text_length, output_attentions, use_reentrant=False)
            else:
                hidden, probs = layer(hidden, mask, text_length, output_attentions)
            if output_hidden_states:
                all_hidden.append(hidden)
            if output_attentions:
                all_attentions.append(probs)
        if self.final_norm is not None:
            hidden = self.final_norm(hidden)
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
    ("cls.predictions.transform.dense.", "objectives.mlm.head.transform."),
    ("cls.predictions.transform.LayerNorm.", "objectives.mlm.head.norm."),
    ("cls.predictions.bias", "objectives.mlm.head.bias"),
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


_CROSS_ATTENTION_PARTS = ("attention.", "attention_output.", "attention_norm.")
_LAYER_KEY = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")


def bert_weights_for_fusion(state_dict: Dict[str, Tensor], config: EncoderConfig) -> Dict[str, Tensor]:
    """Place soho-named BERT weights (:func:`bert_state_dict_to_soho`) on the layers of ``config.fusion``.

    Merged and asymmetric layers are BERT layers. A modality-specific layer gets BERT layer i in both
    streams, and a co-attention layer also starts each cross-attention from layer i's self-attention,
    so every design starts from the same language model and a text-only pass reproduces BERT.
    """
    specific = (config.num_hidden_layers if config.fusion == "co_attention"
                else config.modality_specific_layers if config.fusion == "modality_specific" else 0)
    placed = {}
    for name, tensor in state_dict.items():
        match = _LAYER_KEY.match(name)
        if match is None or int(match[1]) >= specific:
            placed[name] = tensor
            continue
        layer, rest = match[1], match[2]
        copies = ["text", "image"]
        if config.fusion == "co_attention" and rest.startswith(_CROSS_ATTENTION_PARTS):
            copies += ["text_cross", "image_cross"]
        placed.update({f"encoder.layers.{layer}.{copy}.{rest}": tensor for copy in copies})
    return placed


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
