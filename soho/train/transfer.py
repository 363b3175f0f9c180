"""Transfer studies: fine-tune every task from each starting point with several seeds, at equal budgets, and
tabulate what pre-training buys over training from scratch.

A study file names the starting points (``save_pretrained`` checkpoints), the tasks (a fine-tuning config and
the metric to report each) and the seeds::

    starts:
      pretrained: runs/synthetic/pretrained
      no_dictionary: runs/synthetic_no_vd/pretrained
    scratch: pretrained          # also train this start's architecture from random weights
    seeds: [0, 1, 2]
    common: [train.max_minutes=null]
    tasks:
      ve: {config: configs/finetune/ve_synthetic.yaml, metric: test/accuracy}

Every (task, start, seed) fine-tunes into ``<out>/<task>/<start>/seed_<seed>`` (``scratch`` for the random
start); a run whose ``results.json`` exists is not run again, so the same command resumes a study. The study
writes ``results.json`` (every run's metrics and the summary) and ``table.md``: per task, the metric's mean ±
sample standard deviation over seeds for each start, the gain of each start over scratch, and the metric's
chance level and ceiling where the evaluation reports them.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from soho.config import ConfigError, load_config, to_dict
from soho.tasks import load_run_config
from soho.train.ablation import format_cell, statistics, summarize
from soho.train.trainer import train

logger = logging.getLogger(__name__)

RESULTS = "results.json"
SCRATCH = "scratch"


@dataclass
class TransferTask:
    config: str
    """A fine-tuning config; its checkpoint, seed and output directory are set per run."""
    metric: str
    """``<split>/<metric>`` of the run's results, e.g. ``test/accuracy``."""
    overrides: List[str] = field(default_factory=list)


@dataclass
class TransferConfig:
    starts: Dict[str, str] = field(default_factory=dict)
    """Start name -> ``save_pretrained`` checkpoint to fine-tune from."""
    tasks: Dict[str, TransferTask] = field(default_factory=dict)
    scratch: Optional[str] = None
    """A start whose architecture (and processor) is also trained from random weights, as row ``scratch``."""
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    common: List[str] = field(default_factory=list)
    """Overrides of every fine-tuning run, before the task's own."""

    def __post_init__(self):
        if not self.starts or not self.tasks:
            raise ConfigError("a transfer study needs at least one start and one task")
        if SCRATCH in self.starts:
            raise ConfigError(f"starts.{SCRATCH}: the name is taken by the random start (see scratch:)")
        if self.scratch is not None and self.scratch not in self.starts:
            raise ConfigError(f"scratch: {self.scratch!r} is not one of the starts ({', '.join(self.starts)})")
        for name, task in self.tasks.items():
            if "/" not in task.metric:
                raise ConfigError(f"tasks.{name}.metric: expected <split>/<metric>, got {task.metric!r}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be a non-empty list without repeats, got {self.seeds}")

    def start_names(self) -> List[str]:
        return [*self.starts, *([SCRATCH] if self.scratch is not None else [])]


def load_transfer(path: str | Path, overrides: Sequence[str] = ()) -> TransferConfig:
    return load_config(TransferConfig, path, overrides)


def run_config(study: TransferConfig, task: str, start: str, seed: int, run_dir: Path):
    spec = study.tasks[task]
    checkpoint = study.starts[study.scratch if start == SCRATCH else start]
    config = load_run_config(spec.config, [
        *study.common, *spec.overrides, f"init.checkpoint={json.dumps(checkpoint)}",
        f"init.from_scratch={json.dumps(start == SCRATCH)}", f"train.seed={seed}",
        f"train.output_dir={json.dumps(str(run_dir))}"])
    split = spec.metric.split("/", 1)[0]
    if split not in config.data.eval_shards:
        raise ConfigError(f"tasks.{task}.metric: {spec.config} evaluates no split {split!r} "
                          f"(its splits: {', '.join(config.data.eval_shards)})")
    return config


def run_spec(study: TransferConfig, task: str, start: str, seed: int) -> Dict[str, Any]:
    """What decides a run's numbers; a finished run is reused only when its spec is the same."""
    checkpoint = study.starts[study.scratch if start == SCRATCH else start]
    return {"task": task, "start": start, "seed": seed, "checkpoint": checkpoint,
            "from_scratch": start == SCRATCH, "config": study.tasks[task].config,
            "overrides": [*study.common, *study.tasks[task].overrides]}


def flat_metrics(results: Dict[str, Any]) -> Dict[str, float]:
    return {f"{split}/{name}": value for split, evaluation in results["splits"].items()
            for name, value in evaluation["metrics"].items()}


def finished_run(study: TransferConfig, task: str, start: str, seed: int, run_dir: Path) -> Optional[Dict]:
    path = run_dir / "transfer.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    spec = run_spec(study, task, start, seed)
    if {key: record.get(key) for key in spec} != spec:
        raise ConfigError(f"{path} was written by a different study; use another --out or delete that run")
    return record


def related(metrics: Dict[str, float], metric: str, kind: str) -> Optional[float]:
    """The chance level or ceiling of ``<split>/<name>`` as the evaluation names them, if it reports one."""
    split, name = metric.split("/", 1)
    for key in (f"{split}/{kind}_{name}", f"{split}/{kind}/{name.split('/', 1)[-1]}"):
        if key in metrics:
            return metrics[key]
    return None


def format_table(study: TransferConfig, runs: List[Dict[str, Any]]) -> str:
    starts = study.start_names()
    header = ["task", "metric", *starts]
    gains = [start for start in study.starts] if study.scratch is not None else []
    header += [f"{start} − scratch" for start in gains] + ["chance", "ceiling"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task, spec in study.tasks.items():
        task_runs = [run for run in runs if run["task"] == task]
        summary = summarize([{"variant": run["start"], "metrics": run["metrics"]} for run in task_runs],
                            [spec.metric])
        cells = [task, spec.metric]
        for start in starts:
            cells.append(format_cell(summary.get(start, {}).get(spec.metric, {"n": 0})))
        for start in gains:
            pairs = [(a["metrics"].get(spec.metric), b["metrics"].get(spec.metric))
                     for a in task_runs if a["start"] == start
                     for b in task_runs if b["start"] == SCRATCH and b["seed"] == a["seed"]]
            differences = [x - y for x, y in pairs if x is not None and y is not None]
            cells.append(format_cell(statistics(differences)))
        reference = task_runs[0]["metrics"] if task_runs else {}
        for kind in ("chance", "ceiling"):
            value = related(reference, spec.metric, kind)
            cells.append("" if value is None else f"{value:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_transfer(study: TransferConfig, out: str | Path, tasks: Optional[Sequence[str]] = None) -> str:
    """Run every unfinished (task, start, seed) of the study (or of ``tasks``), then write and return the
    table of all finished runs."""
    out = Path(out)
    chosen = list(tasks) if tasks else list(study.tasks)
    # Every run's config is checked before the first one trains.
    for task in chosen:
        for start in study.start_names():
            run_config(study, task, start, study.seeds[0], out / task / start / "check")
    for task in chosen:
        for start in study.start_names():
            for seed in study.seeds:
                run_dir = out / task / start / f"seed_{seed}"
                if finished_run(study, task, start, seed, run_dir) is not None:
                    continue
                logger.info("transfer run %s from %s, seed %d -> %s", task, start, seed, run_dir)
                results = train(run_config(study, task, start, seed, run_dir))
                record = {**run_spec(study, task, start, seed), "metrics": flat_metrics(results),
                          "steps": results["steps"], "train_seconds": results["train_seconds"]}
                (run_dir / "transfer.json").write_text(json.dumps(record, indent=2))
    runs = [record for task in study.tasks for start in study.start_names() for seed in study.seeds
            if (record := finished_run(study, task, start, seed, out / task / start / f"seed_{seed}"))]
    table = format_table(study, runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS).write_text(json.dumps({"config": to_dict(study), "runs": runs}, indent=2))
    (out / "table.md").write_text(table + "\n")
    return table
