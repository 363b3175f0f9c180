"""Ablation sweeps: pre-train a grid of variants with several seeds, evaluate each run the same way, tabulate.

A sweep file names variants by their dotted overrides of one pre-training config, e.g. Decoupling's
(arXiv 2102.00529) attention and loss designs::

    pretrain_config: configs/pretrain/synthetic.yaml
    common: [train.max_minutes=null]
    variants:
      merged: []
      co_attention: [model.encoder.fusion=co_attention]
      itm_contrastive: [model.itm.loss=contrastive]

Every (variant, seed) run pre-trains under ``<out>/<variant>/seed_<seed>/pretrain``, is evaluated
zero-shot on one retrieval split (:func:`soho.eval.tasks.evaluate_retrieval`) and, optionally, fine-tuned
for retrieval (:func:`soho.train.trainer.train`) and evaluated again on the same split. A finished run
leaves ``results.json`` in its directory and is not run again; the sweep then writes ``results.json``,
``results.csv`` and ``table.md`` (mean ± sample standard deviation over seeds) under ``<out>``.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence

import torch

from soho.config import ConfigError, load_config, to_dict
from soho.eval.tasks import evaluate_retrieval
from soho.models.soho import SohoForPretraining
from soho.processing import SohoProcessor
from soho.tasks import PretrainConfig, RetrievalConfig, load_run_config
from soho.train.trainer import train

logger = logging.getLogger(__name__)

RESULTS = "results.json"
VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class EvaluationConfig:
    """The retrieval split every run is scored on, before and after fine-tuning."""

    shards: str = "data/synthetic/retrieval_test"
    protocols: List[Literal["itm_all", "itc", "itc_itm"]] = field(default_factory=lambda: ["itm_all"])
    max_images: Optional[int] = 100
    """The first N images of the split with all their captions: ``itm_all`` costs images x captions fused passes."""
    k: int = 16
    """Shortlist size of ``itc_itm``."""
    batch_size: int = 64
    fusion_batch_size: int = 512
    """Pairs per fusion pass (on 2 CPU cores 128 is faster)."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast the fusion passes; encoding and the match scores stay float32."""

    def __post_init__(self):
        if not self.protocols:
            raise ConfigError("evaluation.protocols needs at least one protocol")
        if self.max_images is not None and self.max_images < 1:
            raise ConfigError(f"evaluation.max_images must be >= 1, got {self.max_images}")
        if self.k < 1 or self.batch_size < 1 or self.fusion_batch_size < 1:
            raise ConfigError("evaluation.k, evaluation.batch_size and evaluation.fusion_batch_size must be >= 1")


@dataclass
class FinetuneStageConfig:
    enabled: bool = False
    config: str = "configs/finetune/retrieval_synthetic.yaml"
    """A retrieval fine-tuning config; its checkpoint, seed, output and evaluation are set per run."""
    overrides: List[str] = field(default_factory=lambda: ["train.max_steps=100"])


@dataclass
class AblationConfig:
    variants: Dict[str, List[str]] = field(default_factory=dict)
    """Variant name -> dotted overrides of the pre-training config (``[]``: the config as it is)."""
    pretrain_config: str = "configs/pretrain/synthetic.yaml"
    common: List[str] = field(default_factory=list)
    """Overrides applied to every variant, before the variant's own."""
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    finetune: FinetuneStageConfig = field(default_factory=FinetuneStageConfig)
    columns: List[str] = field(default_factory=list)
    """Metrics of the table (keys of a run's ``metrics``); default: :func:`default_columns`."""

    def __post_init__(self):
        if not self.variants:
            raise ConfigError("variants: the sweep names no variant")
        for name in self.variants:
            if not VARIANT_NAME.match(name):
                raise ConfigError(f"variants.{name}: a variant name becomes a directory name; use letters, "
                                  "digits, '_', '-' and '.'")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be a non-empty list without repeats, got {self.seeds}")


def load_ablation(path: str | Path, overrides: Sequence[str] = ()) -> AblationConfig:
    """A sweep file with dotted overrides of its own keys (``seeds=[0,1]``, ``evaluation.max_images=50``)."""
    return load_config(AblationConfig, path, overrides)


def pretrain_overrides(ablation: AblationConfig, variant: str, seed: int, run_dir: Path) -> List[str]:
    # The run's own keys come last so a sweep cannot send two runs to one directory; ``resume=auto`` picks
    # up a pre-training that an earlier call left unfinished.
    return [*ablation.common, *ablation.variants[variant], f"train.seed={seed}",
            f"train.output_dir={json.dumps(str(run_dir / 'pretrain'))}", "train.resume=auto"]


def pretrain_config(ablation: AblationConfig, variant: str, seed: int, run_dir: Path) -> PretrainConfig:
    config = load_run_config(ablation.pretrain_config, pretrain_overrides(ablation, variant, seed, run_dir),
                             default_task="pretraining")
    if not isinstance(config, PretrainConfig):
        raise ConfigError(f"pretrain_config: {ablation.pretrain_config} is a {config.task} config; the sweep "
                          "pre-trains")
    return config


def finetune_config(ablation: AblationConfig, seed: int, run_dir: Path) -> RetrievalConfig:
    """The stage's config, started from the run's pre-trained export and scored on the zero-shot split."""
    evaluation = ablation.evaluation
    config = load_run_config(ablation.finetune.config, [
        *ablation.finetune.overrides,
        f"init.checkpoint={json.dumps(str(run_dir / 'pretrain' / 'pretrained'))}",
        f"train.seed={seed}",
        f"train.output_dir={json.dumps(str(run_dir / 'finetune'))}",
        f"data.eval_shards={json.dumps({'test': evaluation.shards})}",
        f"retrieval.protocols={json.dumps(evaluation.protocols)}",
        f"retrieval.k={evaluation.k}",
        f"retrieval.max_eval_images={json.dumps(evaluation.max_images)}",
    ])
    if not isinstance(config, RetrievalConfig):
        raise ConfigError(f"finetune.config: {ablation.finetune.config} is a {config.task} config; the sweep "
                          "fine-tunes retrieval")
    return config


def run_spec(ablation: AblationConfig, variant: str, seed: int) -> Dict[str, Any]:
    """What decides a run's numbers; a finished run is reused only when its spec is the same."""
    return {"variant": variant, "seed": seed, "pretrain_config": ablation.pretrain_config,
            "overrides": [*ablation.common, *ablation.variants[variant]],
            "evaluation": to_dict(ablation.evaluation),
            "finetune": to_dict(ablation.finetune) if ablation.finetune.enabled else None}


def zero_shot(pretrained: Path, evaluation: EvaluationConfig) -> Dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = SohoForPretraining.from_pretrained(pretrained).to(device).eval()
    processor = SohoProcessor.from_pretrained(pretrained)
    result = evaluate_retrieval(model, evaluation.shards, processor, evaluation.protocols, k=evaluation.k,
                                batch_size=evaluation.batch_size, fusion_batch_size=evaluation.fusion_batch_size,
                                max_images=evaluation.max_images, mixed_precision=evaluation.mixed_precision)
    return {"metrics": result.metrics, "cost": result.cost, "skipped": result.skipped,
            "parameters": model.parameter_counts()}


def run_one(ablation: AblationConfig, variant: str, seed: int, run_dir: Path) -> Dict[str, Any]:
    """Pre-train, evaluate zero-shot and (optionally) fine-tune one run; returns its record (also written
    to ``run_dir/results.json``). A pre-training interrupted earlier resumes from its last checkpoint."""
    started = time.perf_counter()
    pretrained = train(pretrain_config(ablation, variant, seed, run_dir))
    evaluated = zero_shot(run_dir / "pretrain" / "pretrained", ablation.evaluation)
    held_out = next(iter(pretrained["splits"].values()), {}).get("metrics", {})
    metrics = {f"pretrain/{k}": v for k, v in held_out.items()}
    metrics.update({f"model/parameters_{k}": v for k, v in evaluated["parameters"].items()})
    metrics.update({f"zero_shot/{k}": v for k, v in evaluated["metrics"].items()})
    record: Dict[str, Any] = {**run_spec(ablation, variant, seed), "metrics": metrics,
                              "pretrain": {k: v for k, v in pretrained.items() if k != "config"},
                              "zero_shot": evaluated}
    if ablation.finetune.enabled:
        results = train(finetune_config(ablation, seed, run_dir))
        metrics.update({f"finetuned/{k}": v for k, v in results["splits"]["test"]["metrics"].items()})
        record["finetune"] = {"steps": results["steps"], "train_seconds": results["train_seconds"],
                              "cost": results["splits"]["test"]["cost"]}
    record["seconds"] = time.perf_counter() - started
    (run_dir / RESULTS).write_text(json.dumps(record, indent=2))
    return record


def finished_run(ablation: AblationConfig, variant: str, seed: int, run_dir: Path) -> Optional[Dict[str, Any]]:
    path = run_dir / RESULTS
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    spec = run_spec(ablation, variant, seed)
    if {key: record.get(key) for key in spec} != spec:
        raise ConfigError(f"{path} was written by a different sweep (its variant, overrides, evaluation or "
                          "fine-tuning differ); use another --out or delete that run")
    return record


def default_columns(ablation: AblationConfig) -> List[str]:
    columns = []
    for protocol in ablation.evaluation.protocols:
        columns += [f"zero_shot/{protocol}/{name}" for name in ("rsum", "img_r1", "txt_r1")]
    if ablation.finetune.enabled:
        columns += [f"finetuned/{protocol}/rsum" for protocol in ablation.evaluation.protocols]
    return columns + ["pretrain/itm_acc", "pretrain/chance_itm_acc", "model/parameters_total"]


def statistics(values: Sequence[Any]) -> Dict[str, float]:
    """Mean, sample standard deviation (n - 1; NaN for one value) and n of the finite numbers in ``values``."""
    values = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    mean = sum(values) / len(values) if values else math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else math.nan
    return {"mean": mean, "std": std, "n": len(values)}


def summarize(runs: Sequence[Dict[str, Any]], columns: Sequence[str]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Per variant and column: :func:`statistics` over the runs where the metric is a finite number."""
    return {variant: {column: statistics([run["metrics"].get(column) for run in runs if run["variant"] == variant])
                      for column in columns}
            for variant in dict.fromkeys(run["variant"] for run in runs)}


def format_cell(statistics: Dict[str, float]) -> str:
    """``mean ± std`` (``mean`` alone for one seed, ``n/a`` for none)."""
    if not statistics["n"]:
        return "n/a"
    # Counts (parameters) read better whole; recalls and accuracies need their decimals.
    style = ",.0f" if abs(statistics["mean"]) >= 1000 else ".2f"
    if math.isnan(statistics["std"]):
        return format(statistics["mean"], style)
    return f"{format(statistics['mean'], style)} ± {format(statistics['std'], style)}"


def format_table(summary: Dict[str, Dict[str, Dict[str, float]]], columns: Sequence[str],
                 chance: Optional[Dict[str, float]] = None) -> str:
    """A Markdown table, one row per variant (mean ± std over seeds), and a last row of chance levels where
    a column has one (``zero_shot/<protocol>/<metric>`` -> ``zero_shot/chance/<metric>``)."""
    seeds = {variant: max((s["n"] for s in row.values()), default=0) for variant, row in summary.items()}
    lines = ["| variant | seeds | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for variant, row in summary.items():
        lines.append(f"| {variant} | {seeds[variant]} | " + " | ".join(format_cell(row[c]) for c in columns) + " |")
    if chance:
        cells = [f"{chance[c]:.2f}" if c in chance else "" for c in columns]
        lines.append("| chance | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chance_levels(runs: Sequence[Dict[str, Any]], columns: Sequence[str]) -> Dict[str, float]:
    """The chance level of each recall column (the same gallery for every run, so any run's)."""
    levels = {}
    for column in columns:
        stage, _, metric = column.partition("/")
        if stage in ("zero_shot", "finetuned") and "/" in metric:
            key = f"{stage}/chance/{metric.split('/', 1)[1]}"
            found = [run["metrics"][key] for run in runs if key in run["metrics"]]
            if found:
                levels[column] = found[0]
    return levels


def write_outputs(out: Path, ablation: AblationConfig, runs: List[Dict[str, Any]], columns: Sequence[str]) -> str:
    summary = summarize(runs, columns)
    table = format_table(summary, columns, chance_levels(runs, columns))
    (out / RESULTS).write_text(json.dumps({"config": to_dict(ablation), "columns": list(columns),
                                           "summary": summary, "runs": runs}, indent=2))
    keys = sorted({key for run in runs for key in run["metrics"]})
    with (out / "results.csv").open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["variant", "seed", *keys])
        for run in runs:
            writer.writerow([run["variant"], run["seed"], *(run["metrics"].get(key, "") for key in keys)])
    (out / "table.md").write_text(table + "\n")
    return table


@dataclass
class AblationResult:
    runs: List[Dict[str, Any]]
    """One record per (variant, seed), in sweep order."""
    table: str
    ran: List[str]
    """``<variant>/seed_<seed>`` of the runs trained by this call (the others were already finished)."""


def run_ablation(ablation: AblationConfig, out: str | Path) -> AblationResult:
    """Run every unfinished (variant, seed) of the sweep, then write and return the table of all of them."""
    out = Path(out)
    # Every variant's config is checked before the first run trains.
    for variant in ablation.variants:
        pretrain_config(ablation, variant, ablation.seeds[0], out / variant)
    if ablation.finetune.enabled:
        finetune_config(ablation, ablation.seeds[0], out)
    runs, ran = [], []
    for variant in ablation.variants:
        for seed in ablation.seeds:
            run_dir = out / variant / f"seed_{seed}"
            record = finished_run(ablation, variant, seed, run_dir)
            if record is None:
                logger.info("ablation run %s seed %d -> %s", variant, seed, run_dir)
                record = run_one(ablation, variant, seed, run_dir)
                ran.append(f"{variant}/seed_{seed}")
            runs.append(record)
    columns = ablation.columns or default_columns(ablation)
    return AblationResult(runs=runs, table=write_outputs(out, ablation, runs, columns), ran=ran)
