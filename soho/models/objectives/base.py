"""What every pre-training objective is: a module that owns its head and turns the step's shared
passes into a loss, found by name in a registry.

:class:`~soho.models.soho.SohoForPretraining` runs the expensive passes once per step and shares them:
one backbone and dictionary pass per image, one fused pass per (text, image) pairing. Each objective
first contributes what that fused pass needs (:meth:`Objective.prepare`: which image a text is shown
with, which cells are masked, which token ids go in), then computes its loss from it
(:meth:`Objective.forward`). Objectives prepare in registration order, so one may use what an earlier
one prepared (ITM's hard negatives use ITC's similarities).

A new objective is one module: a subclass registered with :func:`register_objective`, imported by
:mod:`soho.models.objectives`. Its weight is ``loss_weights.<name>`` of the model config (1 when
absent; 0 keeps its head but computes no loss).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, Iterator, Optional

import torch
from torch import Tensor, nn

from soho.models.config import SohoConfig
from soho.registry import Registry


@dataclass
class PretrainingStep:
    """The inputs of one pre-training step, and what the objectives prepare for its shared fused pass."""

    grid: Any
    """The batch's :class:`~soho.models.soho.VisualGrid` (one backbone and dictionary pass)."""
    input_ids: Tensor
    """(N, L) clean caption ids (what ITC encodes)."""
    attention_mask: Tensor
    token_type_ids: Optional[Tensor]
    image_index: Tensor
    """(N,) the image each caption belongs to."""
    image_ids: Tensor
    """(B,) global image ids: two rows with one id are the same image, never each other's negative."""
    image_seeds: Tensor
    """(B,) keys of each image's random draws (:func:`soho.models.masking.keyed_uniform`)."""
    mlm_input_ids: Optional[Tensor] = None
    mlm_labels: Optional[Tensor] = None
    itm_image_index: Optional[Tensor] = None
    """(N,) the image each caption is shown with for ITM, when the data chose it (else ITM draws it)."""
    itm_labels: Optional[Tensor] = None
    """(N,) 1 where the caption is true of the image it is shown with, when the data knows (else: same image id)."""
    caption_truth: Optional[Tensor] = None
    """(N, B) bool: whether each caption is true of each image of the batch, when the data knows (scene graphs)."""
    caption_near_miss: Optional[Tensor] = None
    """(N, B) bool: images each caption is false of but true once one attribute it names is not looked at."""

    text_ids: Optional[Tensor] = None
    """(N, L) ids of the fused pass: the clean captions unless an objective (MLM) corrupts them."""
    partners: Optional[Tensor] = None
    """(N,) the image each caption is shown with in the fused pass (default: its own)."""
    matched: Optional[Tensor] = None
    """(N,) bool, whether the caption is true of its partner (default: all)."""
    masked_cells: Optional[Tensor] = None
    """(B, h, w) cells replaced by the mask embedding in the fused pass."""
    text_to_image_logits: Optional[Tensor] = None
    """(N, B) ITC similarities of each caption to this rank's images, when ITC ran."""
    fused: Any = None
    """The shared fused pass (:class:`~soho.models.soho.SohoOutput`), once it ran."""
    cache: Dict[str, Any] = field(default_factory=dict)
    """Results an objective computes in ``prepare`` and returns in ``forward``."""

    def __post_init__(self):
        if self.text_ids is None:
            self.text_ids = self.input_ids
        if self.partners is None:
            self.partners = self.image_index
        if self.matched is None:
            self.matched = torch.ones_like(self.image_index, dtype=torch.bool)


@dataclass
class ObjectiveOutput:
    loss: Tensor
    """Unweighted; under DDP each rank's share of the loss over the whole batch
    (:func:`soho.distributed.rank_share`)."""
    metrics: Dict[str, Tensor] = field(default_factory=dict)
    """Accuracies and other values to log (detached by the model)."""
    labels: Optional[Tensor] = None
    """The class labels its accuracy was measured on, for chance levels."""
    details: Dict[str, Tensor] = field(default_factory=dict)
    """Anything else analysis needs (MVM: the entries each masked cell's image shows)."""


class Objective(nn.Module):
    """One pre-training objective. Subclasses set ``name`` and implement :meth:`forward`."""

    name: ClassVar[str]

    def __init__(self, config: SohoConfig):
        super().__init__()
        self.config = config
        self.weight = float(config.loss_weights.get(self.name, 1.0))

    @classmethod
    def build(cls, config: SohoConfig) -> Optional["Objective"]:
        """The objective for a model with ``config``, or None when such a model cannot have it
        (MVM without a visual dictionary)."""
        return cls(config)

    @property
    def num_classes(self) -> Optional[int]:
        """How many classes its ``labels`` range over, for chance levels (None: no class labels)."""
        return None

    @property
    def active(self) -> bool:
        """Whether it contributes a loss (its head exists either way)."""
        return self.weight > 0

    def own_parameters(self, model: nn.Module) -> Iterator[nn.Parameter]:
        """The parameters only this objective's loss trains (``model``: the :class:`SohoModel`): its head."""
        return self.parameters()

    def initialise(self, init_weights: Callable[[nn.Module], None]) -> None:
        """Initialise the head (``init_weights``: the model's BERT initialisation)."""
        self.apply(init_weights)

    def prepare(self, model: nn.Module, step: PretrainingStep) -> None:
        """Set what the shared fused pass needs from this objective (``model``: the :class:`SohoModel`)."""

    def forward(self, model: nn.Module, step: PretrainingStep) -> Optional[ObjectiveOutput]:
        """The loss after the fused pass; None when the batch holds nothing to learn from (no MLM labels)."""
        raise NotImplementedError


OBJECTIVES = Registry("objective")
"""Registered objectives by name, in registration (= preparation) order."""
register_objective = OBJECTIVES.register


def build_objectives(config: SohoConfig) -> nn.ModuleDict:
    """Every registered objective a model with ``config`` has, in preparation order."""
    for name in config.loss_weights:
        OBJECTIVES.lookup(name, f"loss_weights.{name}")
    built = ((name, cls.build(config)) for name, cls in OBJECTIVES.items())
    return nn.ModuleDict({name: objective for name, objective in built if objective is not None})
