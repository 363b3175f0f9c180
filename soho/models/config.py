"""Typed configuration of the soho model.

Field names of :class:`EncoderConfig` follow Hugging Face's ``BertConfig`` so a
BERT ``config.json`` maps onto it directly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional

from soho.config import ConfigError


@dataclass
class BackboneConfig:
    name: str = "resnet18"
    """Any timm CNN that supports ``features_only``."""
    pretrained_path: Optional[str] = None
    """Local timm or torchvision state dict (.safetensors, .pth, .bin); never downloaded."""
    out_index: int = 4
    """timm feature stage to use (ResNet: 3 = C4/stride 16, 4 = C5/stride 32)."""
    frozen_stages: int = 2
    """Feature stages (timm indices) frozen from the input side, BatchNorm in eval mode.
    ResNet: 0 none, 1 stem, 2 stem + first stage (the paper's recipe)."""
    extra_pool: int = 1
    """Max-pool kernel and stride after the chosen stage (the paper uses 2); 1 disables it."""
    channels_last: bool = False
    gradient_checkpointing: bool = False
    norm: Literal["batch", "group"] = "batch"
    """Normalisation in the CNN and the neck. ``group``: one-group GroupNorm, which does not depend
    on the batch, so a cell's features (and dictionary entry) are the same in training and
    evaluation; for CNNs trained from scratch (BatchNorm weights do not load into it)."""

    def __post_init__(self):
        if self.norm == "group" and self.pretrained_path:
            raise ConfigError("backbone.norm: group cannot load pretrained BatchNorm weights "
                              f"({self.pretrained_path}); use norm: batch")
        if self.out_index < 0:
            raise ConfigError(f"backbone.out_index must be >= 0, got {self.out_index}")
        if self.frozen_stages < 0:
            raise ConfigError(f"backbone.frozen_stages must be >= 0, got {self.frozen_stages}")
        if self.extra_pool < 1:
            raise ConfigError(f"backbone.extra_pool must be >= 1, got {self.extra_pool}")


@dataclass
class VisualDictionaryConfig:
    size: int = 2048
    """Number of entries K (the entry width is the encoder hidden size)."""
    momentum: float = 0.4
    """EMA coefficient gamma: n <- gamma * n + (1 - gamma) * count (the release uses 0.4)."""
    momentum_schedule: Literal["constant", "ramp"] = "constant"
    momentum_start: float = 0.0
    """With ``ramp``: gamma goes linearly from this to ``momentum`` over ``ramp_steps`` updates."""
    ramp_steps: int = 1000
    epsilon: float = 1e-5
    """Laplace smoothing of the EMA counts."""
    init: Literal["normal", "data"] = "normal"
    """``normal``: N(0, 1) as the release; ``data``: entries taken from the first batch of features."""
    restart_dead: bool = False
    """Re-seed entries whose EMA count fell below ``dead_threshold`` from current features."""
    dead_threshold: float = 1e-3
    restart_every: int = 100

    def __post_init__(self):
        if self.size < 1:
            raise ConfigError(f"visual_dictionary.size must be >= 1, got {self.size}")
        for name in ("momentum", "momentum_start"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"visual_dictionary.{name} must be in [0, 1), got {value}")
        if self.epsilon <= 0:
            raise ConfigError(f"visual_dictionary.epsilon must be > 0, got {self.epsilon}")
        if self.ramp_steps < 1 or self.restart_every < 1:
            raise ConfigError("visual_dictionary.ramp_steps and restart_every must be >= 1")


@dataclass
class AttentionConfig:
    score: Literal["scaled_dot"] = "scaled_dot"
    """Attention score function; ``scaled_dot`` runs through ``F.scaled_dot_product_attention``."""


@dataclass
class EncoderConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: Literal["gelu", "gelu_new", "relu", "gelu_pytorch_tanh"] = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    fusion: Literal["merged"] = "merged"
    """How text and image tokens attend to each other; ``merged`` is the single-stream SOHO design."""
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    pretrained_path: Optional[str] = None
    """Local Hugging Face BERT directory (config.json + weights) to initialise from."""
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"encoder.hidden_size ({self.hidden_size}) must be divisible by "
                f"encoder.num_attention_heads ({self.num_attention_heads})"
            )
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"encoder.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"encoder.{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


MVM_SCORES = ("classifier", "cosine")


@dataclass
class MVMConfig:
    probability: float = 0.3
    """Chance that an image gets masked cells (the release masks ~1.5 % of samples)."""
    score: str = "cosine"
    """How a masked cell's output becomes logits over the entries: ``cosine``, the release's
    cosine similarity to each entry, or ``classifier``, a learned linear layer. Cosine barely
    tells apart entries that differ mostly in norm, as small trained grids' entries do
    (docs/BENCHMARKS.md)."""
    temperature: float = 0.1
    """``cosine`` only: logits are cosine similarities divided by this."""
    exclude_visible: bool = False
    """Rule out the entries of the image's unmasked cells: masking takes every cell of the
    picked entry, so the answer is never among them (the release scores all entries)."""

    def __post_init__(self):
        if not 0.0 <= self.probability <= 1.0:
            raise ConfigError(f"mvm.probability must be in [0, 1], got {self.probability}")
        if self.score not in MVM_SCORES:
            raise ConfigError(f"mvm.score must be one of {', '.join(MVM_SCORES)}, got {self.score!r}")
        if self.temperature <= 0:
            raise ConfigError(f"mvm.temperature must be > 0, got {self.temperature}")


@dataclass
class ITMConfig:
    negative_probability: float = 0.5
    """Chance that a pair's caption is swapped for one of another image (SOHO: 0.5)."""
    hard_negatives: bool = False
    """Draw swapped captions from ITC similarities (needs ``itc.enabled``) instead of uniformly."""

    def __post_init__(self):
        if not 0.0 <= self.negative_probability <= 1.0:
            raise ConfigError(f"itm.negative_probability must be in [0, 1], got {self.negative_probability}")


@dataclass
class ITCConfig:
    enabled: bool = False
    embed_dim: int = 256
    temperature: float = 0.07
    """Initial temperature; it is learned (clamped to [0.001, 0.5])."""

    def __post_init__(self):
        if self.embed_dim < 1:
            raise ConfigError(f"itc.embed_dim must be >= 1, got {self.embed_dim}")
        if not 0.001 <= self.temperature <= 0.5:
            raise ConfigError(f"itc.temperature must be in [0.001, 0.5], got {self.temperature}")


@dataclass
class LossWeights:
    mlm: float = 1.0
    itm: float = 1.0
    mvm: float = 1.0
    itc: float = 1.0


@dataclass
class SohoConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    visual_dictionary: VisualDictionaryConfig = field(default_factory=VisualDictionaryConfig)
    use_visual_dictionary: bool = True
    """False feeds continuous grid features (what the release does at fine-tuning)."""
    mvm: MVMConfig = field(default_factory=MVMConfig)
    itm: ITMConfig = field(default_factory=ITMConfig)
    itc: ITCConfig = field(default_factory=ITCConfig)
    loss_weights: LossWeights = field(default_factory=LossWeights)
    labels: List[str] = field(default_factory=list)
    """Class names of a task head, in logit order (VE's three labels, VQA's answer
    vocabulary); saved with the checkpoint so predictions map back to strings."""

    def __post_init__(self):
        if self.itm.hard_negatives and not self.itc.enabled:
            raise ConfigError("itm.hard_negatives needs itc.enabled: true")
        if self.mvm.probability > 0 and self.loss_weights.mvm > 0 and not self.use_visual_dictionary:
            raise ConfigError("masked visual modeling needs the visual dictionary "
                              "(set use_visual_dictionary: true or loss_weights.mvm: 0)")
