"""Image-text contrastive learning (ITC): unimodal embeddings aligned by InfoNCE over the global batch."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from soho.distributed import rank
from soho.models.heads import ContrastiveProjection
from soho.models.losses import itc_loss
from soho.models.objectives.base import Objective, ObjectiveOutput, PretrainingStep, register_objective


def masked_mean(states: Tensor, mask: Tensor) -> Tensor:
    weights = mask.to(states.dtype)[..., None]
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)


@register_objective
class ImageTextContrastive(Objective):
    """Text embedding from the text-only pass's [CLS], image embedding from the mean of the image-only
    pass's tokens, both projected and L2-normalised; the same embeddings serve dual-encoder retrieval."""

    name = "itc"

    def __init__(self, config):
        super().__init__(config)
        self.head = ContrastiveProjection(config.encoder.hidden_size, config.itc.embed_dim, config.itc.temperature)

    @classmethod
    def build(cls, config) -> Optional["ImageTextContrastive"]:
        return cls(config) if config.itc.enabled else None

    def initialise(self, init_weights) -> None:
        super().initialise(init_weights)
        self.head.log_temperature.data.fill_(torch.tensor(self.config.itc.temperature).log().item())

    def text_embeds(self, model: nn.Module, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                    token_type_ids: Optional[Tensor] = None) -> Tensor:
        out = model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return self.head.embed_text(out.text_states[:, 0])

    def image_embeds(self, model: nn.Module, grid) -> Tensor:
        tokens, mask = model.visual_tokens(grid)
        states = model.encoder(image=tokens, image_mask=mask).image_states
        return self.head.embed_image(masked_mean(states, mask))

    def prepare(self, model: nn.Module, step: PretrainingStep) -> None:
        # ITM's hard negatives need the similarities even when ITC itself is not trained.
        if not (self.active or self.config.itm.hard_negatives):
            return
        text = self.text_embeds(model, step.input_ids, step.attention_mask, step.token_type_ids)
        image = self.image_embeds(model, step.grid)
        num_images = image.shape[0]
        loss, logits = itc_loss(image, text, self.head.temperature, step.image_ids, step.image_ids[step.image_index],
                                gather=self.training)
        # The columns of this rank's own images: the whole row when nothing was gathered.
        offset = rank() * num_images if logits.shape[1] > num_images else 0
        step.text_to_image_logits = logits[:, offset:offset + num_images]
        # In-batch text-to-image R@1 over this rank's images.
        hits = step.image_ids[step.text_to_image_logits.argmax(1)] == step.image_ids[step.image_index]
        step.cache[self.name] = ObjectiveOutput(
            loss=loss, metrics={"itc_acc": hits.float().mean(), "itc_temperature": self.head.temperature.detach()})

    def forward(self, model: nn.Module, step: PretrainingStep) -> ObjectiveOutput:
        return step.cache[self.name]
