"""Masked visual modelling (MVM): predict the dictionary entry of masked cells from the fused pass."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from soho.distributed import rank_share
from soho.models.heads import MVMHead
from soho.models.losses import accuracy, mvm_loss
from soho.models.masking import sample_mvm_mask, visible_entries
from soho.models.objectives.base import Objective, ObjectiveOutput, PretrainingStep, register_objective


@register_objective
class MaskedVisualModeling(Objective):
    """SOHO's MVM: in a picked image every cell of one dictionary entry is masked (``mvm.probability``
    per image), and the masked cells of matched pairs predict that entry."""

    name = "mvm"

    def __init__(self, config):
        super().__init__(config)
        encoder, mvm = config.encoder, config.mvm
        self.head = MVMHead(encoder.hidden_size, config.visual_dictionary.size, mvm.score, mvm.temperature,
                            encoder.hidden_act, encoder.layer_norm_eps)

    @classmethod
    def build(cls, config) -> Optional["MaskedVisualModeling"]:
        return cls(config) if config.use_visual_dictionary else None

    def own_parameters(self, model: nn.Module):
        yield from self.parameters()
        yield model.visual_embeddings.mask_embedding

    @property
    def num_classes(self) -> int:
        return self.config.visual_dictionary.size

    def prepare(self, model: nn.Module, step: PretrainingStep) -> None:
        if self.active:
            step.masked_cells = sample_mvm_mask(step.grid.indices, step.grid.mask, self.config.mvm.probability,
                                                step.image_seeds, self.config.mvm.anchor)

    def forward(self, model: nn.Module, step: PretrainingStep) -> ObjectiveOutput:
        grid, partners = step.grid, step.partners
        cells = step.masked_cells.flatten(1)[partners] & step.matched[:, None]
        targets = grid.indices.flatten(1)[partners][cells]
        logits = self.head(step.fused.image_states[cells], model.visual_dictionary.embedding)
        pairs = cells.nonzero(as_tuple=True)[0]
        visible = visible_entries(grid.indices, grid.mask, step.masked_cells, logits.shape[1])[partners[pairs]]
        if self.config.mvm.exclude_visible:
            logits = logits.masked_fill(visible, torch.finfo(logits.dtype).min)
        loss = mvm_loss(logits, targets)
        if self.training:
            loss = loss * rank_share(targets.shape[0], loss.device)
        return ObjectiveOutput(loss=loss, labels=targets, details={"visible": visible},
                               metrics={"mvm_acc": accuracy(logits.detach(), targets),
                                        "mvm_masked_cells": cells.sum().float()})
