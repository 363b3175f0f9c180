"""What the classification tasks share (NLVR2, visual entailment, VQA): examples decoded from their
records, a head over the fused [CLS] (:mod:`soho.models.tasks`), predictions gathered from every process
and scored once."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Sequence, Tuple, Union

import torch
from torch import nn

from soho.data.shards import Sample
from soho.data.tasks import TaskDataset, TaskExample, class_targets
from soho.eval.tasks import MODEL_INPUTS, SplitEvaluation, accuracy_metrics, predict_classes, write_jsonl
from soho.models.config import SohoConfig
from soho.processing import SohoProcessor
from soho.tasks.base import StepOutput
from soho.tasks.finetuning import FinetuneTask


class ClassificationTask(FinetuneTask):
    """Subclasses set ``model_class`` and ``labels`` (class names in logit order) and implement :meth:`decode`."""

    labels: ClassVar[Tuple[str, ...]] = ()

    @classmethod
    def decode(cls, sample: Sample, labelled: bool = True) -> TaskExample:
        """A sample as an example (``labelled=False``: a split whose targets are withheld), or :class:`SampleError`."""
        raise NotImplementedError

    def class_names(self) -> List[str]:
        return list(self.labels)

    def model_config(self, checkpoint: SohoConfig) -> SohoConfig:
        return dataclasses.replace(checkpoint, labels=self.class_names())

    def targets(self, examples: Sequence[TaskExample]) -> torch.Tensor:
        """The training ``labels`` of a batch."""
        return class_targets(examples)

    def train_stream(self, rank: int, world_size: int, positions: Dict[int, int]) -> TaskDataset:
        data, train = self.config.data, self.config.train
        return TaskDataset(data.train_shards, self.decode, self.processor.tokenizer, self.processor.image_config,
                           self.max_text_length, train.batch_size, train=True, targets=self.targets,
                           seed=train.seed, rank=rank, world_size=world_size, shuffle_buffer=data.shuffle_buffer,
                           start_positions=positions)

    def train_accuracy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return (logits.argmax(-1) == labels).float().mean()

    def train_step(self, model: nn.Module, batch: Dict[str, Any], device: torch.device) -> StepOutput:
        out = model(**{name: batch[name].to(device) for name in MODEL_INPUTS + ("labels",)})
        accuracy = self.train_accuracy(out.logits.detach(), batch["labels"].to(device))
        return StepOutput(loss=out.loss, losses={"loss": out.loss.detach()}, metrics={"accuracy": accuracy},
                          counts={"examples": batch["samples"]})

    @classmethod
    def describe_target(cls, target: Any, labels: Sequence[str]) -> Dict[str, Any]:
        """What a prediction record keeps of the example's target."""
        return {"label": labels[target]}

    @classmethod
    def metrics(cls, predictions: List[Dict[str, Any]], labels: Sequence[str]) -> Dict[str, float]:
        """Metrics of the gathered predictions (``labels``: the model's classes)."""
        return accuracy_metrics(predictions)

    @classmethod
    def evaluate_model(cls, model: nn.Module, processor: SohoProcessor, shards: Union[str, List[str]],
                       batch_size: int, accelerator, labelled: bool = True) -> SplitEvaluation:
        """Predict every example of a split (each process its slice; ``accelerator=None``: this process alone)
        and score the gathered predictions."""
        rank, world_size = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
        dataset = TaskDataset(shards, lambda sample: cls.decode(sample, labelled), processor.tokenizer,
                              processor.image_config, processor.max_text_length, batch_size, train=False,
                              rank=rank, world_size=world_size)
        labels = model.config.labels
        describe = (lambda target: cls.describe_target(target, labels)) if labelled else (lambda target: {})
        result = predict_classes(model, dataset, accelerator, describe)
        if labelled and result.predictions:  # none only when a stop signal ended the evaluation
            result.metrics = cls.metrics(result.predictions, labels)
        return result

    def evaluate(self, model: nn.Module, accelerator, name: str, shards: Union[str, List[str]]) -> SplitEvaluation:
        return self.evaluate_model(model, self.processor, shards, self.config.train.eval_batch_size, accelerator)

    @classmethod
    def evaluate_checkpoint(cls, args, accelerator, output: Path) -> Dict[str, Any]:
        start = time.perf_counter()
        model = cls.model_class.from_pretrained(args.checkpoint).to(accelerator.device).eval()
        processor = SohoProcessor.from_pretrained(args.checkpoint)
        result = cls.evaluate_model(model, processor, args.shards, args.batch_size, accelerator)
        if accelerator.is_main_process:
            write_jsonl(output / "predictions.jsonl", result.predictions)
        return {"metrics": result.metrics, "skipped": result.skipped,
                "cost": {"seconds": time.perf_counter() - start, "processes": accelerator.num_processes}}

