"""What every fine-tuning task shares: a run that starts from a ``save_pretrained`` checkpoint (or, as the
baseline, from the same architecture with random weights) and evaluates named splits."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional

from torch import nn

from soho.config import ConfigError, apply_overrides, from_dict, to_dict
from soho.models.config import SohoConfig
from soho.models.pretrained import read_config
from soho.processing import SohoProcessor
from soho.tasks.base import RunConfig, Task, check_shards, check_task
from soho.train.config import OptimConfig, OptimizerConfig, TrainConfig


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

    def __post_init__(self):
        if self.train_shards is None:
            raise ConfigError("data.train_shards is required")
        if not self.eval_shards:
            raise ConfigError("data.eval_shards needs at least one split to evaluate")
        if self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ConfigError("data.num_workers and data.shuffle_buffer must be >= 0")


def finetune_optim() -> OptimConfig:
    return OptimConfig(backbone=OptimizerConfig(name="adamw", lr=5e-5, weight_decay=1e-4),
                       rest=OptimizerConfig(name="adamw", lr=5e-5, weight_decay=0.01),
                       schedule="cosine", warmup_steps=50)


@dataclass
class FinetuneConfig(RunConfig):
    task: str = "ve"
    init: InitConfig = field(default_factory=InitConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    optim: OptimConfig = field(default_factory=finetune_optim)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/finetune", max_steps=500))

    def __post_init__(self):
        check_task(self)
        if self.init.checkpoint is None:
            raise ConfigError("init.checkpoint is required: the save_pretrained directory whose architecture and "
                              "processor (and, unless init.from_scratch, weights) fine-tuning starts from")


class FinetuneTask(Task):
    """A task whose model starts from ``init.checkpoint``. Subclasses set ``model_class`` and may adapt the
    checkpoint's architecture (:meth:`model_config`)."""

    model_class: ClassVar[type]

    def setup(self, accelerator) -> None:
        init, data = self.config.init, self.config.data
        check_shards("data.train_shards", data.train_shards)
        check_shards("data.eval_shards", data.eval_shards)
        if not Path(init.checkpoint).is_dir():
            raise ConfigError(f"init.checkpoint: no such directory: {init.checkpoint}")
        try:
            self.processor = SohoProcessor.from_pretrained(init.checkpoint)
            base = to_dict(read_config(init.checkpoint))
        except (OSError, ValueError) as error:
            raise ConfigError(f"init.checkpoint: {error}") from None
        self.architecture = self.model_config(from_dict(SohoConfig, apply_overrides(base, init.model_overrides)))

    @property
    def max_text_length(self) -> int:
        return self.config.data.max_text_length or self.processor.max_text_length

    def model_config(self, checkpoint: SohoConfig) -> SohoConfig:
        """The architecture to train: the checkpoint's (with ``init.model_overrides``) and what the task needs."""
        return checkpoint

    def build_model(self) -> nn.Module:
        if self.config.init.from_scratch:
            return self.model_class(self.architecture)
        try:
            return self.model_class.from_pretrained(self.config.init.checkpoint, config=self.architecture, strict=False)
        except (OSError, ValueError) as error:  # missing or damaged weights
            raise ConfigError(f"init.checkpoint: {error}") from None

    def describe(self) -> Dict[str, Any]:
        return {"init": "scratch" if self.config.init.from_scratch else self.config.init.checkpoint}
