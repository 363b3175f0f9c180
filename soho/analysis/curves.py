"""Training curves from a run's ``metrics.jsonl``: losses and accuracies over the steps, with chance levels, as PNG.

``metrics.jsonl`` (written by soho/train/trainer.py) holds one record per logged step (the window's mean
losses and accuracies), ``{"step", "eval": {split: metrics}}`` records of the evaluations during the run,
and a last one with ``"final": true``. :func:`plot_metrics` draws

- ``losses.png``: a panel per loss (``loss`` and each objective's), the training curve and the evaluated
  values of the same name as markers per split;
- ``accuracy.png``: a panel per accuracy (training ``*_acc`` / ``accuracy``, and every evaluated metric
  with a chance level), the training curve, the evaluated points per split and, dashed, the chance level
  the last evaluation reports for it: ``chance_<name>``, or ``chance/<metric>`` for the retrieval recalls
  ``<protocol>/<metric>``, whose protocols share a panel.

Fine-tuning evaluations report percentages where training logs fractions; a panel whose evaluated values
or chance level are percentages shows the training curve in percent too.

Figures are drawn on matplotlib's Agg canvas without pyplot, as in :mod:`soho.analysis.figures`.
"""
from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

from soho.models.objectives import OBJECTIVES

try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
except ModuleNotFoundError as error:  # an optional dependency: the rest of soho runs without it
    raise ModuleNotFoundError(f"soho's training curves need matplotlib ({error}): pip install 'soho[analysis]'",
                              name=error.name) from error

logger = logging.getLogger(__name__)

Series = List[Tuple[int, float]]
"""(step, value) points."""


@dataclass
class Panel:
    """One metric's curves."""
    training: Series = field(default_factory=list)
    evaluated: Dict[str, Series] = field(default_factory=lambda: defaultdict(list))
    """``<split>`` or ``<split> <protocol>`` -> evaluated points."""
    chance: Optional[float] = None
    """The last chance level reported for the metric."""


def is_loss(name: str) -> bool:
    return name == "loss" or name in OBJECTIVES


def is_accuracy(name: str) -> bool:
    return name.endswith("_acc") or "accuracy" in name


def _number(value) -> Optional[float]:
    """A finite float, or None (NaN: undefined on that step; bools and strings: not a metric)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def read_records(path: Union[str, Path]) -> Iterator[Dict]:
    """The records of ``metrics.jsonl``; lines that are not a JSON object with a step (a run killed while
    writing one) are skipped, counted and logged."""
    skipped: List[int] = []
    with open(path, encoding="utf-8") as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict) or _number(record.get("step")) is None:
                skipped.append(number)
                continue
            yield record
    if skipped:
        logger.warning("%s: skipped %d lines that are not metrics records (lines %s)", path, len(skipped),
                       ", ".join(map(str, skipped[:5])) + (", ..." if len(skipped) > 5 else ""))


def _evaluations(record: Dict) -> Dict[str, Dict]:
    """Split -> metrics of an evaluation record (runs before per-split evaluation logged one flat dict)."""
    evaluation = record.get("eval")
    if not isinstance(evaluation, dict):
        return {}
    if all(isinstance(metrics, dict) for metrics in evaluation.values()):
        return evaluation
    return {"eval": evaluation}


def collect_panels(records: Iterator[Dict]) -> Tuple[Dict[str, Panel], Dict[str, Panel]]:
    """(loss panels, accuracy panels) by panel title: the total ``loss`` first, the others in the order their
    names first appear."""
    losses: Dict[str, Panel] = {}
    accuracies: Dict[str, Panel] = {}
    for record in records:
        step = int(record["step"])
        for name, value in record.items():
            value = _number(value)
            if value is None or name == "step":
                continue
            if name.startswith("chance_"):  # contrastive ITM logs its chance level with every step
                accuracies.setdefault(name[len("chance_"):], Panel()).chance = value
            elif is_loss(name):
                losses.setdefault(name, Panel()).training.append((step, value))
            elif is_accuracy(name):
                accuracies.setdefault(name, Panel()).training.append((step, value))
        for split, metrics in _evaluations(record).items():
            chances = {name[len("chance_"):] if name.startswith("chance_") else name[len("chance/"):]: value
                       for name, value in metrics.items() if name.startswith(("chance_", "chance/"))}
            for name, value in metrics.items():
                value = _number(value)
                if value is None or name.startswith("chance"):
                    continue
                protocol, _, metric = name.rpartition("/")
                label = f"{split} {protocol}" if protocol else split
                if is_loss(name):
                    losses.setdefault(name, Panel()).evaluated[label].append((step, value))
                elif is_accuracy(name) or metric in chances:
                    panel = accuracies.setdefault(metric, Panel())
                    panel.evaluated[label].append((step, value))
                    if _number(chances.get(metric)) is not None:
                        panel.chance = float(chances[metric])
    return dict(sorted(losses.items(), key=lambda item: item[0] != "loss")), accuracies


def _draw(panels: Dict[str, Panel], path: Path, title: str, ylabel: str, percentages: bool = False) -> Path:
    """One figure, a panel per metric; with ``percentages``, a panel whose evaluated values or chance level
    pass 1 is in percent, its training fractions scaled to match."""
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(4.4 * columns, 3.2 * rows), layout="constrained")
    figure.suptitle(title)
    for index, (name, panel) in enumerate(panels.items()):
        axes = figure.add_subplot(rows, columns, index + 1)
        evaluated = [value for series in panel.evaluated.values() for _, value in series]
        percent = percentages and any(value > 1.0 for value in evaluated + [panel.chance or 0.0])
        if panel.training:
            steps, values = zip(*panel.training)
            scale = 100.0 if percent and max(values) <= 1.0 else 1.0
            axes.plot(steps, [value * scale for value in values], linewidth=1.2, label="train")
        for label, series in panel.evaluated.items():
            steps, values = zip(*series)
            axes.plot(steps, values, marker="o", linestyle=":", markersize=5, label=label)
        if panel.chance is not None:
            axes.axhline(panel.chance, color="grey", linestyle="--", linewidth=1.0,
                         label=f"chance {panel.chance:.3g}")
        axes.set_title(name, fontsize=10)
        axes.set_xlabel("step")
        axes.set_ylabel(f"{ylabel} (%)" if percent else ylabel)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=110)
    return path


def plot_metrics(metrics_path: Union[str, Path], out_dir: Union[str, Path]) -> List[Path]:
    """Draw ``losses.png`` and (when the run logged any accuracy) ``accuracy.png`` of a run's ``metrics.jsonl``
    into ``out_dir``; returns the files written. An error when the file holds no record to draw."""
    metrics_path, out_dir = Path(metrics_path), Path(out_dir)
    if not metrics_path.is_file():
        raise FileNotFoundError(f"metrics file not found: {metrics_path}")
    losses, accuracies = collect_panels(read_records(metrics_path))
    accuracies = {name: panel for name, panel in accuracies.items() if panel.training or panel.evaluated}
    if not losses and not accuracies:
        raise ValueError(f"{metrics_path}: no losses or accuracies to plot")
    run = metrics_path.parent.name or str(metrics_path)
    written = []
    if losses:
        written.append(_draw(losses, out_dir / "losses.png", f"{run}: losses", "loss"))
    if accuracies:
        written.append(_draw(accuracies, out_dir / "accuracy.png", f"{run}: accuracy", "accuracy", percentages=True))
    return written
