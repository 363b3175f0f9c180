"""What a task is, and the registry that finds one by name.

A task (pre-training, retrieval, NLVR2, ...) is everything :class:`soho.train.trainer.Trainer` does not
know: its run config, its model, its data streams, what one training step computes and how it is
evaluated. The trainer drives any of them through this interface. A new task is one module with a
:class:`Task` subclass registered by :func:`register_task`, plus a YAML config whose ``task:`` names it
(and, for a module outside soho, whose ``imports:`` lists the module).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from soho.config import ConfigError, apply_overrides, from_dict, load_yaml
from soho.data.shards import DataError, expand_urls
from soho.data.stream import stream_loader
from soho.eval.tasks import SplitEvaluation
from soho.registry import Registry


@dataclass
class RunConfig:
    """Fields every task's run config starts with."""

    task: str = ""
    """The registered task this config runs (:data:`TASKS`)."""
    imports: List[str] = field(default_factory=list)
    """Modules to import before the task is looked up: where tasks defined outside soho register."""


@dataclass
class StepOutput:
    """What one training step computed."""

    loss: Tensor
    """What is back-propagated."""
    losses: Dict[str, Tensor] = field(default_factory=dict)
    """Losses to log (averaged over the logging window; a NaN shows)."""
    metrics: Dict[str, Tensor] = field(default_factory=dict)
    """Accuracies and other values to log; NaN means undefined on this step and is left out of the mean."""
    counts: Dict[str, int] = field(default_factory=dict)
    """How many of each unit the step processed (images, pairs, examples), logged as ``<unit>_per_second``."""


class Task:
    """One kind of training run. Subclasses set ``name`` and ``config_class`` and implement the hooks."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    export_name: ClassVar[str] = "model"
    """Where the trained model is saved (``save_pretrained``) in ``train.output_dir`` and in each checkpoint."""
    progress_keys: ClassVar[Tuple[str, ...]] = ("loss",)
    """Logged values shown on the progress bar."""

    def __init__(self, config):
        self.config = config
        self.processor = None
        """The :class:`~soho.processing.SohoProcessor` saved with the model; set by :meth:`setup`."""

    def setup(self, accelerator) -> None:
        """Read and check everything a run needs from the user's files (tokenizer, checkpoint, vocabularies),
        before the run writes anything: a mistake there must not cost the previous run's outputs."""

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def train_stream(self, rank: int, world_size: int, positions: Dict[int, int]) -> IterableDataset:
        """This rank's infinite training stream, resumed at ``positions`` (worker -> samples handed out)."""
        raise NotImplementedError

    def train_loader(self, stream: IterableDataset, pin_memory: bool) -> DataLoader:
        return stream_loader(stream, self.config.data.num_workers, self.config.train.seed, pin_memory)

    def train_step(self, model: nn.Module, batch: Dict[str, Any], device: torch.device) -> StepOutput:
        """The forward pass and loss of one batch (the trainer runs it under autocast and does the rest)."""
        raise NotImplementedError

    def eval_splits(self) -> Dict[str, Union[str, List[str]]]:
        """The splits evaluated at the end (name -> shards); the first is also evaluated every ``train.eval_every``."""
        return dict(self.config.data.eval_shards)

    def evaluate(self, model: nn.Module, accelerator, name: str, shards: Union[str, List[str]]) -> SplitEvaluation:
        """Evaluate the unwrapped ``model`` on one split; every process joins and gets the whole result."""
        raise NotImplementedError

    def describe(self) -> Dict[str, Any]:
        """Task-specific fields of ``results.json`` (e.g. what the model was initialised from)."""
        return {}

    # Evaluating a saved model on one split: tools/evaluate.py.
    @classmethod
    def add_evaluate_arguments(cls, parser) -> None:
        """Options of ``tools/evaluate.py <task>`` beyond --checkpoint, --shards, --batch-size and --output."""

    @classmethod
    def evaluate_checkpoint(cls, args, accelerator, output: Path) -> Dict[str, Any]:
        """Evaluate ``args.checkpoint`` on ``args.shards``; write predictions (main process) under ``output``;
        return the fields of ``results.json``: at least ``metrics``, ``skipped`` and ``cost``."""
        raise NotImplementedError(f"task {cls.name} has no checkpoint evaluation")


def check_shards(key: str, shards: Union[str, List[str], Dict[str, Union[str, List[str]]]]) -> None:
    """The shards config key ``key`` names exist (for a mapping of splits, every split's): a wrong path fails in
    :meth:`Task.setup`, before the run writes anything, rather than when the stream first opens them."""
    if isinstance(shards, dict):
        for name, split in shards.items():
            check_shards(f"{key}.{name}", split)
        return
    try:
        expand_urls(shards)
    except DataError as error:
        raise DataError(f"{key}: {error}") from None


TASKS = Registry("task")
register_task = TASKS.register


def get_task(name: str) -> Type[Task]:
    return TASKS.lookup(name, "task")


def import_modules(names: Sequence[str]) -> None:
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ConfigError(f"imports: cannot import {name!r}: {error}") from None


def load_run_config(path: Union[str, Path, None] = None, overrides: Sequence[str] = (),
                    default_task: Optional[str] = None):
    """A run config from a YAML file (optional) and dotted ``key=value`` overrides, validated into the config
    class of the task it names (``task:``, else ``default_task``)."""
    data = apply_overrides(load_yaml(path) if path is not None else {}, overrides)
    imports = data.get("imports", [])
    if not isinstance(imports, list) or not all(isinstance(name, str) for name in imports):
        raise ConfigError(f"imports: expected a list of module names, got {imports!r}")
    import_modules(imports)
    name = data.setdefault("task", default_task)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"the config names no task (task: ...); registered: {', '.join(sorted(TASKS))}")
    return from_dict(get_task(name).config_class, data)


def check_task(config) -> None:
    """A run config built in code must be the config class of the task it names."""
    import_modules(config.imports)
    expected = get_task(config.task).config_class
    if type(config) is not expected:
        raise ConfigError(f"task {config.task} needs a {expected.__name__}, got a {type(config).__name__}")
