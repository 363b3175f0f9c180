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
- ``predictions_<split>.jsonl`` for tasks that predict examples;
- ``run.lock`` while it runs: a second run on the same directory is refused (soho/train/lock.py).

What a run promises when things go wrong (docs/RELIABILITY.md): SIGTERM or SIGINT stop it at the next step
boundary with a checkpoint (:class:`~soho.errors.Interrupted`); a step whose loss or gradient norm is not
finite is skipped on every process, and ``train.max_nonfinite_steps`` of them in a row stop it
(:class:`~soho.errors.TrainingDiverged`), as do weights that are no longer finite, which are never saved.
Every process agrees on all of this with one all-reduce per optimizer step.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import signal
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch import nn
from tqdm.auto import tqdm

from soho.config import to_dict
from soho.data.shards import check_skip_fraction
from soho.data.stream import loader_batches
from soho.errors import Interrupted, TrainingDiverged
from soho.eval.tasks import write_jsonl
from soho.tasks import Task, get_task
from soho.tasks.base import check_task
from soho.train.checkpoint import load_checkpoint, remove_stale_temporaries, resolve_resume, save_checkpoint
from soho.train.lock import RunLock
from soho.train.optim import build_optimizers, clip_gradients, optimizer_step
from soho.train.signals import STOP_SIGNALS, StopSignals, stop_signal

logger = logging.getLogger(__name__)


def json_safe(record: Dict[str, Any]) -> Dict[str, Any]:
    """``record`` with every NaN or infinity replaced by null and named, with what it was, under ``nonfinite``
    (``{"loss": "nan", "eval/val/mlm": "inf"}``): strict JSON parsers reject the bare ``NaN`` token."""
    reasons: Dict[str, str] = {}

    def clean(value: Any, path: str) -> Any:
        if isinstance(value, dict):
            return {key: clean(item, f"{path}/{key}" if path else str(key)) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(item, f"{path}/{index}") for index, item in enumerate(value)]
        if isinstance(value, float) and not math.isfinite(value):
            reasons[path] = str(value)
            return None
        return value

    cleaned = clean(record, "")
    return {**cleaned, "nonfinite": reasons} if reasons else cleaned


class MetricWriter:
    """Appends one JSON object per record to ``metrics.jsonl`` (main process only)."""

    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled

    def write(self, record: Dict) -> None:
        if self.enabled:
            with self.path.open("a") as stream:
                stream.write(json.dumps(json_safe(record), allow_nan=False) + "\n")

    def cut_after(self, step: int) -> None:
        """Keep the records up to ``step``, where a resumed run continues; the later ones (and final records),
        written by the run that was stopped, move to ``metrics.discarded.jsonl`` instead of appearing twice."""
        if not self.enabled or not self.path.is_file():
            return
        kept, discarded = [], []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
                keep = record["step"] <= step and not record.get("final")
            except (ValueError, KeyError, TypeError):  # a line cut short by a killed process
                keep = False
            (kept if keep else discarded).append(line + "\n")
        if discarded:
            with self.path.with_name("metrics.discarded.jsonl").open("a") as stream:
                stream.writelines(discarded)
            logger.info("metrics.jsonl: moved %d records past step %d to metrics.discarded.jsonl", len(discarded), step)
        self.path.write_text("".join(kept))


@dataclass
class Agreement:
    """What every process decided together at a step boundary (:meth:`Trainer.agree`)."""

    nonfinite: bool = False
    """Some process's loss, or the gradient norm, was not finite: every process skips the optimizer step."""
    grad_norm: float = math.nan
    signum: Optional[int] = None
    """A stop signal some process received."""
    out_of_time: bool = False
    """``train.max_minutes`` has passed on some process."""

    @property
    def stop(self) -> bool:
        return self.signum is not None or self.out_of_time


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
        self.lock = RunLock(self.output_dir)
        self.step = 0
        self.positions: Dict[int, int] = {}
        """Each data worker's position in its stream, what a checkpoint needs for exact resumption."""
        self.skipped: Counter = Counter()
        self.samples_seen = 0
        self.progress: Optional[tqdm] = None
        self.last_output = None
        """The :class:`~soho.tasks.base.StepOutput` of the last batch."""
        self.agreed = Agreement()
        """What every process agreed on at the last optimizer step."""
        # Whether some micro-step since the last optimizer step had a non-finite loss; kept on the device,
        # since reading it would synchronise every micro-step.
        self.nonfinite_loss = torch.zeros((), dtype=torch.bool, device=self.accelerator.device)
        self.nonfinite_in_a_row = 0
        self.nonfinite_steps = 0
        self.last_checkpoint: Optional[Path] = None

    def setup(self, model: Optional[nn.Module] = None) -> None:
        """Seed, check the task's inputs, lock the output directory, find the checkpoint to resume from, build
        (or take) the model, optimizers and schedules, prepare them, resume, then open the outputs. A mistake in
        the user's inputs fails before anything is written."""
        config, accelerator, train = self.config, self.accelerator, self.config.train
        set_seed(train.seed, device_specific=True)
        self.task.setup(accelerator)
        self.lock.acquire(accelerator)
        if accelerator.is_main_process:
            remove_stale_temporaries(self.output_dir)
        resume_from = resolve_resume(train.resume, self.output_dir, accelerator)
        model = model if model is not None else self.task.build_model()
        self.parameters = model.parameter_counts()
        logger.info("model: %s", ", ".join(f"{k} {v:,}" for k, v in self.parameters.items()))
        optimizers, schedulers = build_optimizers(model, config.optim, train.max_steps)
        if train.compile:
            model = torch.compile(model)
        self.model, *prepared = accelerator.prepare(model, *optimizers, *schedulers)
        self.optimizers, self.schedulers = prepared[:len(optimizers)], prepared[len(optimizers):]
        if resume_from is not None:
            self.step, self.positions = load_checkpoint(accelerator, resume_from)
            self.last_checkpoint = resume_from
            logger.info("resumed from %s at step %d (its manifest verified)", resume_from, self.step)
        self.writer = MetricWriter(self.output_dir / "metrics.jsonl", accelerator.is_main_process)
        if accelerator.is_main_process:
            (self.output_dir / "config.json").write_text(json.dumps(to_dict(config), indent=2))
            if resume_from is None:  # a fresh run does not continue an old run's log
                self.writer.path.unlink(missing_ok=True)
            else:
                self.writer.cut_after(self.step)
        accelerator.wait_for_everyone()
        if train.trackers:
            accelerator.init_trackers(f"soho-{self.task.name}", config={k: str(v) for k, v in to_dict(config).items()})
        self.started = time.perf_counter()
        self._open_window()

    def close(self) -> None:
        """Release the output directory (:meth:`fit` does, however it ends)."""
        self.lock.release()

    @property
    def unwrapped_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def _open_window(self) -> None:
        self.window: Dict[str, List[torch.Tensor]] = defaultdict(list)
        self.window_with_nan: set = set()
        self.window_counts: Counter = Counter()
        self.window_nonfinite = 0
        self.window_start = time.perf_counter()

    def train_batch(self, batch: Dict[str, Any]) -> bool:
        """Train on one batch; True when it completed an optimizer step (not on accumulation micro-steps).

        The step's agreement (:meth:`agree`) decides whether the optimizer steps: not when a loss or the
        gradient norm was not finite, on any process. ``train.max_nonfinite_steps`` such steps in a row raise
        :class:`~soho.errors.TrainingDiverged`.
        """
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
            self.nonfinite_loss |= ~torch.isfinite(out.loss.detach())
            if accelerator.sync_gradients:
                grad_norm = clip_gradients(accelerator, model, config.optim.grad_clip)
                self.agreed = self.agree(self.nonfinite_loss, grad_norm)
                optimizer_step(accelerator, self.optimizers, skip=self.agreed.nonfinite)
                self.nonfinite_loss.zero_()
        for name, value in {**out.losses, **out.metrics}.items():
            self.window[name].append(value.detach().float())
        self.window_with_nan.update(out.losses)
        self.window_counts.update(out.counts)
        self.last_output = out
        if not accelerator.sync_gradients:
            return False
        self.window["grad_norm"].append(torch.tensor(self.agreed.grad_norm))
        self.window_with_nan.add("grad_norm")
        for scheduler in self.schedulers:
            scheduler.step()
        self.step += 1
        if self.progress is not None:
            self.progress.update(1)
        self._count_nonfinite()
        if self.step % config.train.log_every == 0 or self.step == config.train.max_steps \
                or self.nonfinite_in_a_row >= config.train.max_nonfinite_steps:
            self._log()
        if self.nonfinite_in_a_row >= config.train.max_nonfinite_steps:
            raise TrainingDiverged(
                f"training diverged: {self.nonfinite_in_a_row} steps in a row (to step {self.step}) had a non-finite "
                f"loss or gradient norm (train.max_nonfinite_steps={config.train.max_nonfinite_steps}); their "
                f"optimizer steps were skipped, the weights are those of step {self.step - self.nonfinite_in_a_row}; "
                f"{self._newest_checkpoint()}. Lower the learning rate (optim.*.lr), clip gradients "
                "(optim.grad_clip) or check the data")
        return True

    def _count_nonfinite(self) -> None:
        if not self.agreed.nonfinite:
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_in_a_row += 1
        self.nonfinite_steps += 1
        self.window_nonfinite += 1
        logger.warning("step %d: the loss or the gradient norm (%g) is not finite: optimizer step skipped on every "
                       "process (%d in a row; %d stop the run)", self.step, self.agreed.grad_norm,
                       self.nonfinite_in_a_row, self.config.train.max_nonfinite_steps)

    def agree(self, nonfinite_loss: Optional[torch.Tensor] = None,
              grad_norm: Optional[torch.Tensor] = None) -> Agreement:
        """One all-reduce that every process makes at a step boundary (and after an evaluation), so that all
        take the same path: whether some process's loss was not finite, whether some process received a stop
        signal, whether ``train.max_minutes`` has passed on some process. ``grad_norm`` is the same on every
        process already; it is read in the same synchronisation."""
        accelerator = self.accelerator
        max_minutes = self.config.train.max_minutes
        out_of_time = max_minutes is not None and time.perf_counter() - self.started > max_minutes * 60
        received = stop_signal()
        flags = torch.tensor([float(out_of_time)] + [float(received == signum) for signum in STOP_SIGNALS],
                             device=accelerator.device)
        if nonfinite_loss is not None:
            flags = torch.cat([flags, nonfinite_loss.float().reshape(1)])
        flags = accelerator.reduce(flags, reduction="sum")
        if grad_norm is not None:
            flags = torch.cat([flags, grad_norm.to(flags).reshape(1)])
        out_of_time, *values = flags.tolist()
        signals = [signum for signum, count in zip(STOP_SIGNALS, values) if count > 0]
        agreed = Agreement(out_of_time=out_of_time > 0, signum=signals[0] if signals else None)
        values = values[len(STOP_SIGNALS):]
        if nonfinite_loss is not None:
            agreed.nonfinite = values.pop(0) > 0
        if grad_norm is not None:
            agreed.grad_norm = values.pop(0)
            agreed.nonfinite |= not math.isfinite(agreed.grad_norm)
        return agreed

    def _window_means(self) -> Dict[str, float]:
        """Each value's mean over the window and all processes: losses and the gradient norm over every step
        (a NaN shows), metrics over the steps where they are defined."""
        accelerator = self.accelerator
        names = sorted(self.window)
        if accelerator.num_processes > 1:
            # Every process must reduce the same names in the same order.
            names = sorted({name for names_of_rank in gather_object([names]) for name in names_of_rank})
        sums = []
        for name in names:
            values = torch.stack(self.window[name]) if self.window.get(name) else torch.zeros(0)
            defined = values if name in self.window_with_nan else values[~values.isnan()]
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
                      nonfinite_steps=self.window_nonfinite, elapsed_seconds=time.perf_counter() - self.started)
        self._write(record)
        if self.progress is not None:
            self.progress.set_postfix({k: f"{record[k]:.3f}" for k in self.task.progress_keys if k in record})
        check_skip_fraction(int(counts[0]), int(counts[1]), self.config.data.max_skip_fraction)
        self._open_window()

    def _write(self, record: Dict[str, Any]) -> None:
        self.writer.write(record)
        if self.config.train.trackers:
            self.accelerator.log(flat_scalars({k: v for k, v in record.items() if k != "step"}), step=record["step"])

    def _nonfinite_weight(self) -> Optional[str]:
        """A parameter or buffer holding NaN or an infinity (on any process), else None."""
        tensors = [(name, tensor) for name, tensor in itertools.chain(self.unwrapped_model.named_parameters(),
                                                                      self.unwrapped_model.named_buffers())
                   if tensor.is_floating_point()]
        device = self.accelerator.device
        finite = torch.stack([torch.isfinite(tensor).all().to(device) for _, tensor in tensors])
        bad = self.accelerator.reduce((~finite).float(), reduction="sum").tolist()
        return next((name for (name, _), count in zip(tensors, bad) if count > 0), None)

    def _newest_checkpoint(self) -> str:
        return (f"the newest checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                else "no checkpoint was written")

    def save_checkpoint(self) -> Optional[Path]:
        """A checkpoint of this step, unless the weights are no longer finite: then nothing is written (a
        checkpoint never holds NaN) and None is returned."""
        nonfinite = self._nonfinite_weight()
        if nonfinite is not None:
            logger.error("not writing the checkpoint of step %d: %s is not finite; %s", self.step, nonfinite,
                         self._newest_checkpoint())
            return None
        self.last_checkpoint = save_checkpoint(
            self.accelerator, self.model, self.output_dir, self.step, self.positions, self.task.processor,
            self.config.train.keep_last, self.config, self.lock.run_id, export=self.task.export_name)
        return self.last_checkpoint

    def evaluate(self, splits: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
        """Every split of ``splits`` (name -> shards): metrics, skipped samples, cost and predictions. A stop
        signal ends it early (then the results are incomplete: :meth:`agree` says so)."""
        evaluations = {}
        for name, shards in splits.items():
            start = time.perf_counter()
            result = self.task.evaluate(self.unwrapped_model, self.accelerator, name, shards)
            evaluations[name] = {"metrics": result.metrics, "skipped": result.skipped,
                                 "cost": {**result.cost, "seconds": time.perf_counter() - start},
                                 "predictions": result.predictions}
        return evaluations


    def fit(self) -> Dict[str, Any]:
        """Train, export, evaluate every split; returns the ``results.json`` record. SIGTERM or SIGINT end it
        with a checkpoint and :class:`~soho.errors.Interrupted`."""
        with StopSignals():
            try:
                self.setup()
                self._train()
                return self._finish()
            finally:
                self.close()

    def _train(self) -> None:
        train, accelerator = self.config.train, self.accelerator
        stream = self.task.train_stream(accelerator.process_index, accelerator.num_processes, self.positions)
        splits = self.task.eval_splits()
        self.progress = tqdm(total=train.max_steps, initial=self.step, desc=self.task.name,
                             disable=not accelerator.is_local_main_process)
        self.model.train()
        agreed, checkpoint = Agreement(), None
        loader = self.task.train_loader(stream, pin_memory=accelerator.device.type == "cuda")
        with self.progress, loader_batches(loader) as batches:
            while self.step < train.max_steps:
                if not self.train_batch(next(batches)):
                    continue
                agreed = self.agreed
                if not agreed.stop and train.eval_every and self.step % train.eval_every == 0 and splits:
                    name = next(iter(splits))
                    evaluation = self.evaluate({name: splits[name]})
                    agreed = self.agree()
                    if agreed.signum is None:  # else the signal cut the evaluation short
                        self._write({"step": self.step, "eval": {name: evaluation[name]["metrics"]}})
                if agreed.stop or train.save_every and (self.step % train.save_every == 0
                                                        or self.step == train.max_steps):
                    checkpoint = self.save_checkpoint()
                if agreed.stop:
                    break
        if agreed.signum is not None:
            saved = (f"checkpoint {checkpoint}; resume with --resume auto (train.resume=auto)" if checkpoint
                     else f"no checkpoint could be written; {self._newest_checkpoint()}")
            raise Interrupted(agreed.signum, f"{signal.Signals(agreed.signum).name} stopped the run at step "
                                             f"{self.step}: {saved}")
        if agreed.out_of_time:
            logger.info("stopping at step %d: train.max_minutes=%s reached", self.step, train.max_minutes)

    def _finish(self) -> Dict[str, Any]:
        accelerator = self.accelerator
        train_seconds = time.perf_counter() - self.started
        nonfinite = self._nonfinite_weight()
        if nonfinite is not None:
            raise TrainingDiverged(f"the trained weights are not finite ({nonfinite}): nothing was exported; "
                                   f"{self._newest_checkpoint()}")
        if accelerator.is_main_process:
            # Saved before the final evaluation: an evaluation that fails must not lose the trained weights.
            self.unwrapped_model.save_pretrained(self.output_dir / self.task.export_name,
                                                 processor=self.task.processor)
        splits = self.task.eval_splits()
        evaluations = self.evaluate(splits)
        agreed = self.agree()
        if agreed.signum is not None:
            raise Interrupted(agreed.signum, f"{signal.Signals(agreed.signum).name} stopped the final evaluation: "
                                             f"the model trained for {self.step} steps is in "
                                             f"{self.output_dir / self.task.export_name}; results.json was not written")
        results = {"task": self.task.name, **self.task.describe(), "steps": self.step,
                   "train_seconds": train_seconds, "nonfinite_steps": self.nonfinite_steps,
                   "parameters": self.parameters,
                   "splits": {name: {k: v for k, v in e.items() if k != "predictions"}
                              for name, e in evaluations.items()},
                   "config": to_dict(self.config)}
        self._write({"step": self.step, "final": True, "wall_seconds": time.perf_counter() - self.started,
                     "eval": {name: e["metrics"] for name, e in evaluations.items()}})
        if accelerator.is_main_process:
            for name, evaluation in evaluations.items():
                if evaluation["predictions"]:
                    write_jsonl(self.output_dir / f"predictions_{name}.jsonl", evaluation["predictions"])
            (self.output_dir / "results.json").write_text(json.dumps(json_safe(results), indent=2))
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
