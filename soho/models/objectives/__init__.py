"""Pre-training objectives, registered by name (:mod:`soho.models.objectives.base`).

Importing this package registers the built-in ones, in the order they prepare the shared fused pass:
ITC first (its similarities can pick ITM's hard negatives), then ITM, MLM and MVM.
"""
from soho.models.objectives.base import (
    OBJECTIVES,
    Objective,
    ObjectiveOutput,
    PretrainingStep,
    build_objectives,
    register_objective,
)
from soho.models.objectives.itc import ImageTextContrastive, masked_mean
from soho.models.objectives.itm import ClassificationMatching, ContrastiveMatching, ImageTextMatching
from soho.models.objectives.mlm import MaskedLanguageModeling
from soho.models.objectives.mvm import MaskedVisualModeling

__all__ = [
    "OBJECTIVES", "Objective", "ObjectiveOutput", "PretrainingStep", "build_objectives", "register_objective",
    "ImageTextContrastive", "ImageTextMatching", "ClassificationMatching", "ContrastiveMatching",
    "MaskedLanguageModeling", "MaskedVisualModeling", "masked_mean",
]
