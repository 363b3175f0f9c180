"""Image-text matching (ITM): is this caption true of this image? A classifier over the fused [CLS]
(SOHO), or a score compared across each caption's candidate images (contrastive, Decoupling)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from soho.distributed import rank_share
from soho.models.heads import ClassifierHead, ScoreHead
from soho.models.losses import accuracy, contrastive_itm_loss, itm_loss, ranked_first, ranked_first_chance
from soho.models.objectives.base import Objective, ObjectiveOutput, PretrainingStep, register_objective


@register_objective
class ImageTextMatching(Objective):
    """``itm.loss`` picks the variant: :class:`ClassificationMatching` or :class:`ContrastiveMatching`."""

    name = "itm"

    @classmethod
    def build(cls, config) -> "ImageTextMatching":
        return (ContrastiveMatching if config.itm.loss == "contrastive" else ClassificationMatching)(config)

    def own_parameters(self, model: nn.Module):
        # In pre-training only ITM reads the pooled [CLS].
        yield from self.parameters()
        yield from model.pooler.parameters()

    def match_scores(self, pooled: Tensor) -> Tensor:
        """(N,) float scores that rank pairs by how well they match, from their pooled [CLS]."""
        raise NotImplementedError

    def match_probability(self, pooled: Tensor) -> Tensor:
        """What :meth:`SohoForPretraining.score` returns for a pair."""
        raise NotImplementedError

    def uses_truth(self, step: PretrainingStep) -> bool:
        return self.config.itm.use_truth and step.caption_truth is not None

    def negative_weights(self, step: PretrainingStep, num_images: int) -> Tensor:
        """(N, B) how likely each image is drawn as a caption's negative: uniform, or in training with
        ``itm.hard_negatives`` in proportion to ITC similarity and with ``itm.near_miss_probability`` among the
        caption's near misses (evaluation keeps uniform negatives, so held-out accuracies compare across
        settings); never the caption's own image, nor (with ``itm.use_truth``) an image the caption is true of;
        every other one drawable. A row may be all zeros: no negative exists."""
        num_texts = step.image_index.shape[0]
        if self.config.itm.hard_negatives and self.training:
            weights = step.text_to_image_logits.detach().float().softmax(dim=1)
        else:
            weights = torch.ones(num_texts, num_images, device=step.image_index.device)
        # The floor keeps every other image drawable when the softmax underflows.
        weights = weights.clamp(min=1e-12)
        weights[torch.arange(num_texts, device=weights.device), step.image_index] = 0
        if self.uses_truth(step):
            weights = weights.masked_fill(step.caption_truth.to(weights.device), 0.0)
        probability = self.config.itm.near_miss_probability
        if probability > 0 and self.training and step.caption_near_miss is not None:
            # Some captions draw their negative among the images that differ from them in one attribute only.
            near = weights * step.caption_near_miss.to(weights.device)
            chosen = (torch.rand(num_texts, device=weights.device) < probability) & (near.sum(1) > 0)
            weights = torch.where(chosen[:, None], near, weights)
        return weights


class ClassificationMatching(ImageTextMatching):
    """A 2-way classifier on a pair's pooled [CLS] says whether it matches (1 = matched).

    ``itm.pairing: swap`` (SOHO): with ``itm.negative_probability`` a caption is shown with another image in the
    shared fused pass instead of its own. ``paired`` (ALBEF's layout): every caption is shown with its own image
    in the shared pass and with one other image in a second pass, so each caption is both a positive and a
    negative in the same step; their text-only and image-only gradient components then cancel, and what is
    left is the interaction ITM has to learn.
    """

    def __init__(self, config):
        super().__init__(config)
        self.head = ClassifierHead(config.encoder.hidden_size, 2)

    @property
    def num_classes(self) -> int:
        return 2

    def match_scores(self, pooled: Tensor) -> Tensor:
        """The logit margin, matched minus mismatched."""
        logits = self.head(pooled).float()
        return logits[:, 1] - logits[:, 0]

    def match_probability(self, pooled: Tensor) -> Tensor:
        return self.head(pooled).softmax(-1)[:, 1]

    def draw_partners(self, step: PretrainingStep, num_images: int) -> Tensor:
        """For each caption, the image it is shown with: its own, or with ``itm.negative_probability`` another."""
        probability = self.config.itm.negative_probability
        if num_images < 2 or probability == 0:
            return step.image_index
        weights = self.negative_weights(step, num_images)
        # A caption true of every other image keeps its own: it has no negative in this batch.
        swap = (torch.rand(step.image_index.shape[0], device=weights.device) < probability) & (weights.sum(1) > 0)
        others = torch.multinomial(weights + (weights.sum(1, keepdim=True) == 0).float(), 1).squeeze(1)
        return torch.where(swap, others, step.image_index)

    def draw_negatives(self, step: PretrainingStep, num_images: int) -> Tensor:
        """``paired``: one other image per caption (its own where the batch holds no negative for it)."""
        if step.itm_image_index is not None:
            return step.itm_image_index
        weights = self.negative_weights(step, num_images)
        none = weights.sum(1) == 0
        drawn = torch.multinomial(weights + none[:, None].float(), 1).squeeze(1)
        return torch.where(none, step.image_index, drawn)

    def labels_of(self, step: PretrainingStep, texts: Tensor, images: Tensor) -> Tensor:
        """Whether caption ``texts[i]`` is true of image ``images[i]``: by truth where the batch has it (with
        ``itm.use_truth``), else by image identity."""
        if self.uses_truth(step):
            return step.caption_truth.to(images.device)[texts, images]
        return step.image_ids[images] == step.image_ids[step.image_index[texts]]

    def prepare(self, model: nn.Module, step: PretrainingStep) -> None:
        if not self.active or self.config.itm.pairing == "paired":
            return
        if step.itm_image_index is not None:
            step.partners = step.itm_image_index
        else:
            step.partners = self.draw_partners(step, step.image_ids.shape[0])
        if step.itm_labels is not None:
            step.matched = step.itm_labels.bool()
        else:
            step.matched = self.labels_of(step, torch.arange(step.partners.shape[0], device=step.partners.device),
                                          step.partners)

    def forward(self, model: nn.Module, step: PretrainingStep) -> ObjectiveOutput:
        logits = self.head(step.fused.pooled)
        labels = step.matched.long()
        if self.config.itm.pairing == "paired":
            negatives = self.draw_negatives(step, step.image_ids.shape[0])
            rows = (negatives != step.image_index).nonzero(as_tuple=True)[0]
            if rows.numel():
                token_types = step.token_type_ids[rows] if step.token_type_ids is not None else None
                shown = model(input_ids=step.text_ids[rows], attention_mask=step.attention_mask[rows],
                              token_type_ids=token_types, grid=step.grid, image_index=negatives[rows],
                              masked_cells=step.masked_cells)
                logits = torch.cat([logits, self.head(shown.pooled)])
                labels = torch.cat([labels, self.labels_of(step, rows, negatives[rows]).long()])
        loss = itm_loss(logits, labels)
        if self.training:
            loss = loss * rank_share(labels.shape[0], loss.device)
        return ObjectiveOutput(loss=loss, metrics={"itm_acc": accuracy(logits.detach(), labels)}, labels=labels)


class ContrastiveMatching(ImageTextMatching):
    """Contrastive ITM (Decoupling, arXiv 2102.00529): every caption is scored with its own image (the
    shared pass) and with ``itm.contrastive_negatives`` other images of the batch (one more fused pass
    each); a softmax over the candidates is trained towards its own image."""

    def __init__(self, config):
        super().__init__(config)
        self.head = ScoreHead(config.encoder.hidden_size)

    def match_scores(self, pooled: Tensor) -> Tensor:
        return self.head(pooled).float()

    def match_probability(self, pooled: Tensor) -> Tensor:
        # A raw score: it only compares images for one caption (a softmax over them gives probabilities).
        return self.match_scores(pooled)

    def draw_negatives(self, step: PretrainingStep, num_images: int) -> Tensor:
        """(N, K) negative images of each caption: K = min(``itm.contrastive_negatives``, images - 1) other
        images of the batch, without replacement."""
        count = min(self.config.itm.contrastive_negatives, num_images - 1)
        if count < 1:
            return step.image_index.new_zeros(step.image_index.shape[0], 0)
        # A row with fewer drawable images than ``count`` (captions true of many images) still draws ``count``,
        # the rest from the undrawable ones; those are ruled out of its softmax (``valid``).
        weights = self.negative_weights(step, num_images)
        short = (weights > 0).sum(1, keepdim=True) < count
        return torch.multinomial(torch.where(short & (weights == 0), 1e-30, weights), count, replacement=False)

    def forward(self, model: nn.Module, step: PretrainingStep) -> ObjectiveOutput:
        negatives = self.draw_negatives(step, step.image_ids.shape[0])
        num_texts, count = negatives.shape
        scores = self.head(step.fused.pooled)[:, None]
        if count:
            rows = torch.arange(num_texts, device=negatives.device).repeat_interleave(count)
            token_types = step.token_type_ids[rows] if step.token_type_ids is not None else None
            negative_out = model(input_ids=step.text_ids[rows], attention_mask=step.attention_mask[rows],
                                 token_type_ids=token_types, grid=step.grid, image_index=negatives.flatten(),
                                 masked_cells=step.masked_cells)
            scores = torch.cat([scores, self.head(negative_out.pooled).view(num_texts, count)], dim=1)
        candidates = torch.cat([step.image_index[:, None], negatives], dim=1)
        # Another copy of the caption's own image (same image id), or an image the caption is true of, is no negative.
        valid = step.image_ids[candidates] != step.image_ids[step.image_index][:, None]
        if self.uses_truth(step):
            valid &= ~step.caption_truth.to(valid.device).gather(1, candidates)
        valid[:, 0] = True
        loss = contrastive_itm_loss(scores, valid)
        if self.training:
            loss = loss * rank_share(num_texts, loss.device)
        metrics = {"itm_acc": ranked_first(scores.detach(), valid), "chance_itm_acc": ranked_first_chance(valid)}
        return ObjectiveOutput(loss=loss, metrics=metrics)
