"""Visual entailment (SNLI-VE): does the premise image entail, contradict or leave open the hypothesis?"""
from __future__ import annotations

from soho.data.samples import SampleError, decode_json
from soho.data.shards import Sample
from soho.data.tasks import TaskExample, record_field, sample_image
from soho.models.tasks import SohoForVisualEntailment
from soho.tasks.base import register_task
from soho.tasks.classification import ClassificationTask
from soho.tasks.finetuning import FinetuneConfig


@register_task
class VisualEntailmentTask(ClassificationTask):
    name = "ve"
    config_class = FinetuneConfig
    model_class = SohoForVisualEntailment
    labels = ("entailment", "neutral", "contradiction")

    @classmethod
    def decode(cls, sample: Sample, labelled: bool = True) -> TaskExample:
        record = decode_json(sample)
        label = record.get("label")
        if label not in cls.labels:
            raise SampleError("bad_record", f"label={label!r} (expected one of {', '.join(cls.labels)})")
        return TaskExample(example_id=str(record.get("pair_id", sample.get("__key__"))), images=[sample_image(sample)],
                           text=record_field(record, "hypothesis", str), target=cls.labels.index(label),
                           info={"image_id": record.get("image_id")})
