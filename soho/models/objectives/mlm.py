"""Masked language modelling (MLM) on the matched pairs of the shared fused pass."""
from __future__ import annotations

from typing import Optional

from torch import nn

from soho.distributed import rank_share
from soho.models.heads import MLMHead
from soho.models.losses import IGNORE_INDEX, accuracy, mlm_loss
from soho.models.objectives.base import Objective, ObjectiveOutput, PretrainingStep, register_objective


@register_objective
class MaskedLanguageModeling(Objective):
    """BERT's MLM; the masks come with the batch (``mlm_input_ids``, ``mlm_labels``, drawn by the data
    stream), and only pairs whose caption is true of the image count: elsewhere the image cannot help."""

    name = "mlm"

    def __init__(self, config):
        super().__init__(config)
        encoder = config.encoder
        self.head = MLMHead(encoder.hidden_size, encoder.vocab_size, encoder.hidden_act, encoder.layer_norm_eps)

    @property
    def num_classes(self) -> int:
        return self.config.encoder.vocab_size

    def prepare(self, model: nn.Module, step: PretrainingStep) -> None:
        if self.active and step.mlm_input_ids is not None:
            step.text_ids = step.mlm_input_ids

    def forward(self, model: nn.Module, step: PretrainingStep) -> Optional[ObjectiveOutput]:
        if step.mlm_labels is None:
            return None
        labels = step.mlm_labels.masked_fill(~step.matched[:, None], IGNORE_INDEX)
        picked = labels != IGNORE_INDEX
        logits = self.head(step.fused.text_states[picked], model.text_embeddings.word_embeddings.weight)
        loss = mlm_loss(logits, labels[picked])
        if self.training:
            loss = loss * rank_share(picked.sum(), loss.device)
        return ObjectiveOutput(loss=loss, metrics={"mlm_acc": accuracy(logits.detach(), labels[picked])},
                               labels=labels[picked])
