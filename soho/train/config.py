"""Typed configuration of what every training run shares: optimisation and the loop.

Each task's full run config (model or initial checkpoint, data, these two) lives with the task
(:mod:`soho.tasks`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional, Tuple

from soho.config import ConfigError

MAX_LR = 10.0
"""Above this a learning rate is a typo (``1e6`` for ``1e-6``), not a setting: the first steps would diverge."""


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
        # Written so that NaN, which fails every comparison, fails them too (configs built in code skip from_dict).
        if not 0 < self.lr <= MAX_LR:
            raise ConfigError(f"lr must be in (0, {MAX_LR:g}], got {self.lr}")
        if not 0 <= self.weight_decay < 1:
            raise ConfigError(f"weight_decay must be in [0, 1), got {self.weight_decay}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if not all(0 <= beta < 1 for beta in self.betas):
            raise ConfigError(f"betas must be in [0, 1), got {self.betas}")
        if not self.eps > 0:
            raise ConfigError(f"eps must be > 0, got {self.eps}")


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
        if not 0 < self.decay_factor <= 1 or not 0 <= self.min_lr_factor <= 1:
            raise ConfigError(f"optim.decay_factor must be in (0, 1] and optim.min_lr_factor in [0, 1], got "
                              f"{self.decay_factor} and {self.min_lr_factor}")
        if not self.grad_clip >= 0:
            raise ConfigError(f"optim.grad_clip must be >= 0, got {self.grad_clip}")


@dataclass
class TrainConfig:
    """The training loop of every task (:class:`soho.train.trainer.Trainer`)."""

    output_dir: str = "runs/run"
    max_steps: int = 1000
    """Optimizer steps."""
    max_minutes: Optional[float] = None
    """Also stop (checkpoint, evaluate) after this much wall time."""
    batch_size: int = 32
    """Per device and micro-step: images in pre-training and retrieval (each with its captions), examples
    in the other tasks."""
    eval_batch_size: int = 64
    eval_batches: Optional[int] = None
    """Pre-training: evaluate at most this many batches per split and process (None: the whole split)."""
    eval_every: int = 0
    """Evaluate the first of ``data.eval_shards`` every N steps (0: only at the end, on every split)."""
    seed: int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    compile: bool = False
    log_every: int = 20
    save_every: int = 0
    """Checkpoint (full training state, resumable) every N steps, at the last step and when ``max_minutes``
    stops the run; 0: only the final export."""
    keep_last: int = 2
    resume: Optional[str] = None
    """``auto`` (latest checkpoint in output_dir, if any) or a checkpoint directory."""
    trackers: List[Literal["tensorboard", "wandb"]] = field(default_factory=list)
    """Accelerate trackers that receive every logged record (wandb offline with ``WANDB_MODE=offline``)."""
    freeze_backbone_norm_at: Optional[int] = None
    """From this optimizer step on, the backbone's BatchNorm layers use their running statistics
    (``Backbone.freeze_norm_statistics``), so dictionary assignments stop depending on the batch."""
    max_nonfinite_steps: int = 10
    """A step whose loss or gradient norm is not finite is skipped on every process; this many in a row stop
    the run (exit code 3) before it burns more time."""

    def __post_init__(self):
        if self.freeze_backbone_norm_at is not None and self.freeze_backbone_norm_at < 0:
            raise ConfigError(f"train.freeze_backbone_norm_at must be >= 0, got {self.freeze_backbone_norm_at}")
        for name in ("max_steps", "batch_size", "eval_batch_size", "log_every", "keep_last", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("save_every", "eval_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.eval_batches is not None and self.eval_batches < 1:
            raise ConfigError(f"train.eval_batches must be >= 1, got {self.eval_batches}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ConfigError(f"train.max_minutes must be > 0, got {self.max_minutes}")
