"""Typed configuration of the soho model.

Field names of :class:`EncoderConfig` follow Hugging Face's ``BertConfig`` so a
BERT ``config.json`` maps onto it directly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional

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
    entries_after_update: bool = False
    """In training, quantise each feature to its entry as the step's EMA update left it (the SOHO release) rather
    than as it was before (the lookup is the same either way; only the returned vectors differ)."""
    tokens: Literal["entries", "features", "gated"] = "entries"
    """What the Transformer reads for each cell: its ``entries`` (the paper; straight-through gradient to the CNN),
    the continuous grid ``features`` (the dictionary then only gives MVM its targets), or ``gated``: entry and
    feature mixed by a learned per-cell softmax gate over both (the release)."""
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


ATTENTION_SCORES = ("dot", "scaled_dot", "cosine", "general_qwk", "general_kwq", "biased_general",
                    "activated_general", "additive")
SCORE_ACTIVATIONS = ("tanh", "sigmoid", "relu", "gelu", "leaky_relu", "elu", "softplus")


@dataclass
class AttentionConfig:
    """How a query q and a key k (per head, width d) score each other (arXiv 2208.08104)."""

    score: str = "scaled_dot"
    """``dot`` qᵀk, ``scaled_dot`` qᵀk/√d (BERT; the only one run by ``F.scaled_dot_product_attention``),
    ``cosine`` s·qᵀk/(‖q‖‖k‖), ``general_qwk`` qᵀWk, ``general_kwq`` kᵀWq, ``biased_general`` qᵀ(Wk + b),
    ``activated_general`` act(qᵀ(Wk + b)), ``additive`` vᵀtanh(W₁q + W₂k). W starts at I/√d, b at 0, so the
    general family starts as ``scaled_dot`` and BERT weights stay useful."""
    share_weights: bool = False
    """One W (b, v, cosine scale) for all heads instead of one per head."""
    activation: str = "tanh"
    """``activated_general`` only: one of tanh, sigmoid, relu, gelu, leaky_relu, elu, softplus."""
    additive_hidden_size: Optional[int] = None
    """``additive`` only: width d' of W₁q + W₂k (default: the head width). Memory grows with
    batch × heads × Lq × Lk × d'."""
    cosine_scale: float = 10.0
    """``cosine`` only: scores are cosines times this (plain cosines in [-1, 1] leave the softmax nearly flat)."""
    learn_cosine_scale: bool = True
    """``cosine`` only: learn the scale (per head, in log space, capped at 100) from ``cosine_scale``."""

    def __post_init__(self):
        if self.score not in ATTENTION_SCORES:
            raise ConfigError(f"encoder.attention.score must be one of {', '.join(ATTENTION_SCORES)}, "
                              f"got {self.score!r}")
        if self.activation not in SCORE_ACTIVATIONS:
            raise ConfigError(f"encoder.attention.activation must be one of {', '.join(SCORE_ACTIVATIONS)}, "
                              f"got {self.activation!r}")
        if self.additive_hidden_size is not None and self.additive_hidden_size < 1:
            raise ConfigError(f"encoder.attention.additive_hidden_size must be >= 1, got {self.additive_hidden_size}")
        if not 0.0 < self.cosine_scale <= 100.0:
            raise ConfigError(f"encoder.attention.cosine_scale must be in (0, 100], got {self.cosine_scale}")


FUSIONS = ("merged", "co_attention", "modality_specific", "asymmetric")


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
    fusion: str = "merged"
    """How text and image tokens attend to each other (Decoupling, arXiv 2102.00529): ``merged``, the
    single-stream SOHO design; ``co_attention``, two streams, each modality queries the other, then itself;
    ``modality_specific``, ``modality_specific_layers`` per-modality layers, then merged ones; ``asymmetric``,
    merged layers where only ``asymmetric_queries``' queries see the other modality."""
    modality_specific_layers: int = 0
    """``modality_specific`` only: how many of the first layers run per modality (1 to num_hidden_layers)."""
    asymmetric_queries: Optional[Literal["text", "image"]] = None
    """``asymmetric`` only: the modality whose queries also attend to the other modality."""
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    pretrained_path: Optional[str] = None
    """Local Hugging Face BERT directory (config.json + weights) to initialise from."""
    pre_norm: bool = False
    """LayerNorm before each attention and feed-forward block (and once after the last layer) instead of after
    each residual sum (BERT). Pre-LN stacks train from scratch without a long stall; BERT weights are post-LN."""
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
        if self.pre_norm and self.pretrained_path:
            raise ConfigError(f"encoder.pre_norm cannot load BERT weights ({self.pretrained_path}), which are post-LN; "
                              "set encoder.pre_norm: false")
        self._check_fusion()

    def _check_fusion(self) -> None:
        if self.fusion not in FUSIONS:
            raise ConfigError(f"encoder.fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        if self.fusion == "modality_specific":
            if not 1 <= self.modality_specific_layers <= self.num_hidden_layers:
                raise ConfigError(f"encoder.modality_specific_layers must be in [1, encoder.num_hidden_layers="
                                  f"{self.num_hidden_layers}] with fusion modality_specific, "
                                  f"got {self.modality_specific_layers}")
        elif self.modality_specific_layers:
            raise ConfigError(f"encoder.modality_specific_layers={self.modality_specific_layers} is only used with "
                              f"encoder.fusion: modality_specific (fusion is {self.fusion})")
        if self.fusion == "asymmetric" and self.asymmetric_queries not in ("text", "image"):
            raise ConfigError(f"encoder.asymmetric_queries must be text or image with fusion asymmetric, "
                              f"got {self.asymmetric_queries!r}")
        if self.fusion != "asymmetric" and self.asymmetric_queries is not None:
            raise ConfigError(f"encoder.asymmetric_queries={self.asymmetric_queries} is only used with "
                              f"encoder.fusion: asymmetric (fusion is {self.fusion})")

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
    anchor: Literal["uniform", "rare"] = "uniform"
    """Which entry a picked image masks (every cell of it): that of a cell drawn uniformly (``uniform``, SOHO), so
    mostly the background's, or of a cell drawn with weight one over its entry's cell count (``rare``), so each
    entry present alike, objects as often as the background."""
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


ITM_LOSSES = ("classification", "contrastive")


@dataclass
class ITMConfig:
    loss: str = "classification"
    """``classification``: SOHO's matched / mismatched classifier over each pair's pooled [CLS].
    ``contrastive`` (Decoupling, arXiv 2102.00529): a scalar score per pair and a softmax over each caption's
    own image and ``contrastive_negatives`` other images; every candidate is one more fused pass."""
    pairing: Literal["swap", "paired"] = "swap"
    """``classification`` only. ``swap`` (SOHO): a caption is shown with another image instead of its own with
    ``negative_probability``, in the pass the other objectives share. ``paired`` (ALBEF): every caption is shown
    with its own image and, in one more fused pass, with another one (twice the fused pairs per caption)."""
    negative_probability: float = 0.5
    """``classification`` with ``swap`` only: chance that a pair's image is swapped for another one (SOHO: 0.5)."""
    contrastive_negatives: int = 32
    """``contrastive`` only: negative images per caption, drawn from the other images of the batch (at most
    all of them); Decoupling compares 32 and 1024."""
    hard_negatives: bool = False
    """Draw negative images from ITC similarities (needs ``itc.enabled``) instead of uniformly."""
    near_miss_probability: float = 0.0
    """In training, where the data gives each caption's near misses (``caption_near_miss``: images it is false of
    but true of once one attribute it names is ignored, "a red circle" for "a red triangle"), the chance that a
    caption's negative is drawn among them: pairs that colour alone cannot tell apart."""
    use_truth: bool = True
    """Where the data says which captions are true of which images (``caption_truth``: the synthetic world's
    scene graphs), draw negatives among the images a caption is false of and label pairs by truth, not by
    image identity (a caption such as "there is one object" is true of many images)."""

    def __post_init__(self):
        if self.loss not in ITM_LOSSES:
            raise ConfigError(f"itm.loss must be one of {', '.join(ITM_LOSSES)}, got {self.loss!r}")
        if not 0.0 <= self.negative_probability <= 1.0:
            raise ConfigError(f"itm.negative_probability must be in [0, 1], got {self.negative_probability}")
        if not 0.0 <= self.near_miss_probability <= 1.0:
            raise ConfigError(f"itm.near_miss_probability must be in [0, 1], got {self.near_miss_probability}")
        if self.contrastive_negatives < 1:
            raise ConfigError(f"itm.contrastive_negatives must be >= 1, got {self.contrastive_negatives}")


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
class SohoConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    visual_dictionary: VisualDictionaryConfig = field(default_factory=VisualDictionaryConfig)
    use_visual_dictionary: bool = True
    """False feeds continuous grid features (what the release does at fine-tuning)."""
    mvm: MVMConfig = field(default_factory=MVMConfig)
    itm: ITMConfig = field(default_factory=ITMConfig)
    itc: ITCConfig = field(default_factory=ITCConfig)
    loss_weights: Dict[str, float] = field(default_factory=lambda: {"mlm": 1.0, "itm": 1.0, "mvm": 1.0, "itc": 1.0})
    """Weight of each pre-training objective by name (:mod:`soho.models.objectives`); one left out weighs 1,
    0 keeps its head but computes no loss. ITC and MVM exist only with ``itc.enabled`` and the dictionary."""
    labels: List[str] = field(default_factory=list)
    """Class names of a task head, in logit order (VE's three labels, VQA's answer
    vocabulary); saved with the checkpoint so predictions map back to strings."""

    def __post_init__(self):
        if self.itm.hard_negatives and not self.itc.enabled:
            raise ConfigError("itm.hard_negatives needs itc.enabled: true")
        for name, weight in self.loss_weights.items():
            if not (math.isfinite(weight) and weight >= 0):
                raise ConfigError(f"loss_weights.{name} must be a finite number >= 0, got {weight}")
        if self.mvm.probability > 0 and self.loss_weights.get("mvm", 1.0) > 0 and not self.use_visual_dictionary:
            raise ConfigError("masked visual modeling needs the visual dictionary "
                              "(set use_visual_dictionary: true or loss_weights.mvm: 0)")
