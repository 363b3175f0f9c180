"""Visual question answering (VQA v2): classify over the most frequent answers, trained against the
annotators' soft scores, scored by the VQA accuracy."""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from soho.config import ConfigError
from soho.data.samples import SampleError, decode_json
from soho.data.shards import Sample, SkipCounter, expand_urls, stream_samples
from soho.data.tasks import TaskExample, record_field, sample_image
from soho.eval.tasks import SplitEvaluation, vqa_metrics, write_jsonl
from soho.eval.vqa import AnswerVocabulary, normalize_answer, submission, vqa_score
from soho.models.tasks import SohoForVQA
from soho.processing import SohoProcessor
from soho.tasks.base import check_shards, register_task
from soho.tasks.classification import ClassificationTask
from soho.tasks.finetuning import FinetuneConfig, FinetuneDataConfig

logger = logging.getLogger(__name__)


@dataclass
class VQADataConfig(FinetuneDataConfig):
    answer_vocabulary: Optional[str] = None
    """A JSON file ``{"answers": [...]}`` (``AnswerVocabulary.load``, e.g. the VQA v2 converter's
    ``answer_vocabulary.json``) whose answers become the classes; default: the most frequent training answers."""
    answer_vocabulary_size: int = 3129
    """The most classes: the most frequent training answers kept, or the most answers ``answer_vocabulary``
    may list (a longer file is an error, not cut: nothing says it is ranked)."""
    answer_min_count: int = 1
    """Without ``answer_vocabulary``: in how many training questions an answer must occur to be a class."""

    def __post_init__(self):
        super().__post_init__()
        if self.answer_vocabulary_size < 1 or self.answer_min_count < 1:
            raise ConfigError("data.answer_vocabulary_size and data.answer_min_count must be >= 1")
        if self.answer_vocabulary is not None and self.answer_min_count != 1:
            raise ConfigError(f"data.answer_min_count={self.answer_min_count} filters the answers counted in the "
                              f"training shards, but data.answer_vocabulary={self.answer_vocabulary!r} gives the "
                              "classes as they are: set one of the two")


@dataclass
class VQAConfig(FinetuneConfig):
    task: str = "vqa"
    data: VQADataConfig = field(default_factory=VQADataConfig)


def build_answer_vocabulary(data: VQADataConfig) -> AnswerVocabulary:
    """The most frequent annotator answers of the training split (records only; images are not decoded).

    Unreadable records are left out here and counted by the training stream, which skips them too.
    """
    answer_lists = []
    for sample in stream_samples(expand_urls(data.train_shards), seed=0, rank=0, world_size=1, worker=0,
                                 num_workers=1, skips=SkipCounter(), repeat=False):
        try:
            answers = decode_json(sample).get("answers")
        except SampleError:  # the training stream skips and reports it
            continue
        if isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers):
            answer_lists.append(answers)
    if not answer_lists:
        raise ConfigError(f"data.train_shards: no VQA answers found in {data.train_shards!r}")
    vocabulary = AnswerVocabulary.build(answer_lists, data.answer_vocabulary_size, data.answer_min_count)
    logger.info("answer vocabulary: %d answers, %.1f %% best reachable training accuracy",
                len(vocabulary), 100.0 * vocabulary.coverage(answer_lists))
    return vocabulary


def load_answer_vocabulary(data: VQADataConfig) -> AnswerVocabulary:
    """The classes listed in ``data.answer_vocabulary``; a ConfigError naming the file when it cannot be used."""
    try:
        vocabulary = AnswerVocabulary.load(data.answer_vocabulary)
    except (OSError, ValueError) as error:
        raise ConfigError(f"data.answer_vocabulary: {error}") from None
    if not len(vocabulary):
        raise ConfigError(f"data.answer_vocabulary: {data.answer_vocabulary} lists no answers")
    if len(vocabulary) > data.answer_vocabulary_size:
        raise ConfigError(f"data.answer_vocabulary: {data.answer_vocabulary} lists {len(vocabulary)} answers, more "
                          f"than data.answer_vocabulary_size={data.answer_vocabulary_size}; raise that or use a "
                          "shorter file")
    logger.info("answer vocabulary: %d answers from %s", len(vocabulary), data.answer_vocabulary)
    return vocabulary


def soft_score_targets(vocabulary: AnswerVocabulary, examples: Sequence[TaskExample]) -> torch.Tensor:
    """(examples, answers) soft scores of each example's annotator answers; an answer outside the vocabulary
    cannot be learned, only scored."""
    scores = torch.zeros(len(examples), len(vocabulary))
    for row, example in enumerate(examples):
        indices, values = vocabulary.targets(example.target)
        scores[row, indices] = torch.tensor(values, dtype=scores.dtype)
    return scores


def write_submission(path: Path, result: SplitEvaluation) -> dict:
    """The VQA evaluation server's results file of an unlabelled split; returns what results.json says of it."""
    entries = submission({p["id"]: p["prediction"] for p in result.predictions})
    path.write_text(json.dumps(entries))
    if result.skipped:
        # The server rejects a results file that does not answer every question of the split.
        logger.warning("%d questions were skipped and are missing from %s", sum(result.skipped.values()), path)
    return {"path": str(path), "questions": len(entries)}


@register_task
class VQATask(ClassificationTask):
    name = "vqa"
    config_class = VQAConfig
    model_class = SohoForVQA

    def setup(self, accelerator) -> None:
        data = self.config.data
        check_shards("data.train_shards", data.train_shards)
        # Before anything is written: a bad vocabulary file must not cost the previous run's outputs.
        self.vocabulary = build_answer_vocabulary(data) if data.answer_vocabulary is None \
            else load_answer_vocabulary(data)
        super().setup(accelerator)

    def class_names(self) -> List[str]:
        return list(self.vocabulary.answers)

    @classmethod
    def decode(cls, sample: Sample, labelled: bool = True) -> TaskExample:
        """A question and its annotators' answers; ``labelled=False`` reads questions only (VQA test splits)."""
        record = decode_json(sample)
        answers = record.get("answers")
        if labelled and not (isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers)):
            raise SampleError("bad_record", f"answers={answers!r} (expected a non-empty list of strings; questions "
                                            "without answers can only be predicted: tools/evaluate.py vqa "
                                            "--predict-only)")
        return TaskExample(
            example_id=str(record.get("question_id", sample.get("__key__"))),
            images=[sample_image(sample)],
            text=record_field(record, "question", str),
            target=answers if labelled else None,
            info={key: record[key] for key in ("image_id", "answer_type", "question_type") if key in record},
        )

    def targets(self, examples: Sequence[TaskExample]) -> torch.Tensor:
        return soft_score_targets(self.vocabulary, examples)

    def train_accuracy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # The soft score of the predicted answer (0 when it is outside the vocabulary's targets).
        return labels.gather(1, logits.argmax(-1)[:, None]).mean()

    @classmethod
    def describe_target(cls, target: Any, labels: Sequence[str]) -> Dict[str, Any]:
        return {"answers": target}

    @classmethod
    def metrics(cls, predictions: List[Dict[str, Any]], labels: Sequence[str]) -> Dict[str, float]:
        """VQA accuracy with its chance level and its ceiling: the accuracy of always picking, among the
        classes, the best answer for the question (answers no class holds cannot be given)."""
        metrics = vqa_metrics(predictions)
        by_question_type: Dict[str, List[Dict[str, Any]]] = {}
        for p in predictions:
            if "question_type" in p:
                by_question_type.setdefault(p["question_type"], []).append(p)
        if len(by_question_type) > 1:
            # Per question type against its prior: the best single answer for that type's questions.
            for kind, group in sorted(by_question_type.items()):
                scored = vqa_metrics(group)
                name = kind.replace("/", "_").replace(" ", "_")
                metrics[f"vqa_accuracy_type_{name}"] = scored["vqa_accuracy"]
                metrics[f"chance_vqa_accuracy_type_{name}"] = scored["chance_vqa_accuracy"]
        classes = set(labels)
        best = [max([vqa_score(answer, p["answers"]) for answer in map(normalize_answer, p["answers"])
                     if answer in classes], default=0.0) for p in predictions]
        metrics["ceiling_vqa_accuracy"] = 100.0 * sum(best) / len(best)
        return metrics

    @classmethod
    def add_evaluate_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--predict-only", action="store_true",
                            help="for splits whose answers are withheld (VQA v2 test-dev, test): predict every "
                                 "question, with or without answers, and write <output>/submission.json, "
                                 '[{"question_id": int, "answer": str}, ...] for the official evaluation server '
                                 "(question ids must be integers); no accuracy. Without it, questions without "
                                 "answers are skipped as bad_record")

    @classmethod
    def evaluate_checkpoint(cls, args, accelerator, output: Path) -> Dict[str, Any]:
        if not args.predict_only:
            return super().evaluate_checkpoint(args, accelerator, output)
        start = time.perf_counter()
        model = cls.model_class.from_pretrained(args.checkpoint).to(accelerator.device).eval()
        processor = SohoProcessor.from_pretrained(args.checkpoint)
        result = cls.evaluate_model(model, processor, args.shards, args.batch_size, accelerator, labelled=False)
        results = {"metrics": result.metrics, "skipped": result.skipped,
                   "cost": {"seconds": time.perf_counter() - start, "processes": accelerator.num_processes}}
        if accelerator.is_main_process:
            write_jsonl(output / "predictions.jsonl", result.predictions)
            results["submission"] = write_submission(output / "submission.json", result)
        return results

