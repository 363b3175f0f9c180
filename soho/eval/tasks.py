"""Evaluating models on a split: class predictions and their accuracy (NLVR2, VE), VQA accuracy,
retrieval recall.

Classification splits are evaluated in parallel: every rank reads its own disjoint slice
of the shards (no example padded or repeated), and the predictions of all ranks are
gathered before a single metric is computed, so any number of processes gives the same
numbers. Retrieval shares its fusion passes across processes (:mod:`soho.eval.retrieval`).
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from accelerate.utils import gather_object

from soho.data.retrieval import read_retrieval_split
from soho.data.tasks import TaskDataset
from soho.eval.retrieval import chance_recall, encode_gallery, oracle_recall, retrieve
from soho.eval.vqa import OFFICIAL, normalize_answer, vqa_accuracy, vqa_score
from soho.processing import SohoProcessor
from soho.train.signals import stop_requested

logger = logging.getLogger(__name__)

MODEL_INPUTS = ("pixel_values", "pixel_mask", "input_ids", "attention_mask", "token_type_ids")


@dataclass
class SplitEvaluation:
    metrics: Dict[str, float]
    """Percentages; ``chance_*`` entries give the same metric for the best constant answer."""
    predictions: List[Dict[str, Any]]
    skipped: Dict[str, int] = field(default_factory=dict)
    cost: Dict[str, Any] = field(default_factory=dict)


def _majority_share(values: Sequence[Any]) -> float:
    return 100.0 * Counter(values).most_common(1)[0][1] / len(values)


def accuracy_metrics(predictions: List[Dict[str, Any]]) -> Dict[str, float]:
    """Accuracy of ``prediction`` against ``label`` (class names), with the majority class as chance."""
    if not predictions:
        raise ValueError("no predictions to score: the split was empty or every sample was skipped")
    correct = [p["prediction"] == p["label"] for p in predictions]
    return {"accuracy": 100.0 * sum(correct) / len(correct),
            "chance_accuracy": _majority_share([p["label"] for p in predictions])}


def vqa_metrics(predictions: List[Dict[str, Any]]) -> Dict[str, float]:
    """VQA accuracy of ``prediction`` against the annotators' ``answers``, overall and per ``answer_type``,
    with the best single answer for every question as chance; ``vqa_accuracy_official`` is the overall
    accuracy by the official evaluation's rules (:data:`soho.eval.vqa.OFFICIAL`), the evaluation server's number."""
    if not predictions:
        raise ValueError("no predictions to score: the split was empty or every sample was skipped")
    answers = {p["id"]: p["answers"] for p in predictions}
    predicted = {p["id"]: p["prediction"] for p in predictions}
    metrics = {"vqa_accuracy": vqa_accuracy(predicted, answers),
               "vqa_accuracy_official": vqa_accuracy(predicted, answers, OFFICIAL)}
    by_type: Dict[str, List[float]] = {}
    for p in predictions:
        by_type.setdefault(p.get("answer_type", "all"), []).append(vqa_score(p["prediction"], p["answers"]))
    if len(by_type) > 1:
        metrics.update({f"vqa_accuracy_{kind.replace('/', '_')}": 100.0 * sum(s) / len(s)
                        for kind, s in sorted(by_type.items())})
    # The best single answer for every question: what a model that ignores image and question reaches.
    candidates = {normalize_answer(a) for p in predictions for a in p["answers"]}
    metrics["chance_vqa_accuracy"] = max(
        100.0 * sum(vqa_score(c, p["answers"]) for p in predictions) / len(predictions) for c in candidates)
    return metrics


@torch.no_grad()
def predict_classes(model, dataset: TaskDataset, accelerator=None,
                    describe: Callable[[Any], Dict[str, Any]] = lambda target: {}) -> SplitEvaluation:
    """Predict the class name (``model.config.labels``) of every example of a one-pass ``dataset``.

    ``model`` is an unwrapped classification model (:mod:`soho.models.tasks`) on this process's device and
    ``dataset`` this process's slice; with an ``accelerator`` the predictions of all processes are
    gathered, so every process returns the whole split. Each prediction is ``{"id", "prediction", **info,
    **describe(target)}``; metrics are left to the caller.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    labels = model.config.labels
    predictions: List[Dict[str, Any]] = []
    skipped: Counter = Counter()
    for batch in dataset:
        if stop_requested():  # the run is stopping: the gather below still runs on every rank
            break
        skipped.update(batch["skipped"])
        if not batch["samples"]:
            continue
        logits = model.logits(**{name: batch[name].to(device) for name in MODEL_INPUTS})
        for example_id, target, info, index in zip(batch["example_ids"], batch["targets"], batch["info"],
                                                   logits.argmax(-1).tolist()):
            predictions.append({"id": example_id, "prediction": labels[index], **info, **describe(target)})
    model.train(was_training)
    if accelerator is not None and accelerator.num_processes > 1:
        predictions = gather_object(predictions)
        skipped = sum((Counter(s) for s in gather_object([dict(skipped)])), Counter())
    ids = [p["id"] for p in predictions]
    if len(set(ids)) != len(ids):
        duplicates = sorted(i for i, n in Counter(ids).items() if n > 1)
        raise ValueError(f"{len(duplicates)} example ids occur more than once in {dataset.urls[:3]} "
                         f"(e.g. {duplicates[:3]}); ids must be unique for the metrics to count each once")
    predictions.sort(key=lambda p: p["id"])
    if skipped:
        logger.warning("skipped %d samples of %s: %s", sum(skipped.values()), dataset.urls[:3], dict(skipped))
    if not predictions and not stop_requested():
        raise ValueError(f"no predictions for {dataset.urls[:3]}: the split is empty or every sample was skipped "
                         f"({dict(skipped)})")
    return SplitEvaluation(metrics={}, predictions=predictions, skipped=dict(skipped))


@torch.no_grad()
def evaluate_retrieval(model, shards: Union[str, List[str]], processor: SohoProcessor,
                       protocols: Sequence[str] = ("itc", "itc_itm"), k: int = 16, itc_weight: float = 0.0,
                       batch_size: int = 64, fusion_batch_size: int = 512,
                       max_images: Optional[int] = None, mixed_precision: str = "no",
                       accelerator=None) -> SplitEvaluation:
    """Image-text retrieval on a split with each protocol: metrics ``<protocol>/<metric>``, costs per protocol
    (``mixed_precision``: see :mod:`soho.eval.retrieval`). With an ``accelerator``, every process reads and
    encodes the gallery, the fusion passes are shared out, and every process returns the whole result."""
    was_training = model.training
    model.eval()
    split = read_retrieval_split(shards, processor, batch_size, max_images)
    gallery = encode_gallery(model, split.image_batches, split.text_batches, split.text_image)
    captions_per_image = torch.bincount(split.text_image, minlength=len(split.image_ids)).tolist()
    metrics = {f"chance/{name}": value
               for name, value in chance_recall(len(split.image_ids), captions_per_image).items()}
    if split.truth is not None:
        ceiling = oracle_recall(split.truth, split.text_image)
        metrics.update({f"ceiling/{name}": value for name, value in ceiling.items()})
    costs: Dict[str, Any] = {"images": len(split.image_ids), "texts": len(split.captions),
                             "mixed_precision": mixed_precision,
                             "processes": accelerator.num_processes if accelerator is not None else 1}
    predictions: List[Dict[str, Any]] = []
    for protocol in protocols:
        result = retrieve(model, gallery, protocol, k=k, itc_weight=itc_weight, batch_size=fusion_batch_size,
                          mixed_precision=mixed_precision, accelerator=accelerator)
        metrics.update({f"{protocol}/{name}": value for name, value in result.metrics.items()})
        costs[protocol] = result.cost
        top = result.text_to_image.topk(min(10, len(split.image_ids)), dim=1)
        for text, (scores, images) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            predictions.append({"protocol": protocol, "caption": split.captions[text],
                                "image_id": split.image_ids[split.text_image[text]],
                                "top_images": [split.image_ids[i] for i, s in zip(images, scores)
                                               if s != float("-inf")]})
    model.train(was_training)
    return SplitEvaluation(metrics=metrics, predictions=predictions, skipped=split.skipped, cost=costs)


def write_jsonl(path: Path, records: List[Dict[str, Any]]) -> None:
    with path.open("w") as stream:
        for record in records:
            stream.write(json.dumps(record) + "\n")
