"""Fine-tuning models: NLVR2, visual entailment and VQA heads on the cross-modal [CLS].

Heads follow the SOHO release: an MLP hidden -> 2 x hidden -> classes on
the pooled [CLS]; NLVR2 in the "pair" setup, each image with the statement through the
Transformer and the two pooled outputs concatenated; VQA scored against soft targets
with binary cross-entropy. Retrieval fine-tunes :class:`SohoForPretraining`'s ITM (and
ITC) heads directly. Class names live in ``config.labels``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.activations import ACT2FN

from soho.models.config import SohoConfig
from soho.models.pretrained import SohoPreTrainedModel
from soho.models.soho import SohoModel


@dataclass
class ClassificationOutput:
    logits: Tensor
    loss: Optional[Tensor] = None


class MLPHead(nn.Module):
    """Linear -> GELU -> LayerNorm -> Linear, UNITER's and SOHO's answer classifier."""

    def __init__(self, in_features: int, hidden_features: int, num_classes: int, hidden_act: str = "gelu",
                 layer_norm_eps: float = 1e-12):
        super().__init__()
        self.dense = nn.Linear(in_features, hidden_features)
        self.activation = ACT2FN[hidden_act]
        self.norm = nn.LayerNorm(hidden_features, eps=layer_norm_eps)
        self.classifier = nn.Linear(hidden_features, num_classes)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.classifier(self.norm(self.activation(self.dense(pooled))))


def vqa_loss(logits: Tensor, soft_scores: Tensor) -> Tensor:
    """BCE against soft scores, summed over answers and averaged over questions, as the
    release (mean BCE x number of answers): an answer vocabulary of thousands would
    otherwise drown the few positive targets in the mean."""
    return F.binary_cross_entropy_with_logits(logits.float(), soft_scores.float()) * soft_scores.shape[1]


class SohoForClassification(SohoPreTrainedModel):
    """SohoModel plus an MLP over ``images_per_text`` concatenated pooled outputs: classes ``config.labels``."""

    images_per_text = 1

    def __init__(self, config: SohoConfig):
        super().__init__()
        if len(config.labels) < 2:
            raise ValueError(f"{type(self).__name__} needs config.labels (at least 2 class names), "
                             f"got {config.labels!r}")
        self.config = config
        hidden = config.encoder.hidden_size
        self.soho = SohoModel(config)
        self.head = MLPHead(hidden * self.images_per_text, hidden * 2, len(config.labels),
                            config.encoder.hidden_act, config.encoder.layer_norm_eps)
        self.head.apply(self.init_weights)
        # Fine-tuning masks no cells; under DDP every trainable parameter must get a gradient in every step.
        self.soho.visual_embeddings.mask_embedding.requires_grad_(False)
        if config.encoder.pretrained_path:
            self.load_bert(config.encoder.pretrained_path)

    def logits(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
               pixel_mask: Optional[Tensor] = None, token_type_ids: Optional[Tensor] = None) -> Tensor:
        """(B * images_per_text) images, B texts -> (B, num_labels) logits."""
        num_texts = input_ids.shape[0]
        if pixel_values.shape[0] != num_texts * self.images_per_text:
            raise ValueError(f"{type(self).__name__} takes {self.images_per_text} image(s) per text: got "
                             f"{pixel_values.shape[0]} images for {num_texts} texts")
        if self.images_per_text > 1:
            # Image j belongs to text j // images_per_text: repeat each text next to its images.
            repeat = self.images_per_text
            input_ids = input_ids.repeat_interleave(repeat, 0)
            attention_mask = None if attention_mask is None else attention_mask.repeat_interleave(repeat, 0)
            token_type_ids = None if token_type_ids is None else token_type_ids.repeat_interleave(repeat, 0)
        out = self.soho(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                        pixel_values=pixel_values, pixel_mask=pixel_mask)
        return self.head(out.pooled.reshape(num_texts, -1))

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits.float(), labels)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                pixel_mask: Optional[Tensor] = None, token_type_ids: Optional[Tensor] = None,
                labels: Optional[Tensor] = None) -> ClassificationOutput:
        logits = self.logits(pixel_values, input_ids, attention_mask, pixel_mask, token_type_ids)
        return ClassificationOutput(logits=logits, loss=None if labels is None else self.loss(logits, labels))

    @torch.no_grad()
    def predict(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                pixel_mask: Optional[Tensor] = None, token_type_ids: Optional[Tensor] = None) -> list:
        """The predicted class name of every text."""
        logits = self.logits(pixel_values, input_ids, attention_mask, pixel_mask, token_type_ids)
        return [self.config.labels[i] for i in logits.argmax(-1).tolist()]


class SohoForVisualEntailment(SohoForClassification):
    """Premise image + hypothesis -> entailment / neutral / contradiction."""


class SohoForNLVR2(SohoForClassification):
    """Two images + a statement -> false / true, in the pair setup."""

    images_per_text = 2


class SohoForVQA(SohoForClassification):
    """Image + question -> a score per answer of the vocabulary in ``config.labels``."""

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return vqa_loss(logits, labels)

