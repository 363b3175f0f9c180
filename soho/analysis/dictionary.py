"""Health of a trained visual dictionary, and how predictable its entries are for MVM.

Masked visual modelling can only be learned if a cell's entry is a stable function of
its content and if the head can tell entries apart. :func:`dictionary_report` measures
both on held-out images: how far apart entries are (by cosine, which the release's MVM
head scores with, and by distance, which the lookup uses), how often a cell's entry
changes between batch-statistics and running-statistics BatchNorm (train vs eval mode)
or between two checkpoints, and the held-out MVM accuracy of the model with and without
ruling out the entries of unmasked cells, against two baselines.
"""
from __future__ import annotations

import copy
from collections import Counter
from typing import Dict, Iterable, Optional

import torch
from torch import Tensor

from soho.models.masking import sample_mvm_mask, visible_entries
from soho.models.soho import SohoForPretraining


def _quantiles(values: Tensor, name: str) -> Dict[str, float]:
    points = torch.tensor([0.1, 0.5, 0.9])
    return {f"{name}_p{round(100 * p)}": v for p, v in zip(points.tolist(), values.float().quantile(points).tolist())}


def entry_geometry(embedding: Tensor) -> Dict[str, float]:
    """Norms, the cosine of each entry to its most similar other entry, and nearest-entry distances."""
    entries = embedding.float()
    unit = torch.nn.functional.normalize(entries, dim=-1)
    cosine = (unit @ unit.t()).fill_diagonal_(-2.0)
    distance = torch.cdist(entries, entries).fill_diagonal_(float("inf"))
    return {**_quantiles(entries.norm(dim=1), "norm"),
            **_quantiles(cosine.max(1).values, "neighbour_cosine"),
            **_quantiles(distance.min(1).values, "neighbour_distance")}


@torch.no_grad()
def dictionary_report(model: SohoForPretraining, batches: Iterable[Dict[str, Tensor]],
                      reference: Optional[SohoForPretraining] = None, seed: int = 0) -> Dict[str, float]:
    """Measure the dictionary of ``model`` on image-caption ``batches`` (pre-training batch dicts).

    ``reference``: another checkpoint of the same run (e.g. an earlier step), to measure how
    many cells keep their entry. MVM is measured on every (matched) caption-image pair with
    every image masked (SOHO's rule: one random cell's entry, all its cells), fixed by ``seed``.
    """
    eval_model = copy.deepcopy(model).eval()
    train_model = copy.deepcopy(model).train()  # batch statistics; its dictionary is restored after each batch
    dictionary_state = copy.deepcopy(train_model.soho.visual_dictionary.state_dict())
    size = model.soho.visual_dictionary.size
    generator = torch.Generator().manual_seed(seed)
    counts: Counter = Counter()
    usage = torch.zeros(size, dtype=torch.float64)
    target_histogram = torch.zeros(size, dtype=torch.float64)
    records = []
    for batch in batches:
        pixels, pixel_mask = batch["pixel_values"], batch["pixel_mask"]
        grid = eval_model.soho.embed_image(pixels, pixel_mask)
        valid = grid.mask.flatten(1)
        indices = grid.indices.flatten(1)
        counts["cells"] += int(valid.sum())
        train_indices = train_model.soho.embed_image(pixels, pixel_mask).indices.flatten(1)
        train_model.soho.visual_dictionary.load_state_dict(dictionary_state)
        counts["train_eval_same"] += int((train_indices == indices)[valid].sum())
        if reference is not None:
            reference_indices = reference.eval().soho.embed_image(pixels, pixel_mask).indices.flatten(1)
            counts["reference_same"] += int((reference_indices == indices)[valid].sum())
        usage += torch.bincount(indices[valid], minlength=size).double()

        seeds = torch.randint(0, 1 << 62, (pixels.shape[0],), generator=generator)
        masked = sample_mvm_mask(grid.indices, grid.mask, 1.0, seeds)
        image_index = batch["image_index"]
        out = eval_model.soho(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], grid=grid,
                              image_index=image_index, masked_cells=masked)
        cells = masked.flatten(1)[image_index]
        mvm_head = eval_model.objective("mvm").head
        logits = mvm_head(out.image_states[cells], eval_model.soho.visual_dictionary.embedding).float()
        pairs = cells.nonzero(as_tuple=True)[0]
        visible = visible_entries(grid.indices, grid.mask, masked, size)[image_index[pairs]]
        targets = indices[image_index][cells]
        target_histogram += torch.bincount(targets, minlength=size).double()
        records.append((targets, logits.argmax(1), logits.masked_fill(visible, float("-inf")).argmax(1), visible))

    targets = torch.cat([r[0] for r in records])
    visible = torch.cat([r[3] for r in records])
    probabilities = usage / usage.sum()
    # Baselines that ignore the image content: the commonest target entry, and the commonest
    # target entry among those not visible in the cell's image (needs only the unmasked entries).
    prior = target_histogram / target_histogram.sum()
    constrained = prior.expand(len(targets), -1).masked_fill(visible, -1.0).argmax(1)
    report = {
        "entries": size,
        "cells": counts["cells"],
        "perplexity": float(torch.exp(-(probabilities[probabilities > 0] * probabilities[probabilities > 0].log())
                                      .sum())),
        "used_fraction": float((usage > 0).double().mean()),
        "train_vs_eval_batchnorm_agreement": counts["train_eval_same"] / counts["cells"],
        "masked_cells": len(targets),
        "mvm_accuracy": float((torch.cat([r[1] for r in records]) == targets).double().mean()),
        "mvm_accuracy_excluding_visible": float((torch.cat([r[2] for r in records]) == targets).double().mean()),
        "chance_commonest_entry": float(prior.max()),
        "chance_commonest_hidden_entry": float((constrained == targets).double().mean()),
        **entry_geometry(model.soho.visual_dictionary.embedding),
    }
    if reference is not None:
        report["reference_agreement"] = counts["reference_same"] / counts["cells"]
    return report
