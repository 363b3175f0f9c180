"""Retrieval evaluation cost of each protocol of soho/eval/retrieval.py, with its recall, on one gallery.

``itm_all`` there is "cached": the CNN, the dictionary and the embeddings run once per image and
once per caption, only the Transformer once per pair. ``itm_all_naive`` is the same ITM score
computed without that cache, the full model once per pair, as scoring a pair with
``SohoForPretraining.score`` would. Its scores equal itm_all's (``max_score_difference`` checks
it), so it is timed on a sample of the pairs and its time extrapolated to the whole gallery.
``cached_speedup_per_pair`` compares the two per pair, leaving out itm_all's one-off encoding: the
speed-up a large gallery approaches.
"""
from __future__ import annotations

import time
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from soho.benchmark.timing import synchronize
from soho.eval.retrieval import PROTOCOLS, autocast, encode_gallery, fused_match_scores, retrieve
from soho.models.soho import SohoForPretraining

BENCHMARK_PROTOCOLS = ("itm_all_naive",) + PROTOCOLS


ImageBatches = List[Tuple[Tensor, Tensor]]
TextBatches = List[Dict[str, Tensor]]


def random_gallery(vocab_size: int, images: int, captions_per_image: int, image_size: int, text_length: int,
                   batch_size: int, seed: int = 0) -> Tuple[ImageBatches, TextBatches, Tensor]:
    """Random pixels and token ids in the layout :func:`soho.eval.retrieval.encode_gallery` takes:
    (image batches, text batches, the image of each text)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(images, 3, image_size, image_size, generator=generator)
    pixel_mask = torch.ones(images, image_size, image_size, dtype=torch.long)
    input_ids = torch.randint(5, vocab_size, (images * captions_per_image, text_length), generator=generator)
    image_batches = list(zip(pixels.split(batch_size), pixel_mask.split(batch_size)))
    text_batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in input_ids.split(batch_size)]
    return image_batches, text_batches, torch.arange(images).repeat_interleave(captions_per_image)


def _padded_cat(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate along dim 0, zero-padding the trailing dims to the largest (padding is masked out)."""
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for tensor in tensors:
        pad = []
        for d in reversed(range(1, tensor.dim())):
            pad += [0, shape[d - 1] - tensor.shape[d]]
        padded.append(F.pad(tensor, pad))
    return torch.cat(padded)


@torch.no_grad()
def naive_itm_scores(model: SohoForPretraining, images: Tuple[Tensor, Tensor], texts: Dict[str, Tensor],
                     text_rows: Tensor, image_rows: Tensor, batch_size: int, mixed_precision: str = "no") -> Tensor:
    """Match scores (as :func:`soho.eval.retrieval.itm_scores`) of the pairs (text_rows[i], image_rows[i]),
    each through the whole model."""
    pixel_values, pixel_mask = images
    scores = []
    for start in range(0, len(text_rows), batch_size):
        t, i = text_rows[start:start + batch_size], image_rows[start:start + batch_size]
        with autocast(pixel_values.device, mixed_precision):
            out = model.soho(input_ids=texts["input_ids"][t], attention_mask=texts["attention_mask"][t],
                             token_type_ids=texts["token_type_ids"][t] if "token_type_ids" in texts else None,
                             pixel_values=pixel_values[i], pixel_mask=pixel_mask[i])
        scores.append(fused_match_scores(model, out.text_states))
    return torch.cat(scores)


def _recall_summary(metrics: Dict[str, float]) -> Dict[str, float]:
    return {"txt_r1": metrics["txt_r1"], "img_r1": metrics["img_r1"], "rsum": metrics["rsum"]}


@torch.no_grad()
def benchmark_retrieval(model: SohoForPretraining, image_batches: ImageBatches, text_batches: TextBatches,
                        text_image: Tensor,
                        protocols: Sequence[str] = BENCHMARK_PROTOCOLS, k: int = 16, fusion_batch_size: int = 512,
                        naive_pairs: int = 1024, seed: int = 0, mixed_precision: str = "no") -> Dict:
    """Seconds and R@1 of each protocol on the gallery; every protocol is charged the gallery encoding
    (images and texts once), which it would need on its own, except ``itm_all_naive``, which needs none."""
    unknown = sorted(set(protocols) - set(BENCHMARK_PROTOCOLS))
    if unknown:
        raise ValueError(f"unknown protocol(s) {unknown}; choose from {BENCHMARK_PROTOCOLS}")
    model.eval()
    device = next(model.parameters()).device
    synchronize(device)
    start = time.perf_counter()
    gallery = encode_gallery(model, image_batches, text_batches, text_image)
    synchronize(device)
    encode_seconds = time.perf_counter() - start
    num_texts, num_images = len(text_image), gallery.image_tokens.shape[0]
    result: Dict = {"images": num_images, "texts": num_texts, "device": str(device), "k": k,
                    "mixed_precision": mixed_precision, "fusion_batch_size": fusion_batch_size,
                    "encode_seconds": encode_seconds, "protocols": {}}
    cached_scores = None
    for protocol in (p for p in PROTOCOLS if p in protocols):
        if protocol != "itm_all" and gallery.image_embeds is None:
            result["protocols"][protocol] = {"skipped": "the model has no ITC head"}
            continue
        start = time.perf_counter()
        ranked = retrieve(model, gallery, protocol, k=k, batch_size=fusion_batch_size,
                          mixed_precision=mixed_precision)
        synchronize(device)
        score_seconds = time.perf_counter() - start
        result["protocols"][protocol] = {"seconds": encode_seconds + score_seconds, "score_seconds": score_seconds,
                                         "fusion_passes": ranked.cost["fusion_passes"],
                                         **_recall_summary(ranked.metrics)}
        if protocol == "itm_all":
            cached_scores = ranked.text_to_image
            result["protocols"][protocol]["ms_per_pair"] = 1000 * score_seconds / max(1, num_texts * num_images)
    if "itm_all_naive" in protocols:
        pairs = torch.randperm(num_texts * num_images, generator=torch.Generator().manual_seed(seed))[:naive_pairs]
        text_rows, image_rows = (pairs // num_images).to(device), (pairs % num_images).to(device)
        images = tuple(_padded_cat([batch[j] for batch in image_batches]).to(device) for j in (0, 1))
        keys = text_batches[0].keys()
        texts = {key: _padded_cat([batch[key] for batch in text_batches]).to(device) for key in keys}
        synchronize(device)
        start = time.perf_counter()
        scores = naive_itm_scores(model, images, texts, text_rows, image_rows, fusion_batch_size, mixed_precision)
        synchronize(device)
        measured = time.perf_counter() - start
        naive = {"seconds": measured / len(pairs) * num_texts * num_images, "score_seconds": measured,
                 "fusion_passes": num_texts * num_images, "measured_pairs": len(pairs),
                 "ms_per_pair": 1000 * measured / len(pairs)}
        if cached_scores is not None:
            naive["max_score_difference"] = (scores - cached_scores[text_rows, image_rows]).abs().max().item()
            # Same scores, same ranking: the recall is itm_all's.
            naive.update(_recall_summary(result["protocols"]["itm_all"]))
        result["protocols"]["itm_all_naive"] = naive
    timed = {name: entry for name, entry in result["protocols"].items() if "seconds" in entry}
    if "itm_all" in timed and "itc_itm" in timed:
        result["itc_itm_speedup_over_itm_all"] = timed["itm_all"]["seconds"] / timed["itc_itm"]["seconds"]
        result["itc_itm_r1_drop"] = {key: timed["itm_all"][key] - timed["itc_itm"][key] for key in ("txt_r1", "img_r1")}
    if "itm_all" in timed and "itm_all_naive" in timed:
        result["cached_speedup_over_naive"] = timed["itm_all_naive"]["seconds"] / timed["itm_all"]["seconds"]
        # What the speed-up tends to as the gallery grows and the one-off encoding stops counting.
        result["cached_speedup_per_pair"] = timed["itm_all_naive"]["ms_per_pair"] / timed["itm_all"]["ms_per_pair"]
    return result
