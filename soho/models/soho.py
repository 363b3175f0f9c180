"""The soho model: CNN grid -> visual dictionary -> cross-modal Transformer, and its pre-training heads."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from soho.distributed import rank
from soho.models.backbone import Backbone
from soho.models.config import SohoConfig
from soho.models.encoder import Encoder, EncoderOutput, Pooler, TextEmbeddings
from soho.models.heads import ClassifierHead, ContrastiveProjection, MLMHead, MVMHead, ScoreHead
from soho.models.losses import (
    IGNORE_INDEX,
    accuracy,
    contrastive_itm_loss,
    itc_loss,
    itm_loss,
    mlm_loss,
    mvm_loss,
    ranked_first,
    ranked_first_chance,
)
from soho.models.masking import sample_mvm_mask, visible_entries
from soho.models.pretrained import SohoPreTrainedModel
from soho.models.visual_dictionary import VisualDictionary
from soho.models.visual_tokens import VisualEmbeddings, grid_mask


@dataclass
class VisualGrid:
    """One backbone pass over a batch of images, before the Transformer."""

    features: Tensor
    """(B, h, w, D) grid features: dictionary-quantised (straight-through) or continuous."""
    mask: Tensor
    """(B, h, w) True for cells inside the unpadded image."""
    indices: Optional[Tensor] = None
    """(B, h, w) dictionary entry of each cell, when the dictionary is used."""
    usage: Dict[str, Tensor] = field(default_factory=dict)
    """Dictionary usage statistics of this batch (perplexity, used and live fractions)."""


@dataclass
class SohoOutput:
    text_states: Optional[Tensor]
    image_states: Optional[Tensor]
    image_mask: Optional[Tensor]
    pooled: Optional[Tensor]
    """tanh-pooled first ([CLS]) token, present when text is given."""
    grid: Optional[VisualGrid]
    hidden_states: Optional[Tuple[Tensor, ...]] = None
    attentions: Optional[Tuple[Tensor, ...]] = None


class SohoModel(SohoPreTrainedModel):
    """Backbone, visual dictionary, visual and text embeddings, Transformer encoder, pooler."""

    def __init__(self, config: SohoConfig):
        super().__init__()
        self.config = config
        hidden = config.encoder.hidden_size
        self.backbone = Backbone(config.backbone, hidden)
        self.visual_dictionary = (VisualDictionary(config.visual_dictionary, hidden)
                                  if config.use_visual_dictionary else None)
        self.visual_embeddings = VisualEmbeddings(hidden, config.encoder.layer_norm_eps,
                                                  config.encoder.hidden_dropout_prob)
        self.text_embeddings = TextEmbeddings(config.encoder)
        self.encoder = Encoder(config.encoder)
        self.pooler = Pooler(hidden)
        for module in (self.visual_embeddings, self.text_embeddings, self.encoder, self.pooler):
            module.apply(self.init_weights)
        torch.nn.init.normal_(self.visual_embeddings.mask_embedding, std=config.encoder.initializer_range)
        if config.encoder.pretrained_path and type(self) is SohoModel:
            self.load_bert(config.encoder.pretrained_path)

    def embed_image(self, pixel_values: Tensor, pixel_mask: Optional[Tensor] = None) -> VisualGrid:
        """Backbone and dictionary: (B, 3, H, W) pixels -> a :class:`VisualGrid`.

        In training mode the dictionary is updated (EMA) with the valid cells.
        """
        features = self.backbone(pixel_values)
        batch, _, height, width = features.shape
        if pixel_mask is None:
            mask = features.new_ones(batch, height, width, dtype=torch.bool)
        else:
            if pixel_mask.shape != (batch, *pixel_values.shape[2:]):
                raise ValueError(f"pixel_mask {tuple(pixel_mask.shape)} does not match pixel_values "
                                 f"{tuple(pixel_values.shape)}")
            mask = grid_mask(pixel_mask, (height, width))
        grid = features.permute(0, 2, 3, 1)
        if self.visual_dictionary is None:
            return VisualGrid(grid, mask)
        flat = grid.reshape(-1, grid.shape[-1])
        quantised = self.visual_dictionary(flat, mask.reshape(-1))
        return VisualGrid(
            features=quantised.quantized.view_as(grid),
            mask=mask,
            indices=quantised.indices.view(batch, height, width),
            usage=self.visual_dictionary.usage(quantised.indices, mask.reshape(-1)),
        )

    def visual_tokens(self, grid: VisualGrid, masked_cells: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """(B, h*w, D) visual tokens and their (B, h*w) validity mask."""
        tokens = self.visual_embeddings(grid.features, grid.mask, masked_cells)
        return tokens, grid.mask.flatten(1)

    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        token_type_ids: Optional[Tensor] = None,
        pixel_values: Optional[Tensor] = None,
        pixel_mask: Optional[Tensor] = None,
        grid: Optional[VisualGrid] = None,
        image_index: Optional[Tensor] = None,
        masked_cells: Optional[Tensor] = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> SohoOutput:
        """Encode text, images or pairs.

        ``image_index`` (N,) pairs text row n with image row ``image_index[n]``, so several
        captions share one backbone pass; by default text n goes with image n. A
        precomputed ``grid`` (from :meth:`embed_image`) replaces ``pixel_values``.
        """
        if grid is None and pixel_values is not None:
            grid = self.embed_image(pixel_values, pixel_mask)
        text = text_mask = image = image_mask = None
        if input_ids is not None:
            text = self.text_embeddings(input_ids, token_type_ids)
            text_mask = (attention_mask.bool() if attention_mask is not None
                         else torch.ones_like(input_ids, dtype=torch.bool))
        if grid is not None:
            image, image_mask = self.visual_tokens(grid, masked_cells)
            if image_index is not None:
                image, image_mask = image[image_index], image_mask[image_index]
        if text is not None and image is not None and text.shape[0] != image.shape[0]:
            raise ValueError(f"{text.shape[0]} texts but {image.shape[0]} images; pass image_index to pair them")
        encoded: EncoderOutput = self.encoder(text, text_mask, image, image_mask,
                                              output_attentions=output_attentions,
                                              output_hidden_states=output_hidden_states)
        pooled = self.pooler(encoded.text_states[:, 0]) if encoded.text_states is not None else None
        return SohoOutput(
            text_states=encoded.text_states,
            image_states=encoded.image_states,
            image_mask=image_mask,
            pooled=pooled,
            grid=grid,
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
        )


@dataclass
class PretrainingOutput:
    loss: Tensor
    losses: Dict[str, Tensor]
    """Each unweighted loss (mlm, itm, mvm, itc)."""
    metrics: Dict[str, Tensor]
    """Detached accuracies and dictionary usage, for logging."""
    labels: Dict[str, Tensor] = field(default_factory=dict)
    """The labels each accuracy was measured on (itm: matched or not, mlm: masked tokens,
    mvm: dictionary entries of masked cells), for chance levels and analysis. Contrastive ITM has
    no class labels (the positive is always candidate 0); its chance level is ``metrics["chance_itm_acc"]``."""
    mvm_visible: Optional[Tensor] = None
    """(masked cells, K) bool: the entries of the unmasked cells of each masked cell's image,
    which SOHO's masking rules out as answers."""


def masked_mean(states: Tensor, mask: Tensor) -> Tensor:
    weights = mask.to(states.dtype)[..., None]
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class SohoForPretraining(SohoPreTrainedModel):
    """SohoModel with the MLM, ITM, MVM and (optional) ITC heads, and the pre-training forward.

    ITM is a 2-way classifier (``itm_head``) or, with ``itm.loss: contrastive``, a scalar score
    (``itm_score_head``); :meth:`match_scores` gives the score to rank pairs by with either.
    """

    def __init__(self, config: SohoConfig):
        super().__init__()
        self.config = config
        encoder = config.encoder
        self.soho = SohoModel(config)
        self.mlm_head = MLMHead(encoder.hidden_size, encoder.vocab_size, encoder.hidden_act, encoder.layer_norm_eps)
        if config.itm.loss == "contrastive":
            self.itm_score_head = ScoreHead(encoder.hidden_size)
            heads = [self.mlm_head, self.itm_score_head]
        else:
            self.itm_head = ClassifierHead(encoder.hidden_size, 2)
            heads = [self.mlm_head, self.itm_head]
        if config.use_visual_dictionary:
            self.mvm_head = MVMHead(encoder.hidden_size, config.visual_dictionary.size, config.mvm.score,
                                    config.mvm.temperature, encoder.hidden_act, encoder.layer_norm_eps)
            heads.append(self.mvm_head)
        if config.itc.enabled:
            self.itc_head = ContrastiveProjection(encoder.hidden_size, config.itc.embed_dim, config.itc.temperature)
            heads.append(self.itc_head)
        for head in heads:
            head.apply(self.init_weights)
        if config.itc.enabled:
            self.itc_head.log_temperature.data.fill_(torch.tensor(config.itc.temperature).log().item())
        if encoder.pretrained_path:
            self.load_bert(encoder.pretrained_path)

    # Unimodal embeddings for contrastive learning and dual-encoder retrieval.
    def _require_itc(self) -> ContrastiveProjection:
        if not self.config.itc.enabled:
            raise RuntimeError("this model was built without ITC (itc.enabled: false), so it has no "
                               "image or text embeddings; use score() for image-text matching")
        return self.itc_head

    def text_embeds(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                    token_type_ids: Optional[Tensor] = None) -> Tensor:
        out = self.soho(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return self._require_itc().embed_text(out.text_states[:, 0])

    def image_embeds(self, grid: VisualGrid) -> Tensor:
        tokens, mask = self.soho.visual_tokens(grid)
        states = self.soho.encoder(image=tokens, image_mask=mask).image_states
        return self._require_itc().embed_image(masked_mean(states, mask))

    @torch.no_grad()
    def encode_texts(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                     token_type_ids: Optional[Tensor] = None) -> Tensor:
        """L2-normalised text embeddings (N, E) for dual-encoder retrieval (needs ITC)."""
        return self.text_embeds(input_ids, attention_mask, token_type_ids)

    @torch.no_grad()
    def encode_images(self, pixel_values: Tensor, pixel_mask: Optional[Tensor] = None) -> Tensor:
        """L2-normalised image embeddings (B, E) for dual-encoder retrieval (needs ITC)."""
        return self.image_embeds(self.soho.embed_image(pixel_values, pixel_mask))

    def match_scores(self, pooled: Tensor) -> Tensor:
        """(N,) float scores that rank pairs by how well they match, from their pooled [CLS]: the ITM logit
        margin (matched minus mismatched) of the classifier, or the contrastive score."""
        if self.config.itm.loss == "contrastive":
            return self.itm_score_head(pooled).float()
        logits = self.itm_head(pooled).float()
        return logits[:, 1] - logits[:, 0]

    @torch.no_grad()
    def score(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
              pixel_mask: Optional[Tensor] = None, token_type_ids: Optional[Tensor] = None,
              image_index: Optional[Tensor] = None) -> Tensor:
        """How well text n matches image ``image_index[n]`` (default: image n), (N,).

        Classification ITM: the probability of "matched". Contrastive ITM: the raw score, which only
        compares images for one caption (a softmax over a caption's candidate images gives probabilities).
        """
        out = self.soho(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                        pixel_values=pixel_values, pixel_mask=pixel_mask, image_index=image_index)
        if self.config.itm.loss == "contrastive":
            return self.match_scores(out.pooled)
        return self.itm_head(out.pooled).softmax(-1)[:, 1]

    def _itm_partners(self, image_index: Tensor, num_images: int,
                      text_to_image_logits: Optional[Tensor]) -> Tensor:
        """For each text, the image it is shown with: its own, or with ``itm.negative_probability`` another."""
        num_texts = image_index.shape[0]
        device = image_index.device
        if num_images < 2 or self.config.itm.negative_probability == 0:
            return image_index
        swap = torch.rand(num_texts, device=device) < self.config.itm.negative_probability
        if text_to_image_logits is not None:
            # Hard negatives: other images, drawn in proportion to their ITC similarity.
            weights = text_to_image_logits.detach().float().softmax(dim=1)
            weights[torch.arange(num_texts, device=device), image_index] = 0
            others = torch.multinomial(weights + 1e-12, 1).squeeze(1)
        else:
            offsets = torch.randint(1, num_images, (num_texts,), device=device)
            others = (image_index + offsets) % num_images
        return torch.where(swap, others, image_index)

    def _contrastive_negatives(self, image_index: Tensor, num_images: int,
                               text_to_image_logits: Optional[Tensor]) -> Tensor:
        """(N, K) negative images of each text: K = min(``itm.contrastive_negatives``, images - 1) other
        images of the batch, without replacement, drawn uniformly or in proportion to ITC similarity."""
        num_texts = image_index.shape[0]
        count = min(self.config.itm.contrastive_negatives, num_images - 1)
        if count < 1:
            return image_index.new_zeros(num_texts, 0)
        if text_to_image_logits is not None:
            weights = text_to_image_logits.detach().float().softmax(dim=1)
        else:
            weights = torch.ones(num_texts, num_images, device=image_index.device)
        # The floor keeps every other image drawable when the softmax underflows; the own image never is.
        weights = weights.clamp(min=1e-12)
        weights[torch.arange(num_texts, device=image_index.device), image_index] = 0
        return torch.multinomial(weights, count, replacement=False)

    def _contrastive_itm(self, positive_pooled: Tensor, negatives: Tensor, image_index: Tensor, image_ids: Tensor,
                         grid: VisualGrid, masked_cells: Optional[Tensor], text_ids: Tensor, attention_mask: Tensor,
                         token_type_ids: Optional[Tensor]) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Loss and metrics of contrastive ITM: each text scored with its own image (column 0, the pass the
        other objectives share) and with each negative, one more fused pass per negative."""
        num_texts, count = negatives.shape
        scores = self.itm_score_head(positive_pooled)[:, None]
        if count:
            rows = torch.arange(num_texts, device=negatives.device).repeat_interleave(count)
            negative_out = self.soho(input_ids=text_ids[rows], attention_mask=attention_mask[rows],
                                     token_type_ids=token_type_ids[rows] if token_type_ids is not None else None,
                                     grid=grid, image_index=negatives.flatten(), masked_cells=masked_cells)
            scores = torch.cat([scores, self.itm_score_head(negative_out.pooled).view(num_texts, count)], dim=1)
        candidates = torch.cat([image_index[:, None], negatives], dim=1)
        # Another copy of the text's own image (same image id) is no negative.
        valid = image_ids[candidates] != image_ids[image_index][:, None]
        valid[:, 0] = True
        metrics = {"itm_acc": ranked_first(scores.detach(), valid), "chance_itm_acc": ranked_first_chance(valid)}
        return contrastive_itm_loss(scores, valid), metrics

    def forward(
        self,
        pixel_values: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        pixel_mask: Optional[Tensor] = None,
        token_type_ids: Optional[Tensor] = None,
        mlm_input_ids: Optional[Tensor] = None,
        mlm_labels: Optional[Tensor] = None,
        image_index: Optional[Tensor] = None,
        image_ids: Optional[Tensor] = None,
    ) -> PretrainingOutput:
        """One pre-training step's losses.

        Images are encoded once; text n belongs to image ``image_index[n]``. A single
        fused pass per pair serves all objectives, as in SOHO: ITM on every pair
        (half of them mismatched), MLM and MVM only on matched pairs, where the other
        modality can help. ``mlm_input_ids``/``mlm_labels`` come from the collate
        function; ``input_ids`` are the clean texts used by ITC. ``image_ids`` (B,)
        identify images globally, so duplicates are not counted as negatives.
        """
        config = self.config
        num_images = pixel_values.shape[0]
        device = pixel_values.device
        if image_index is None:
            image_index = torch.arange(input_ids.shape[0], device=device)
        if image_ids is None:
            image_ids = torch.arange(num_images, device=device) + rank() * num_images
        grid = self.soho.embed_image(pixel_values, pixel_mask)
        losses: Dict[str, Tensor] = {}
        metrics: Dict[str, Tensor] = {f"vd_{k}": v for k, v in grid.usage.items()}

        t2i_logits = None
        if config.itc.enabled:
            text_embeds = self.text_embeds(input_ids, attention_mask, token_type_ids)
            image_embeds = self.image_embeds(grid)
            losses["itc"], global_logits = itc_loss(image_embeds, text_embeds, self.itc_head.temperature,
                                                    image_ids, image_ids[image_index])
            local = slice(rank() * num_images, (rank() + 1) * num_images)
            t2i_logits = global_logits[:, local]
            # In-batch text-to-image R@1 over this rank's images.
            metrics["itc_acc"] = (image_ids[t2i_logits.argmax(1)] == image_ids[image_index]).float().mean()
            metrics["itc_temperature"] = self.itc_head.temperature.detach()

        hard_logits = t2i_logits if config.itm.hard_negatives else None
        contrastive = config.itm.loss == "contrastive"
        # Contrastive ITM shows every text its own image in the shared pass and the negatives in another.
        partners = image_index if contrastive else self._itm_partners(image_index, num_images, hard_logits)
        matched = image_ids[partners] == image_ids[image_index]

        masked_cells = mvm_visible = None
        mvm_on = self.soho.visual_dictionary is not None and config.loss_weights.mvm > 0
        if mvm_on:
            masked_cells = sample_mvm_mask(grid.indices, grid.mask, config.mvm.probability)

        text_ids = mlm_input_ids if mlm_input_ids is not None else input_ids
        out = self.soho(input_ids=text_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                        grid=grid, image_index=partners, masked_cells=masked_cells)

        if contrastive:
            negatives = self._contrastive_negatives(image_index, num_images, hard_logits)
            losses["itm"], itm_metrics = self._contrastive_itm(out.pooled, negatives, image_index, image_ids, grid,
                                                               masked_cells, text_ids, attention_mask,
                                                               token_type_ids)
            metrics.update(itm_metrics)
            labels_of = {}
        else:
            itm_logits = self.itm_head(out.pooled)
            itm_labels = matched.long()
            losses["itm"] = itm_loss(itm_logits, itm_labels)
            metrics["itm_acc"] = accuracy(itm_logits.detach(), itm_labels)
            labels_of = {"itm": itm_labels}

        if mlm_labels is not None and config.loss_weights.mlm > 0:
            labels = mlm_labels.masked_fill(~matched[:, None], IGNORE_INDEX)
            picked = labels != IGNORE_INDEX
            logits = self.mlm_head(out.text_states[picked], self.soho.text_embeddings.word_embeddings.weight)
            losses["mlm"] = mlm_loss(logits, labels[picked])
            metrics["mlm_acc"] = accuracy(logits.detach(), labels[picked])
            labels_of["mlm"] = labels[picked]

        if mvm_on:
            cells = masked_cells.flatten(1)[partners] & matched[:, None]
            targets = grid.indices.flatten(1)[partners][cells]
            logits = self.mvm_head(out.image_states[cells], self.soho.visual_dictionary.embedding)
            pairs = cells.nonzero(as_tuple=True)[0]
            visible = visible_entries(grid.indices, grid.mask, masked_cells, logits.shape[1])[partners[pairs]]
            if config.mvm.exclude_visible:
                logits = logits.masked_fill(visible, torch.finfo(logits.dtype).min)
            losses["mvm"] = mvm_loss(logits, targets)
            metrics["mvm_acc"] = accuracy(logits.detach(), targets)
            labels_of["mvm"] = targets
            mvm_visible = visible
            metrics["mvm_masked_cells"] = cells.sum().float()

        weights = config.loss_weights
        total = sum(getattr(weights, name) * value for name, value in losses.items())
        return PretrainingOutput(loss=total, losses=losses, metrics={k: v.detach() for k, v in metrics.items()},
                                 labels={k: v.detach() for k, v in labels_of.items()}, mvm_visible=mvm_visible)
