"""Downstream task streams: NLVR2, visual entailment and VQA shards -> batches.

Each task's record (docs/DATA.md) is decoded into a :class:`TaskExample`: an id, one
or two images, a text and the raw target. Training streams shuffle and repeat; evaluation
streams read each (rank, worker) slice once, in order, so every example is seen exactly
once over all ranks. Broken samples are skipped, logged and counted, never dropped silently.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import torch
from PIL import Image
from torch.utils.data import IterableDataset

from soho.data.pretraining import SampleError, decode_image, decode_json
from soho.data.shards import Sample, SkipCounter, expand_urls, fast_forward, worker_stream
from soho.processing import ImageTransform, ImageTransformConfig, pad_images

CLASSIFICATION_TASKS = ("nlvr2", "ve", "vqa")
VE_LABELS = ("entailment", "neutral", "contradiction")
NLVR2_LABELS = ("false", "true")


@dataclass
class TaskExample:
    example_id: str
    images: List[Image.Image]
    text: str
    target: Any
    """Class index (NLVR2, VE) or the annotators' answers (VQA); None for an unlabelled split."""
    info: Dict[str, Any]
    """Record fields kept with the prediction (question type, image ids, ...)."""


def _field(record: Dict[str, Any], name: str, kind: type) -> Any:
    value = record.get(name)
    if not isinstance(value, kind) or (kind is str and not value):
        raise SampleError("bad_record", f"{name}={value!r} (expected a non-empty {kind.__name__})")
    return value


def _image(sample: Sample, prefix: str) -> Image.Image:
    """The image stored under ``<prefix>.jpg`` (or another image extension); ``prefix=''`` for ``<key>.jpg``."""
    if not prefix:
        return decode_image(sample)
    view = {ext[len(prefix) + 1:]: data for ext, data in sample.items() if ext.startswith(prefix + ".")}
    try:
        return decode_image(view)
    except SampleError as error:
        raise SampleError(error.reason, f"{prefix} image: {error}") from None


def decode_nlvr2(sample: Sample) -> TaskExample:
    record = decode_json(sample)
    label = record.get("label")
    if isinstance(label, str) and label.lower() in NLVR2_LABELS:  # the official jsonl writes "True"/"False"
        label = label.lower() == "true"
    if not isinstance(label, bool):
        raise SampleError("bad_record", f"label={label!r} (expected true or false)")
    return TaskExample(
        example_id=str(record.get("identifier", sample.get("__key__"))),
        images=[_image(sample, "left"), _image(sample, "right")],
        text=_field(record, "sentence", str),
        target=int(label),
        info={"left_id": record.get("left_id"), "right_id": record.get("right_id")},
    )


def decode_ve(sample: Sample) -> TaskExample:
    record = decode_json(sample)
    label = record.get("label")
    if label not in VE_LABELS:
        raise SampleError("bad_record", f"label={label!r} (expected one of {', '.join(VE_LABELS)})")
    return TaskExample(
        example_id=str(record.get("pair_id", sample.get("__key__"))),
        images=[_image(sample, "")],
        text=_field(record, "hypothesis", str),
        target=VE_LABELS.index(label),
        info={"image_id": record.get("image_id")},
    )


def decode_vqa(sample: Sample, labelled: bool = True) -> TaskExample:
    """A question and its annotators' answers; ``labelled=False`` reads questions only (VQA test splits)."""
    record = decode_json(sample)
    answers = record.get("answers")
    if labelled and not (isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers)):
        raise SampleError("bad_record", f"answers={answers!r} (expected a non-empty list of strings; questions "
                                        "without answers can only be predicted: tools/evaluate.py vqa --predict-only)")
    return TaskExample(
        example_id=str(record.get("question_id", sample.get("__key__"))),
        images=[_image(sample, "")],
        text=_field(record, "question", str),
        target=answers if labelled else None,
        info={key: record[key] for key in ("image_id", "answer_type", "question_type") if key in record},
    )


DECODERS = {"nlvr2": decode_nlvr2, "ve": decode_ve, "vqa": decode_vqa}


class TaskCollator:
    """Pads the examples' images (in example order; NLVR2: left, then right), tokenises texts, builds targets
    (``labels``; not for an unlabelled split)."""

    def __init__(self, task: str, tokenizer, max_text_length: int, size_divisor: int, answer_vocabulary=None,
                 labelled: bool = True):
        if task == "vqa" and labelled and answer_vocabulary is None:
            raise ValueError("the VQA collator needs the answer vocabulary")
        self.task = task
        self.labelled = labelled
        self.tokenizer = tokenizer
        self.max_text_length = max_text_length
        self.size_divisor = size_divisor
        self.answer_vocabulary = answer_vocabulary

    def __call__(self, images: Sequence[torch.Tensor], examples: Sequence[TaskExample]) -> Dict[str, Any]:
        pixel_values, pixel_mask = pad_images(images, self.size_divisor)
        encoded = self.tokenizer([e.text for e in examples], padding=True, truncation=True,
                                 max_length=self.max_text_length, return_tensors="pt",
                                 return_token_type_ids=True)
        batch = {
            "pixel_values": pixel_values,
            "pixel_mask": pixel_mask,
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "token_type_ids": encoded["token_type_ids"],
            "example_ids": [e.example_id for e in examples],
            "targets": [e.target for e in examples],
            "info": [e.info for e in examples],
        }
        if not self.labelled:
            return batch
        if self.task == "vqa":
            # Soft scores over the vocabulary; an answer outside it cannot be learned, only scored.
            scores = torch.zeros(len(examples), len(self.answer_vocabulary))
            for row, example in enumerate(examples):
                indices, values = self.answer_vocabulary.targets(example.target)
                scores[row, indices] = torch.tensor(values, dtype=scores.dtype)
            batch["labels"] = scores
        else:
            batch["labels"] = torch.tensor([e.target for e in examples], dtype=torch.long)
        return batch


class TaskDataset(IterableDataset):
    """Batches of one downstream task for one rank.

    ``train=True``: an infinite, shuffled stream. ``train=False``: one ordered pass over
    this rank's disjoint slice, with a last partial batch; no example is padded or repeated,
    so predictions gathered from all ranks cover the split exactly once.

    ``labelled=False`` (VQA evaluation only) reads questions without answers, for splits whose answers
    are withheld (VQA v2 test-dev / test); their batches have no ``labels``. Training always needs
    labels, so there a record without answers stays a counted ``bad_record`` skip.

    Every batch says which reader (``worker``) made it and how many shuffled samples that reader had
    handed out (``position``); ``start_positions`` (worker -> position) skips those undecoded, so a
    resumed run sees the batches an uninterrupted one would have.
    """

    def __init__(self, task: str, shards: Union[str, List[str]], tokenizer, image: ImageTransformConfig,
                 max_text_length: int, batch_size: int, train: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle_buffer: int = 1000, answer_vocabulary=None, labelled: bool = True,
                 start_positions: Optional[Dict[int, int]] = None):
        super().__init__()
        if task not in DECODERS:
            raise ValueError(f"unknown task {task!r}; expected one of {', '.join(DECODERS)}")
        if not labelled and (train or task != "vqa"):
            raise ValueError(f"only VQA evaluation reads splits without labels (got task={task!r}, train={train})")
        self.task = task
        self.decode = DECODERS[task] if labelled else functools.partial(decode_vqa, labelled=False)
        self.urls = expand_urls(shards)
        self.transform = ImageTransform(image)
        self.collate = TaskCollator(task, tokenizer, max_text_length, image.size_divisor, answer_vocabulary, labelled)
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = shuffle_buffer if train else 0
        self.start_positions = dict(start_positions or {})

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        samples, skips, worker, _ = worker_stream(self.urls, self.seed, self.rank, self.world_size, self.train,
                                                  self.shuffle_buffer)
        position = fast_forward(samples, self.start_positions.get(worker, 0))
        images: List[torch.Tensor] = []
        examples: List[TaskExample] = []
        reported = SkipCounter()
        for sample in samples:
            position += 1
            try:
                example = self.decode(sample)
                pixels = [self.transform(image) for image in example.images]
            except SampleError as error:
                skips.skip(error.reason, f"{sample.get('__url__', '')}:{sample.get('__key__', '?')}", error)
                continue
            images.extend(pixels)
            examples.append(example)
            if len(examples) == self.batch_size:
                yield self._batch(images, examples, skips - reported, worker, position)
                reported = SkipCounter(skips)
                images, examples = [], []
        if examples:
            yield self._batch(images, examples, skips - reported, worker, position)
        elif skips - reported:
            yield {"skipped": dict(skips - reported), "samples": 0, "worker": worker, "position": position}

    def _batch(self, images, examples, skipped: SkipCounter, worker: int, position: int) -> Dict[str, Any]:
        batch = self.collate(images, examples)
        batch.update(skipped=dict(skipped), samples=len(examples), worker=worker, position=position)
        return batch

