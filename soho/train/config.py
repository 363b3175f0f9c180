"""Typed configuration of a pre-training run (model, data, optimisation, loop)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional, Tuple

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
    eval_shards: Optional[str] = "data/synthetic/retrieval_val"
    """Held-out image-caption shards evaluated at the end (and every ``eval_every`` steps)."""
    eval_every: int = 0
    eval_batches: int = 20

    def __post_init__(self):
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
