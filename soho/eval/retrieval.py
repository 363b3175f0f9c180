"""Image-text retrieval: Recall@K with several captions per image, and three scoring protocols.

- ``itm_all``: every (text, image) pair through the fusion encoder. The backbone, the
  dictionary and the visual tokens run once per image, the text embeddings once per
  caption; only the Transformer runs per pair.
- ``itc``: dual-encoder cosine similarity, ranked by a faiss inner-product index.
- ``itc_itm``: a faiss top-k shortlist per query, re-ranked by ITM (optionally plus the
  ITC similarity); everything outside the shortlist ranks last.

Scores are (queries x gallery) matrices in which ``-inf`` means "not ranked"; a tie with the
true item counts against it, so a model that scores everything alike gets no hits. With
``mixed_precision="bf16"`` (or ``"fp16"``) the fusion passes run under autocast (on a CPU with
AVX-512 BF16 about 2.5x faster); the gallery encoding, the ITC embeddings and the match-score head
stay float32, since half-precision embeddings of a weak model collapse into ties.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import broadcast
from torch import Tensor

from soho.models.soho import SohoForPretraining
from soho.train.signals import stop_requested

Protocol = Literal["itm_all", "itc", "itc_itm"]
PROTOCOLS: Tuple[str, ...] = ("itm_all", "itc", "itc_itm")
MixedPrecision = Literal["no", "bf16", "fp16"]
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, mixed_precision: MixedPrecision):
    """Accelerate's ``mixed_precision`` names as a context for inference (no gradient scaler needed)."""
    if mixed_precision == "no":
        return contextlib.nullcontext()
    if mixed_precision not in AUTOCAST_DTYPES:
        raise ValueError(f"mixed_precision must be one of no, bf16, fp16; got {mixed_precision!r}")
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[mixed_precision])


def text_to_image_ranks(scores: Tensor, text_image: Tensor) -> Tensor:
    """(N,) 0-based rank of each text's image among all images; ``inf`` when it was not ranked.

    ``scores`` is (N texts, M images). Another image scoring exactly as high ranks before the true one.
    """
    truth = scores.gather(1, text_image[:, None])
    ranks = (scores >= truth).sum(1).float() - 1
    return ranks.masked_fill(truth.squeeze(1) == float("-inf"), float("inf"))


def image_to_text_ranks(scores: Tensor, text_image: Tensor) -> Tensor:
    """(M,) 0-based rank of the best-ranked caption of each image among all texts; ``inf`` if none ranked.

    ``scores`` is (M images, N texts); image m's captions are the texts with ``text_image == m``. Another
    image's caption scoring exactly as high as the best of m's ranks before it.
    """
    positives = text_image[None, :] == torch.arange(scores.shape[0], device=scores.device)[:, None]
    best = scores.masked_fill(~positives, float("-inf")).max(1).values
    ranks = ((scores >= best[:, None]) & ~positives).sum(1).float()
    return ranks.masked_fill(best == float("-inf"), float("inf"))


def recall_metrics(text_to_image: Tensor, image_to_text: Tensor, text_image: Tensor,
                   ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
    """Text retrieval (image -> text) and image retrieval (text -> image) R@K, in percent, and their sum.

    ``text_to_image`` (N, M) scores every image for each text, ``image_to_text`` (M, N)
    every text for each image; ``text_image`` (N,) is the image of each text. An image's
    text retrieval hits at K when any of its captions is in the top K; image retrieval
    is counted per caption.
    """
    t2i = text_to_image_ranks(text_to_image, text_image)
    i2t = image_to_text_ranks(image_to_text, text_image)
    metrics: Dict[str, float] = {}
    for k in ks:
        metrics[f"txt_r{k}"] = 100.0 * (i2t < k).double().mean().item()
    for k in ks:
        metrics[f"img_r{k}"] = 100.0 * (t2i < k).double().mean().item()
    metrics["rsum"] = sum(metrics.values())
    return metrics


@dataclass
class EncodedGallery:
    """What every protocol reuses: visual tokens per image, embeddings per text, computed once."""

    image_tokens: Tensor
    """(M, Lv, D) visual tokens (dictionary-quantised when the model uses one)."""
    image_mask: Tensor
    """(M, Lv) valid cells."""
    text_embeddings: Tensor
    """(N, Lt, D) text embedding-layer outputs."""
    text_mask: Tensor
    """(N, Lt)."""
    text_image: Tensor
    """(N,) the image of each text."""
    image_embeds: Optional[Tensor] = None
    """(M, E) normalised ITC embeddings (models with ITC)."""
    text_embeds: Optional[Tensor] = None
    """(N, E)."""
    cost: Dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def encode_gallery(model: SohoForPretraining, pixel_values: Sequence[Tuple[Tensor, Tensor]],
                   texts: Sequence[Dict[str, Tensor]], text_image: Tensor) -> EncodedGallery:
    """Run the per-image and per-text parts once.

    ``pixel_values`` is a list of (pixel_values, pixel_mask) image batches, ``texts`` a
    list of tokenised text batches (``input_ids``, ``attention_mask``, optional
    ``token_type_ids``), in gallery order.
    """
    soho = model.soho
    device = next(model.parameters()).device
    start = time.perf_counter()
    tokens, masks, image_embeds = [], [], []
    for pixels, pixel_mask in pixel_values:
        grid = soho.embed_image(pixels.to(device), pixel_mask.to(device))
        image_tokens, image_mask = soho.visual_tokens(grid)
        tokens.append(image_tokens)
        masks.append(image_mask)
        if model.config.itc.enabled:
            image_embeds.append(model.image_embeds(grid))
    image_seconds = time.perf_counter() - start
    start = time.perf_counter()
    text_states, text_masks, text_embeds = [], [], []
    for batch in texts:
        input_ids = batch["input_ids"].to(device)
        attention_mask = batch["attention_mask"].to(device)
        token_type_ids = batch.get("token_type_ids")
        token_type_ids = token_type_ids.to(device) if token_type_ids is not None else None
        text_states.append(soho.text_embeddings(input_ids, token_type_ids))
        text_masks.append(attention_mask.bool())
        if model.config.itc.enabled:
            text_embeds.append(model.text_embeds(input_ids, attention_mask, token_type_ids))
    text_seconds = time.perf_counter() - start
    length = max(t.shape[1] for t in text_states)
    return EncodedGallery(
        image_tokens=torch.cat(tokens), image_mask=torch.cat(masks),
        # Text batches were padded to their own longest caption; padding is masked, so extending it is exact.
        text_embeddings=torch.cat([F.pad(t, (0, 0, 0, length - t.shape[1])) for t in text_states]),
        text_mask=torch.cat([F.pad(m, (0, length - m.shape[1]), value=False) for m in text_masks]),
        text_image=text_image.to(device),
        image_embeds=torch.cat(image_embeds) if image_embeds else None,
        text_embeds=torch.cat(text_embeds) if text_embeds else None,
        cost={"encode_images_seconds": image_seconds, "encode_texts_seconds": text_seconds},
    )


@torch.no_grad()
def itm_scores(model: SohoForPretraining, gallery: EncodedGallery, text_rows: Tensor, image_rows: Tensor,
               batch_size: int = 256, mixed_precision: MixedPrecision = "no", accelerator=None) -> Tensor:
    """Match scores of the pairs (text_rows[i], image_rows[i]): the ITM logit margin (matched minus
    mismatched) or, for contrastive ITM, the score head's output (:meth:`SohoForPretraining.match_scores`).

    With an ``accelerator`` of several processes, each scores a contiguous share of the pairs and every
    process returns all the scores.
    """
    world_size = accelerator.num_processes if accelerator is not None else 1
    if world_size == 1:
        return _pair_scores(model, gallery, text_rows, image_rows, batch_size, mixed_precision)
    share = -(-len(text_rows) // world_size)
    own = slice(accelerator.process_index * share, (accelerator.process_index + 1) * share)
    scores = _pair_scores(model, gallery, text_rows[own], image_rows[own], batch_size, mixed_precision)
    # Equal lengths for the gather; the shares arrive in rank order, so trimming the tail undoes the padding.
    return accelerator.gather(F.pad(scores, (0, share - len(scores))))[:len(text_rows)]


def fused_match_scores(model: SohoForPretraining, text_states: Tensor) -> Tensor:
    """Match scores from the fused text states: pooler and head in float32, since scores rounded to bf16
    would tie often."""
    return model.match_scores(model.soho.pooler(text_states[:, 0].float()))


def _pair_scores(model: SohoForPretraining, gallery: EncodedGallery, text_rows: Tensor, image_rows: Tensor,
                 batch_size: int, mixed_precision: MixedPrecision) -> Tensor:
    scores = []
    for start in range(0, len(text_rows), batch_size):
        if stop_requested():
            # The run is stopping and discards this evaluation; the pairs left rank last, so that the
            # gathers that follow keep their shapes on every rank.
            scores.append(gallery.text_embeddings.new_full((len(text_rows) - start,), float("-inf")))
            break
        t = text_rows[start:start + batch_size]
        i = image_rows[start:start + batch_size]
        with autocast(gallery.image_tokens.device, mixed_precision):
            out = model.soho.encoder(gallery.text_embeddings[t], gallery.text_mask[t],
                                     gallery.image_tokens[i], gallery.image_mask[i])
        scores.append(fused_match_scores(model, out.text_states))
    if not scores:
        return gallery.text_embeddings.new_zeros(0)
    return torch.cat(scores)


def _faiss_top_k(queries: Tensor, keys: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Exact inner-product top-k through faiss (GPU index when faiss-gpu and CUDA are present)."""
    import faiss

    keys_np = np.ascontiguousarray(keys.float().cpu().numpy())
    index = faiss.IndexFlatIP(keys_np.shape[1])
    if queries.is_cuda and hasattr(faiss, "StandardGpuResources"):
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), queries.device.index or 0, index)
    index.add(keys_np)
    similarities, indices = index.search(np.ascontiguousarray(queries.float().cpu().numpy()), min(k, len(keys_np)))
    return torch.from_numpy(similarities).to(queries.device), torch.from_numpy(indices).to(queries.device)


def _scatter(rows: int, columns: int, indices: Tensor, values: Tensor) -> Tensor:
    scores = torch.full((rows, columns), float("-inf"), device=values.device)
    return scores.scatter_(1, indices, values.float())


@dataclass
class RetrievalResult:
    metrics: Dict[str, float]
    protocol: str
    cost: Dict[str, float]
    text_to_image: Tensor
    image_to_text: Tensor


@torch.no_grad()
def retrieve(model: SohoForPretraining, gallery: EncodedGallery, protocol: Protocol, k: int = 16,
             itc_weight: float = 0.0, batch_size: int = 256, ks: Sequence[int] = (1, 5, 10),
             mixed_precision: MixedPrecision = "no", accelerator=None) -> RetrievalResult:
    """Score the gallery with one protocol and compute recall.

    ``k`` is the shortlist size of ``itc_itm`` (and the depth of the ``itc`` ranking,
    which is at least max(ks)). ``itc_weight`` adds that multiple of the ITC cosine to
    the ITM margin in ``itc_itm``. With an ``accelerator`` of several processes, every process
    holds the same gallery, the fusion passes are shared out (:func:`itm_scores`) and every
    process returns the whole result.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown retrieval protocol {protocol!r}; choose from {PROTOCOLS}")
    num_texts, num_images = gallery.text_embeddings.shape[0], gallery.image_tokens.shape[0]
    device = gallery.image_tokens.device
    cost = dict(gallery.cost)
    start = time.perf_counter()
    if protocol == "itm_all":
        texts = torch.arange(num_texts, device=device).repeat_interleave(num_images)
        images = torch.arange(num_images, device=device).repeat(num_texts)
        t2i = itm_scores(model, gallery, texts, images, batch_size, mixed_precision,
                         accelerator).view(num_texts, num_images)
        i2t = t2i.t()
        cost["fusion_passes"] = num_texts * num_images
    else:
        if gallery.image_embeds is None:
            raise ValueError(f"protocol {protocol!r} needs a model with ITC (itc.enabled: true)")
        depth = max(k, max(ks)) if protocol == "itc" else k
        t2i_sim, t2i_idx = _faiss_top_k(gallery.text_embeds, gallery.image_embeds, depth)
        i2t_sim, i2t_idx = _faiss_top_k(gallery.image_embeds, gallery.text_embeds, depth)
        if accelerator is not None and accelerator.num_processes > 1:
            # Rounding may differ between processes; the shared-out re-ranking needs one shortlist.
            t2i_sim, t2i_idx, i2t_sim, i2t_idx = broadcast([t2i_sim, t2i_idx, i2t_sim, i2t_idx], from_process=0)
        if protocol == "itc":
            cost["fusion_passes"] = 0
        else:
            texts = torch.arange(num_texts, device=device).repeat_interleave(t2i_idx.shape[1])
            t2i_itm = itm_scores(model, gallery, texts, t2i_idx.flatten(), batch_size, mixed_precision, accelerator)
            t2i_sim = t2i_itm.view_as(t2i_sim) + itc_weight * t2i_sim
            images = torch.arange(num_images, device=device).repeat_interleave(i2t_idx.shape[1])
            i2t_itm = itm_scores(model, gallery, i2t_idx.flatten(), images, batch_size, mixed_precision, accelerator)
            i2t_sim = i2t_itm.view_as(i2t_sim) + itc_weight * i2t_sim
            cost["fusion_passes"] = t2i_idx.numel() + i2t_idx.numel()
        t2i = _scatter(num_texts, num_images, t2i_idx, t2i_sim)
        i2t = _scatter(num_images, num_texts, i2t_idx, i2t_sim)
    cost["score_seconds"] = time.perf_counter() - start
    cost["total_seconds"] = cost["score_seconds"] + cost["encode_images_seconds"] + cost["encode_texts_seconds"]
    metrics = recall_metrics(t2i, i2t, gallery.text_image, ks)
    return RetrievalResult(metrics=metrics, protocol=protocol, cost=cost, text_to_image=t2i, image_to_text=i2t)


def chance_recall(num_images: int, captions_per_image: List[int], ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
    """Expected R@K of a random ranking, in percent (image retrieval K/M; text retrieval with c captions
    per image: 1 - C(N-c, K)/C(N, K))."""
    total = sum(captions_per_image)
    metrics = {}
    for k in ks:
        misses = [_miss_probability(total, c, k) for c in captions_per_image]
        metrics[f"txt_r{k}"] = 100.0 * (1.0 - float(np.mean(misses)))
    for k in ks:
        metrics[f"img_r{k}"] = 100.0 * min(k, num_images) / num_images
    metrics["rsum"] = sum(metrics.values())
    return metrics


def _miss_probability(candidates: int, own: int, drawn: int) -> float:
    """Probability that ``drawn`` items taken at random from ``candidates`` include none of ``own`` of them."""
    return float(np.prod([(candidates - own - j) / (candidates - j) for j in range(min(drawn, candidates))]))


def oracle_recall(truth: Tensor, text_image: Tensor, ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
    """Expected R@K, in percent, of an oracle that knows which caption is true of which image (``truth`` (N, M)):
    the ceiling of any model on a split whose captions fit several images.

    Image retrieval: a caption's true images rank first, in random order among themselves, so it hits at K
    with probability min(1, K / t) for a caption true of t images. Text retrieval: an image's true captions
    rank first, the more specific ones (true of fewer images) before the others, which is what the image's own
    captions most likely are; ties in random order.
    """
    truth = truth.bool().cpu()
    fits = truth.sum(1).clamp(min=1).double()  # images each caption is true of
    metrics: Dict[str, float] = {}
    text_image = text_image.cpu()
    for k in ks:
        hits = []
        for image in range(truth.shape[1]):
            true_captions = truth[:, image].nonzero(as_tuple=True)[0]
            own = text_image[true_captions] == image
            order = fits[true_captions]
            seen, hit_chance = 0, 0.0
            for specificity in order.unique(sorted=True).tolist():
                group = order == specificity
                slots = k - seen
                if slots <= 0:
                    break
                missed = _miss_probability(int(group.sum()), int((own & group).sum()), slots)
                hit_chance = 1.0 - (1.0 - hit_chance) * missed
                seen += int(group.sum())
            hits.append(hit_chance)
        metrics[f"txt_r{k}"] = 100.0 * float(np.mean(hits))
    for k in ks:
        metrics[f"img_r{k}"] = 100.0 * (k / fits).clamp(max=1.0).mean().item()
    metrics["rsum"] = sum(metrics.values())
    return metrics
