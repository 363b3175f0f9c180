"""The one training loop of soho, for pre-training and every fine-tuning task, on Accelerate: one CPU,
one GPU, many GPUs or many nodes.

The :class:`Trainer` owns what every run does: the Accelerator, optimizers and schedules, gradient
accumulation, mixed precision, compilation, logging (``metrics.jsonl`` and trackers), checkpoints and
resumption, the time budget and evaluation. What is specific to a task (its config, model, data, step
and evaluation) comes from the task (:mod:`soho.tasks`). A run writes, under ``train.output_dir``:

- ``config.json``: the run config;
- ``metrics.jsonl``: one record per ``train.log_every`` steps, evaluations, then a final record;
- ``checkpoints/step_<N>/`` with ``train.save_every`` (full training state, resumable);
- ``<export>/`` (``pretrained/`` or ``model/``): the trained model and its processor (``from_pretrained``);
- ``results.json``: metrics per split (with chance levels), cost, parameters, config;
- ``curves/losses.png`` and ``curves/accuracy.png``: the curves of ``metrics.jsonl`` (with the ``analysis`` extra);
- ``predictions_<split>.jsonl`` for tasks that predict examples.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch import nn
from tqdm.auto import tqdm

from soho.config import to_dict
from soho.data.shards import check_skip_fraction
from soho.eval.tasks import write_jsonl
from soho.tasks import Task, get_task
from soho.tasks.base import check_task
from soho.train.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from soho.train.optim import build_optimizers, optimizer_step

logger = logging.getLogger(__name__)


class MetricWriter:
    """Appends one JSON object per record to ``metrics.jsonl`` (main process only)."""

    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled

    def write(self, record: Dict) -> None:
        if self.enabled:
            with self.path.open("a") as stream:
                stream.write(json.dumps(record) + "\n")


def flat_scalars(record: Dict[str, Any], prefix: str = "") -> Dict[str, float]:
    """Nested metrics as ``eval/<split>/<metric>`` scalars, what trackers plot; other values are left out."""
    flat: Dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(flat_scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = value
    return flat


def build_accelerator(config) -> Accelerator:
    """The Accelerator of a run (also what ``tools/benchmark.py overhead`` measures)."""
    train = config.train
    return Accelerator(
        # Without this, processes started by torchrun on a GPU-less machine would not form a group.
        cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        mixed_precision=train.mixed_precision,
        gradient_accumulation_steps=config.optim.accumulation_steps,
        log_with=list(train.trackers) or None,
        project_dir=str(Path(train.output_dir)),
        step_scheduler_with_optimizer=False,
    )


class Trainer:
    """Trains ``config``'s task. :meth:`fit` runs everything; :meth:`setup` and :meth:`train_batch` are the
    pieces it is made of (``tools/benchmark.py overhead`` times :meth:`train_batch` against a bare loop)."""

    def __init__(self, config, task: Optional[Task] = None):
        check_task(config)
        self.config = config
        self.task = task if task is not None else get_task(config.task)(config)
        self.accelerator = build_accelerator(config)
        self.output_dir = Path(config.train.output_dir)
        self.step = 0
        self.positions: Dict[int, int] = {}
        """Each data worker's position in its stream, what a checkpoint needs for exact resumption."""
        self.skipped: Counter = Counter()
        self.samples_seen = 0
        self.progress: Optional[tqdm] = None
        self.last_output = None
        """The :class:`~soho.tasks.base.StepOutput` of the last batch."""

    def setup(self, model: Optional[nn.Module] = None) -> None:
        """Seed, check the task's inputs, build (or take) the model, optimizers and schedules, prepare them,
        resume, then open the outputs. Nothing is written before the task's checks have passed."""
        config, accelerator, train = self.config, self.accelerator, self.config.train
        set_seed(train.seed, device_specific=True)
        self.task.setup(accelerator)
        resume_from = resolve_resume(train.resume, self.output_dir)
        model = model if model is not None else self.task.build_model()
        self.parameters = model.parameter_counts()
        logger.info("model: %s", ", ".join(f"{k} {v:,}" for k, v in self.parameters.items()))
        optimizers, schedulers = build_optimizers(model, config.optim, train.max_steps)
        if train.compile:
            model = torch.compile(model)
        self.model, *prepared = accelerator.prepare(model, *optimizers, *schedulers)
        self.optimizers, self.schedulers = prepared[:len(optimizers)], prepared[len(optimizers):]
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.json").write_text(json.dumps(to_dict(config), indent=2))
            if resume_from is None:  # a fresh run does not continue an old run's log
                (self.output_dir / "metrics.jsonl").unlink(missing_ok=True)
        accelerator.wait_for_everyone()
        if resume_from is not None:
            self.step, self.positions = load_checkpoint(accelerator, resume_from)
            logger.info("resumed from %s at step %d", resume_from, self.step)
        if train.trackers:
            accelerator.init_trackers(f"soho-{self.task.name}", config={k: str(v) for k, v in to_dict(config).items()})
        self.writer = MetricWriter(self.output_dir / "metrics.jsonl", accelerator.is_main_process)
        self.started = time.perf_counter()
        self._open_window()

    @property
    def unwrapped_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def _open_window(self) -> None:
        self.window: Dict[str, List[torch.Tensor]] = defaultdict(list)
        self.window_losses: set = set()
        self.window_counts: Counter = Counter()
        self.window_start = time.perf_counter()

    def train_batch(self, batch: Dict[str, Any]) -> bool:
        """Train on one batch; True when it completed an optimizer step (not on accumulation micro-steps)."""
        accelerator, model, config = self.accelerator, self.model, self.config
        freeze_at = config.train.freeze_backbone_norm_at
        if freeze_at is not None and self.step >= freeze_at:
            self.unwrapped_model.soho.backbone.freeze_norm_statistics()
        self.positions[batch["worker"]] = batch["position"]
        self.skipped.update(batch["skipped"])
        self.samples_seen += batch["samples"] + sum(batch["skipped"].values())
        if not batch["samples"]:
            return False
        with accelerator.accumulate(model):
            with accelerator.autocast():
                out = self.task.train_step(model, batch, accelerator.device)
            accelerator.backward(out.loss)
            grad_norm = optimizer_step(accelerator, model, self.optimizers, config.optim.grad_clip)
        if grad_norm is not None:
            self.window["grad_norm"].append(torch.tensor(grad_norm))
        for name, value in {**out.losses, **out.metrics}.items():
            self.window[name].append(value.detach().float())
        self.window_losses.update(out.losses)
        self.window_counts.update(out.counts)
        self.last_output = out
        if not accelerator.sync_gradients:
            return False
        for scheduler in self.schedulers:
            scheduler.step()
        self.step += 1
        if self.progress is not None:
            self.progress.update(1)
        if self.step % config.train.log_every == 0 or self.step == config.train.max_steps:
            self._log()
        return True

    def _window_means(self) -> Dict[str, float]:
        """Each value's mean over the window and all processes: losses over every step (a NaN shows),
        metrics over the steps where they are defined."""
        accelerator = self.accelerator
        names = sorted(self.window)
        if accelerator.num_processes > 1:
            # Every process must reduce the same names in the same order.
            names = sorted({name for names_of_rank in gather_object([names]) for name in names_of_rank})
        sums = []
        for name in names:
            values = torch.stack(self.window[name]) if self.window.get(name) else torch.zeros(0)
            defined = values if name in self.window_losses else values[~values.isnan()]
            sums.append([defined.sum().item(), float(defined.numel())])
        totals = torch.tensor(sums or [[0.0, 0.0]], device=accelerator.device, dtype=torch.float64)
        totals = accelerator.reduce(totals, reduction="sum").tolist()
        return {name: total / count for name, (total, count) in zip(names, totals) if count > 0}

    def _log(self) -> None:
        accelerator = self.accelerator
        elapsed = time.perf_counter() - self.window_start
        counts = accelerator.reduce(torch.tensor([sum(self.skipped.values()), self.samples_seen],
                                                 device=accelerator.device), reduction="sum").tolist()
        record = {"step": self.step, **self._window_means(), "lr": self.schedulers[0].get_last_lr()[0]}
        if len(self.schedulers) > 1:
            record["lr_backbone"] = self.schedulers[1].get_last_lr()[0]
        record.update({f"{unit}_per_second": count * accelerator.num_processes / elapsed
                       for unit, count in self.window_counts.items()})
        record.update(skipped_samples=int(counts[0]), skip_fraction=counts[0] / max(1, counts[1]),
                      elapsed_seconds=time.perf_counter() - self.started)
        self._write(record)
        if self.progress is not None:
            self.progress.set_postfix({k: f"{record[k]:.3f}" for k in self.task.progress_keys if k in record})
        check_skip_fraction(int(counts[0]), int(counts[1]), self.config.data.max_skip_fraction)
        self._open_window()

    def _write(self, record: Dict[str, Any]) -> None:
        self.writer.write(record)
        if self.config.train.trackers:
            self.accelerator.log(flat_scalars({k: v for k, v in record.items() if k != "step"}), step=record["step"])

    def out_of_time(self) -> bool:
        """Whether ``train.max_minutes`` has passed on any process; every process gets the same answer."""
        max_minutes = self.config.train.max_minutes
        out_of_time = max_minutes is not None and time.perf_counter() - self.started > max_minutes * 60
        # Every process must agree to stop, or the others would wait forever in a collective.
        return bool(self.accelerator.reduce(torch.tensor([float(out_of_time)], device=self.accelerator.device),
                                            reduction="sum").item() > 0)

    def save_checkpoint(self) -> Path:
        return save_checkpoint(self.accelerator, self.model, self.output_dir, self.step, self.positions,
                               self.task.processor, self.config.train.keep_last, self.config,
                               export=self.task.export_name)

    def evaluate(self, splits: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
        """Every split of ``splits`` (name -> shards): metrics, skipped samples, cost and predictions."""
        evaluations = {}
        for name, shards in splits.items():
            start = time.perf_counter()
            result = self.task.evaluate(self.unwrapped_model, self.accelerator, name, shards)
            evaluations[name] = {"metrics": result.metrics, "skipped": result.skipped,
                                 "cost": {**result.cost, "seconds": time.perf_counter() - start},
                                 "predictions": result.predictions}
        return evaluations

    def fit(self) -> Dict[str, Any]:
        """Train, export, evaluate every split; returns the ``results.json`` record."""
        self.setup()
        train, accelerator = self.config.train, self.accelerator
        stream = self.task.train_stream(accelerator.process_index, accelerator.num_processes, self.positions)
        batches = iter(self.task.train_loader(stream, pin_memory=accelerator.device.type == "cuda"))
        splits = self.task.eval_splits()
        self.progress = tqdm(total=train.max_steps, initial=self.step, desc=self.task.name,
                             disable=not accelerator.is_local_main_process)
        self.model.train()
        while self.step < train.max_steps:
            if not self.train_batch(next(batches)):
                continue
            stop = self.out_of_time()
            if train.eval_every and self.step % train.eval_every == 0 and splits:
                name = next(iter(splits))
                evaluation = self.evaluate({name: splits[name]})
                self._write({"step": self.step, "eval": {name: evaluation[name]["metrics"]}})
            if train.save_every and (self.step % train.save_every == 0 or self.step == train.max_steps) or stop:
                self.save_checkpoint()
            if stop:
                logger.info("stopping at step %d: train.max_minutes=%s reached", self.step, train.max_minutes)
                break
        self.progress.close()
        train_seconds = time.perf_counter() - self.started

        if accelerator.is_main_process:
            # Saved before the final evaluation: an evaluation that fails must not lose the trained weights.
            self.unwrapped_model.save_pretrained(self.output_dir / self.task.export_name,
                                                 processor=self.task.processor)
        evaluations = self.evaluate(splits)
        results = {"task": self.task.name, **self.task.describe(), "steps": self.step,
                   "train_seconds": train_seconds, "parameters": self.parameters,
                   "splits": {name: {k: v for k, v in e.items() if k != "predictions"}
                              for name, e in evaluations.items()},
                   "config": to_dict(self.config)}
        self._write({"step": self.step, "final": True, "wall_seconds": time.perf_counter() - self.started,
                     "eval": {name: e["metrics"] for name, e in evaluations.items()}})
        if accelerator.is_main_process:
            for name, evaluation in evaluations.items():
                if evaluation["predictions"]:
                    write_jsonl(self.output_dir / f"predictions_{name}.jsonl", evaluation["predictions"])
            (self.output_dir / "results.json").write_text(json.dumps(results, indent=2))
            self.plot_curves()
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return results


    def plot_curves(self) -> None:
        """``curves/losses.png`` and ``curves/accuracy.png`` of ``metrics.jsonl`` (with matplotlib)."""
        try:
            from soho.analysis.curves import plot_metrics
        except ModuleNotFoundError as error:  # an optional dependency
            logger.warning("%s; no training curves drawn", error)
            return
        for path in plot_metrics(self.output_dir / "metrics.jsonl", self.output_dir / "curves"):
            logger.info("wrote %s", path)


def train(config) -> Dict[str, Any]:
    """Run ``config`` (any task's run config, e.g. from :func:`soho.tasks.load_run_config`); returns its results."""
    return Trainer(config).fit()
