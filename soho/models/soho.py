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
from soho.models.objectives import Objective, PretrainingStep, build_objectives
from soho.models.pretrained import SohoPreTrainedModel
from soho.models.visual_dictionary import VisualDictionary
from soho.models.visual_tokens import VisualEmbeddings, grid_mask


def check_inputs(pixel_values: Optional[Tensor] = None, **indices: Tuple[Optional[Tensor], int]) -> None:
    """Name a bad input before it fails deep inside the model; one device synchronisation for every check.

    ``pixel_values`` must be finite: a NaN image would reach the visual dictionary and the BatchNorm
    statistics. Each of ``indices`` (name -> (tensor or None, size)) must lie in [0, size): out of range, an
    embedding lookup or an index fails with a bare IndexError, on a GPU with a device assert that ends the process.
    """
    named = [(name, tensor, size) for name, (tensor, size) in indices.items() if tensor is not None and tensor.numel()]
    checks = [torch.isfinite(pixel_values).all()] if pixel_values is not None else []
    checks += [((tensor >= 0) & (tensor < size)).all() for _, tensor, size in named]
    if not checks:
        return
    passed = torch.stack(checks).tolist()
    if pixel_values is not None and not passed.pop(0):
        raise ValueError("pixel_values holds NaN or infinite values")
    for (name, tensor, size), ok in zip(named, passed):
        if not ok:
            raise ValueError(f"{name} must be in [0, {size}), got values from {int(tensor.min())} to "
                             f"{int(tensor.max())}")


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
        gated = config.use_visual_dictionary and config.visual_dictionary.tokens == "gated"
        # Per cell, a softmax over (entry, feature) computed from both.
        self.token_gate = torch.nn.Linear(2 * hidden, 2) if gated else None
        self.visual_embeddings = VisualEmbeddings(hidden, config.encoder.layer_norm_eps,
                                                  config.encoder.hidden_dropout_prob)
        self.text_embeddings = TextEmbeddings(config.encoder)
        self.encoder = Encoder(config.encoder)
        self.pooler = Pooler(hidden)
        for module in (self.visual_embeddings, self.text_embeddings, self.encoder, self.pooler, self.token_gate):
            if module is not None:
                module.apply(self.init_weights)
        torch.nn.init.normal_(self.visual_embeddings.mask_embedding, std=config.encoder.initializer_range)
        if config.encoder.pretrained_path and type(self) is SohoModel:
            self.load_bert(config.encoder.pretrained_path)

    def embed_image(self, pixel_values: Tensor, pixel_mask: Optional[Tensor] = None) -> VisualGrid:
        """Backbone and dictionary: (B, 3, H, W) pixels -> a :class:`VisualGrid` whose ``features`` are what the
        Transformer reads (``visual_dictionary.tokens``).

        In training mode the dictionary is updated (EMA) with the valid cells.
        """
        check_inputs(pixel_values)
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
        entries = quantised.quantized.view_as(grid)
        read = self.config.visual_dictionary.tokens
        if read == "entries":
            tokens = entries
        elif read == "features":
            tokens = grid
        else:
            gate = self.token_gate(torch.cat([entries, grid], dim=-1)).softmax(-1)
            tokens = gate[..., :1] * entries + gate[..., 1:] * grid
        return VisualGrid(
            features=tokens,
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
        encoder = self.config.encoder
        check_inputs(input_ids=(input_ids, encoder.vocab_size),
                     token_type_ids=(token_type_ids, encoder.type_vocab_size),
                     image_index=(image_index, grid.features.shape[0] if grid is not None else 0))
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
    """The weighted sum of the objectives' losses."""
    losses: Dict[str, Tensor]
    """Each objective's unweighted loss, by name."""
    metrics: Dict[str, Tensor]
    """Detached accuracies and dictionary usage, for logging."""
    labels: Dict[str, Tensor] = field(default_factory=dict)
    """The labels each accuracy was measured on (itm: matched or not, mlm: masked tokens,
    mvm: dictionary entries of masked cells), for chance levels and analysis. Contrastive ITM has
    no class labels (the positive is always candidate 0); its chance level is ``metrics["chance_itm_acc"]``."""
    mvm_visible: Optional[Tensor] = None
    """(masked cells, K) bool: the entries of the unmasked cells of each masked cell's image,
    which SOHO's masking rules out as answers."""


class SohoForPretraining(SohoPreTrainedModel):
    """SohoModel with the pre-training objectives (:mod:`soho.models.objectives`): MLM, ITM, MVM (with the
    dictionary) and ITC (with ``itc.enabled``), each a module in ``objectives`` that owns its head."""

    def __init__(self, config: SohoConfig):
        super().__init__()
        self.config = config
        self.soho = SohoModel(config)
        self.objectives = build_objectives(config)
        for objective in self.objectives.values():
            objective.initialise(self.init_weights)
            if not objective.active:
                # No loss, no gradient: and under DDP every trainable parameter must get one in every step.
                for parameter in objective.own_parameters(self.soho):
                    parameter.requires_grad_(False)
        if config.encoder.pretrained_path:
            self.load_bert(config.encoder.pretrained_path)

    def objective(self, name: str) -> Objective:
        if name not in self.objectives:
            hint = {"itc": " (itc.enabled: false): it has no image or text embeddings; use score() for "
                           "image-text matching",
                    "mvm": " (use_visual_dictionary: false)"}.get(name, "")
            raise RuntimeError(f"this model was built without the {name} objective{hint}")
        return self.objectives[name]

    # Unimodal embeddings for contrastive learning and dual-encoder retrieval.
    def text_embeds(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                    token_type_ids: Optional[Tensor] = None) -> Tensor:
        return self.objective("itc").text_embeds(self.soho, input_ids, attention_mask, token_type_ids)

    def image_embeds(self, grid: VisualGrid) -> Tensor:
        return self.objective("itc").image_embeds(self.soho, grid)

    @torch.no_grad()
    def encode_texts(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                     token_type_ids: Optional[Tensor] = None) -> Tensor:
        """L2-normalised text embeddings (N, E) for dual-encoder retrieval (needs ITC)."""
        encoder = self.config.encoder
        check_inputs(input_ids=(input_ids, encoder.vocab_size),
                     token_type_ids=(token_type_ids, encoder.type_vocab_size))
        return self.text_embeds(input_ids, attention_mask, token_type_ids)

    @torch.no_grad()
    def encode_images(self, pixel_values: Tensor, pixel_mask: Optional[Tensor] = None) -> Tensor:
        """L2-normalised image embeddings (B, E) for dual-encoder retrieval (needs ITC)."""
        return self.image_embeds(self.soho.embed_image(pixel_values, pixel_mask))

    def match_scores(self, pooled: Tensor) -> Tensor:
        """(N,) float scores that rank pairs by how well they match, from their pooled [CLS]: the ITM logit
        margin (matched minus mismatched) of the classifier, or the contrastive score."""
        return self.objective("itm").match_scores(pooled)

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
        return self.objective("itm").match_probability(out.pooled)

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
        image_seeds: Optional[Tensor] = None,
        itm_image_index: Optional[Tensor] = None,
        itm_labels: Optional[Tensor] = None,
        caption_truth: Optional[Tensor] = None,
        caption_near_miss: Optional[Tensor] = None,
    ) -> PretrainingOutput:
        """One pre-training step's losses.

        Images are encoded once; text n belongs to image ``image_index[n]``. A single fused pass per
        pair serves all objectives, as in SOHO: ITM on every pair (some shown with another image),
        MLM and MVM only on matched pairs, where the other modality can help. ``mlm_input_ids`` /
        ``mlm_labels`` come from the collate function; ``input_ids`` are the clean texts used by ITC.
        ``image_ids`` (B,) identify images globally, so duplicates are not counted as negatives;
        ``image_seeds`` (B,) key each image's random draws (default: drawn now). ``itm_image_index`` /
        ``itm_labels`` (N,) let the data choose each caption's ITM image and say whether the caption is
        true of it (default: ITM draws other images and calls a pair matched when the ids agree).
        ``caption_truth`` (N, B) says which captions are true of which images, where the data knows, and
        ``caption_near_miss`` (N, B) which images a caption misses by one attribute.
        """
        num_images = pixel_values.shape[0]
        device = pixel_values.device
        encoder = self.config.encoder
        check_inputs(input_ids=(input_ids, encoder.vocab_size), mlm_input_ids=(mlm_input_ids, encoder.vocab_size),
                     token_type_ids=(token_type_ids, encoder.type_vocab_size), image_index=(image_index, num_images),
                     itm_image_index=(itm_image_index, num_images))
        if image_index is None:
            image_index = torch.arange(input_ids.shape[0], device=device)
        if image_ids is None:
            image_ids = torch.arange(num_images, device=device) + rank() * num_images
        if image_seeds is None:
            image_seeds = torch.randint(0, 1 << 62, (num_images,), device=device)
        step = PretrainingStep(
            grid=self.soho.embed_image(pixel_values, pixel_mask), input_ids=input_ids,
            attention_mask=attention_mask, token_type_ids=token_type_ids, image_index=image_index,
            image_ids=image_ids, image_seeds=image_seeds, mlm_input_ids=mlm_input_ids, mlm_labels=mlm_labels,
            itm_image_index=itm_image_index, itm_labels=itm_labels, caption_truth=caption_truth,
            caption_near_miss=caption_near_miss)
        for objective in self.objectives.values():
            objective.prepare(self.soho, step)
        step.fused = self.soho(input_ids=step.text_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                               grid=step.grid, image_index=step.partners, masked_cells=step.masked_cells)

        outputs = {name: objective(self.soho, step) for name, objective in self.objectives.items()
                   if objective.active}
        outputs = {name: out for name, out in outputs.items() if out is not None}
        metrics = {f"vd_{k}": v for k, v in step.grid.usage.items()}
        for out in outputs.values():
            metrics.update(out.metrics)
        total = sum(self.objectives[name].weight * out.loss for name, out in outputs.items())
        mvm = outputs.get("mvm")
        return PretrainingOutput(
            loss=total, losses={name: out.loss for name, out in outputs.items()},
            metrics={k: v.detach() for k, v in metrics.items()},
            labels={name: out.labels.detach() for name, out in outputs.items() if out.labels is not None},
            mvm_visible=mvm.details["visible"] if mvm is not None else None)
