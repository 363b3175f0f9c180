"""Typed configuration of pre-training and fine-tuning runs (model, data, optimisation, loop)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, Tuple

from soho.config import ConfigError
from soho.data.pretraining import PretrainingDataConfig
from soho.models.config import SohoConfig


@dataclass
class OptimizerConfig:
    name: Literal["sgd", "adamw"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.01
    momentum: float = 0.9
    """SGD only."""
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    """AdamW only."""
    fused: bool = False
    """torch's fused implementation (one kernel per step for all parameters; CPU and CUDA)."""

    def __post_init__(self):
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError(f"optimizer lr must be > 0 and weight_decay >= 0 (got {self.lr}, {self.weight_decay})")


@dataclass
class OptimConfig:
    backbone: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(name="sgd", lr=1e-2, weight_decay=1e-4, momentum=0.9))
    """The CNN (the paper trains it with SGD)."""
    rest: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Everything else: encoder, embeddings, heads, neck."""
    schedule: Literal["constant", "step", "cosine"] = "step"
    warmup_steps: int = 1000
    warmup_start_factor: float = 1.0 / 3.0
    milestones: List[int] = field(default_factory=list)
    """Optimizer steps at which ``step`` multiplies the rate by ``decay_factor``."""
    decay_factor: float = 0.1
    min_lr_factor: float = 0.0
    """Floor of the cosine schedule, as a fraction of the peak rate."""
    grad_clip: float = 10.0
    """Max global gradient norm; 0 disables clipping."""
    accumulation_steps: int = 1

    def __post_init__(self):
        if self.warmup_steps < 0 or self.accumulation_steps < 1:
            raise ConfigError("optim.warmup_steps must be >= 0 and optim.accumulation_steps >= 1")
        if not 0.0 < self.warmup_start_factor <= 1.0:
            raise ConfigError(f"optim.warmup_start_factor must be in (0, 1], got {self.warmup_start_factor}")
        if sorted(self.milestones) != list(self.milestones):
            raise ConfigError(f"optim.milestones must be increasing, got {self.milestones}")


@dataclass
class TrainConfig:
    output_dir: str = "runs/pretrain"
    max_steps: int = 1000
    """Optimizer steps."""
    max_minutes: Optional[float] = None
    """Also stop (checkpoint, evaluate) after this much wall time."""
    batch_size: int = 32
    """Images per device per micro-step (each with ``data.captions_per_image`` captions)."""
    seed: int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    compile: bool = False
    log_every: int = 20
    save_every: int = 500
    keep_last: int = 2
    resume: Optional[str] = None
    """``auto`` (latest checkpoint in output_dir, if any) or a checkpoint directory."""
    trackers: List[Literal["tensorboard", "wandb"]] = field(default_factory=list)
    eval_shards: Optional[str] = None
    """Held-out image-caption shards evaluated at the end (and every ``eval_every`` steps); unset: none."""
    eval_every: int = 0
    eval_batches: int = 20
    freeze_backbone_norm_at: Optional[int] = None
    """From this optimizer step on, the backbone's BatchNorm layers use their running statistics
    (``Backbone.freeze_norm_statistics``), so dictionary assignments stop depending on the batch."""

    def __post_init__(self):
        if self.freeze_backbone_norm_at is not None and self.freeze_backbone_norm_at < 0:
            raise ConfigError(f"train.freeze_backbone_norm_at must be >= 0, got {self.freeze_backbone_norm_at}")
        for name in ("max_steps", "batch_size", "log_every", "save_every", "keep_last", "eval_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError(f"train.max_minutes must be > 0, got {self.max_minutes}")


@dataclass
class PretrainConfig:
    model: SohoConfig = field(default_factory=SohoConfig)
    data: PretrainingDataConfig = field(default_factory=PretrainingDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    synthetic_root: Optional[str] = None
    """If set, the synthetic world is generated here first when it is missing."""

    def __post_init__(self):
        if self.data.shards is None:
            raise ConfigError("data.shards is required: the image-caption shards to pre-train on")
        if self.data.tokenizer is None:
            raise ConfigError("data.tokenizer is required: the tokenizer directory for the captions")


@dataclass
class InitConfig:
    checkpoint: Optional[str] = None
    """A ``save_pretrained`` directory: the architecture, the processor and (unless
    ``from_scratch``) the weights to start from."""
    from_scratch: bool = False
    """Same architecture and processor, random weights: the baseline a pre-trained start must beat."""
    model_overrides: List[str] = field(default_factory=list)
    """Dotted overrides of the checkpoint's model config, e.g. ``use_visual_dictionary=false``."""


@dataclass
class FinetuneDataConfig:
    train_shards: Optional[str] = None
    eval_shards: Dict[str, str] = field(default_factory=dict)
    """Split name -> shards, each evaluated at the end (the first also every ``train.eval_every`` steps)."""
    max_text_length: Optional[int] = None
    """Default: the checkpoint processor's."""
    shuffle_buffer: int = 1000
    num_workers: int = 1
    max_skip_fraction: float = 0.05
    captions_per_image: int = 1
    """Retrieval only: captions drawn per training image (they share one backbone pass)."""
    answer_vocabulary: Optional[str] = None
    """VQA only: a JSON file ``{"answers": [...]}`` (``AnswerVocabulary.load``, e.g. the VQA v2 converter's
    ``answer_vocabulary.json``) whose answers become the classes; default: the most frequent training answers."""
    answer_vocabulary_size: int = 3129
    """VQA only: the most classes: the most frequent training answers kept, or the most answers
    ``answer_vocabulary`` may list (a longer file is an error, not cut: nothing says it is ranked)."""
    answer_min_count: int = 1
    """VQA only, without ``answer_vocabulary``: in how many training questions an answer must occur to be a class."""

    def __post_init__(self):
        if self.train_shards is None:
            raise ConfigError("data.train_shards is required")
        if not self.eval_shards:
            raise ConfigError("data.eval_shards needs at least one split to evaluate")
        if self.num_workers < 0 or self.shuffle_buffer < 0 or self.captions_per_image < 1:
            raise ConfigError("data.num_workers and data.shuffle_buffer must be >= 0, captions_per_image >= 1")
        if self.answer_vocabulary_size < 1 or self.answer_min_count < 1:
            raise ConfigError("data.answer_vocabulary_size and data.answer_min_count must be >= 1")
        if self.answer_vocabulary is not None and self.answer_min_count != 1:
            raise ConfigError(f"data.answer_min_count={self.answer_min_count} filters the answers counted in the "
                              f"training shards, but data.answer_vocabulary={self.answer_vocabulary!r} gives the "
                              "classes as they are: set one of the two")


@dataclass
class RetrievalTaskConfig:
    itc: bool = True
    """Train with ITC too (needs a model with ITC heads)."""
    hard_negatives: bool = False
    """ITM negatives drawn from ITC similarities instead of uniformly."""
    protocols: List[Literal["itm_all", "itc", "itc_itm"]] = field(default_factory=lambda: ["itc", "itc_itm"])
    k: int = 16
    itc_weight: float = 0.0
    max_eval_images: Optional[int] = None
    """Evaluate on the first N images of each split (all-pairs ITM grows with N²)."""


@dataclass
class FinetuneTrainConfig:
    output_dir: str = "runs/finetune"
    max_steps: int = 500
    max_minutes: Optional[float] = None
    batch_size: int = 32
    """Examples (retrieval: images) per device per micro-step."""
    eval_batch_size: int = 64
    seed: int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    log_every: int = 20
    eval_every: int = 0
    trackers: List[Literal["tensorboard", "wandb"]] = field(default_factory=list)
    """Accelerate trackers that receive every logged record (wandb offline with ``WANDB_MODE=offline``)."""
    save_every: int = 0
    """Checkpoint (full training state, resumable) every N steps, and when ``max_minutes`` stops the run;
    0: only the final ``model/`` export."""
    keep_last: int = 2
    resume: Optional[str] = None
    """``auto`` (latest checkpoint in output_dir, if any) or a checkpoint directory."""

    def __post_init__(self):
        if self.save_every < 0:
            raise ConfigError(f"train.save_every must be >= 0, got {self.save_every}")
        for name in ("max_steps", "batch_size", "eval_batch_size", "log_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError(f"train.max_minutes must be > 0, got {self.max_minutes}")


@dataclass
class FinetuneConfig:
    task: Literal["retrieval", "nlvr2", "ve", "vqa"] = "ve"
    init: InitConfig = field(default_factory=InitConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    retrieval: RetrievalTaskConfig = field(default_factory=RetrievalTaskConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        backbone=OptimizerConfig(name="adamw", lr=5e-5, weight_decay=1e-4),
        rest=OptimizerConfig(name="adamw", lr=5e-5, weight_decay=0.01),
        schedule="cosine", warmup_steps=50))
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)

    def __post_init__(self):
        if self.init.checkpoint is None:
            raise ConfigError("init.checkpoint is required: the save_pretrained directory whose architecture and "
                              "processor (and, unless init.from_scratch, weights) fine-tuning starts from")
        if self.data.answer_vocabulary is not None and self.task != "vqa":
            raise ConfigError(f"data.answer_vocabulary is for task vqa; task {self.task} has no answer classes")
