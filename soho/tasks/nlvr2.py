"""NLVR2: is the statement true of the pair of images? (the "pair" setup: each image with the statement)"""
from __future__ import annotations

from soho.data.samples import SampleError, decode_json
from soho.data.shards import Sample
from soho.data.tasks import TaskExample, record_field, sample_image
from soho.models.tasks import SohoForNLVR2
from soho.tasks.base import register_task
from soho.tasks.classification import ClassificationTask
from soho.tasks.finetuning import FinetuneConfig


@register_task
class NLVR2Task(ClassificationTask):
    name = "nlvr2"
    config_class = FinetuneConfig
    model_class = SohoForNLVR2
    labels = ("false", "true")

    @classmethod
    def decode(cls, sample: Sample, labelled: bool = True) -> TaskExample:
        record = decode_json(sample)
        label = record.get("label")
        if isinstance(label, str) and label.lower() in cls.labels:  # the official jsonl writes "True"/"False"
            label = label.lower() == "true"
        if not isinstance(label, bool):
            raise SampleError("bad_record", f"label={label!r} (expected true or false)")
        return TaskExample(example_id=str(record.get("identifier", sample.get("__key__"))),
                           images=[sample_image(sample, "left"), sample_image(sample, "right")],
                           text=record_field(record, "sentence", str), target=int(label),
                           info={"left_id": record.get("left_id"), "right_id": record.get("right_id")})
