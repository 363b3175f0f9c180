"""VALUE probes of a checkpoint on image-caption pairs: modality importance, cross-modal heads, fusion degree,
and with --probes the probing classifiers (visual coreference, visual relation, linguistic).

    python tools/analyze.py --checkpoint runs/synthetic/pretrained --shards data/synthetic/retrieval_val \
        --out runs/analysis --batches 8

Each image is paired with its first caption. Writes ``results.json`` and PNG figures to --out
(layer x head heatmaps, the per-layer NMI curve, one caption token's attention over the image grid
per head, and the image patches of the most used visual dictionary entries) and prints a table.
See soho/analysis/value.py for the definitions.

--probes trains linear probes (soho/analysis/probes.py) on the checkpoint, on a randomly initialised model of
the same config and, for the cross-modal probes, with each image shown with another image's caption; it pairs
each image with its first --captions-per-image captions. The ground truth is the synthetic scene graphs of
--shards by default; on real data:

    python tools/analyze.py --checkpoint CKPT --shards data/coco/retrieval_val --out runs/analysis_f30k \
        --probes --grounding flickr30k_entities --probe-shards data/flickr30k_entities/entities_val
    python tools/analyze.py --checkpoint CKPT --shards data/coco/retrieval_val --out runs/analysis_vg \
        --probes --grounding visual_genome --probe-shards data/vg/relations
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from torch import Tensor

from soho.analysis import figures
from soho.analysis.capture import Capture, capture, image_caption_batches
from soho.analysis.probes import (
    CONDITIONS,
    GROUNDING_SOURCES,
    L2_VALUES,
    ProbeResult,
    read_probe_batches,
    run_probes,
)
from soho.analysis.value import ValueReport, ValueStatistics, attention_over_grid, modality_mass
from soho.models.soho import SohoModel
from soho.processing import SohoProcessor


def most_visual_token(captured: Capture, pair: int, layer: int, special_ids: List[int]) -> int:
    """The caption's word token (no special token) whose attention puts the most mass on the image."""
    rows = slice(pair, pair + 1)
    _, image = modality_mass(captured.attentions[layer][rows], captured.text_mask[rows], captured.image_mask[rows])
    mass = image[0, :, :captured.text_length].mean(0)
    words = captured.text_mask[pair] & ~torch.isin(captured.input_ids[pair], torch.tensor(special_ids))
    if not words.any():
        raise ValueError(f"caption {pair} has no word tokens to show")
    return int(mass.masked_fill(~words, -1.0).argmax())


def print_table(report: ValueReport) -> None:
    layers, heads = report.cls_text_share.shape
    header = "  layer " + "".join(f"  head {h:<2d}" for h in range(heads)) + "    mean"

    def rows(values, marks=None):
        for layer in range(layers):
            cells = "".join(f"  {float(values[layer, h]):6.3f}{'*' if marks is not None and marks[layer, h] else ' '}"
                            for h in range(heads))
            print(f"  {layer + 1:<5d} {cells}  {float(values[layer].mean()):6.3f}")

    print(f"\nmodality importance: share of [CLS] attention on text tokens ([CLS] itself set aside; "
          f"uniform attention: {report.uniform_text_share:.3f})")
    print(header)
    rows(report.cls_text_share)
    print(f"  mean over heads and layers: {float(report.cls_text_share.mean()):.3f}")
    print(f"\ncross-modal heads: fraction of image tokens with > {report.token_threshold} of their attention on text "
          f"(* cross-modal head: fraction > {report.head_threshold})")
    print(header)
    rows(report.cross_modal_fraction, report.cross_modal_heads)
    print(f"  cross-modal heads: {int(report.cross_modal_heads.sum())} of {report.cross_modal_heads.numel()} "
          f"({100 * report.cross_modal_head_fraction:.1f}%)")
    print(f"\nfusion degree: NMI between 2-means clusters and modality over {report.fusion_tokens} tokens "
          f"({100 * report.fusion_image_fraction:.0f}% image); lower = more fused")
    for layer, nmi in enumerate(report.fusion_nmi):
        print(f"  {'emb' if layer == 0 else layer:<5} {nmi:6.3f}")


def print_probe_table(results: Dict[str, Dict[str, Dict[str, ProbeResult]]], test_fraction: float) -> None:
    print(f"\nprobes: accuracy on held-out images ({100 * test_fraction:.0f}% of the images); chance: the training "
          f"set's majority class; attention: every head, both directions; layer k: the states (0: embeddings)")
    print(f"  {'probe':<16} {'features':<10} " + " ".join(f"{c.replace('_', '-'):>11}" for c in CONDITIONS)
          + "   chance  examples (train/test)")
    for probe, by_features in results["trained"].items():
        for features, result in by_features.items():
            cells = [results[c].get(probe, {}).get(features) for c in CONDITIONS]
            print(f"  {probe:<16} {features:<10} "
                  + " ".join(f"{'-' if r is None else f'{r.accuracy:.3f}':>11}" for r in cells)
                  + f"   {result.chance:6.3f}  {result.train_examples}/{result.test_examples}")


def token_figure(captured: Capture, batch: Dict[str, Tensor], processor: SohoProcessor, layer: int,
                 out: Path) -> Tuple[Path, Dict]:
    """The attention of the first caption's most visual word over its image, per head."""
    token = most_visual_token(captured, 0, layer, processor.tokenizer.all_special_ids)
    token_text = processor.tokenizer.convert_ids_to_tokens(int(captured.input_ids[0, token]))
    caption = processor.tokenizer.decode(captured.input_ids[0][captured.text_mask[0]], skip_special_tokens=True)
    config = processor.image_config
    image = figures.display_image(batch["pixel_values"][0], batch["pixel_mask"][0], config.mean, config.std)
    attention = attention_over_grid(captured.attentions[layer][0], token, captured.text_length, captured.grid_size)
    path = figures.grid_attention_figure(image, attention, captured.stride, out / "token_attention.png",
                                         f"layer {layer + 1}, '{token_text}' in \"{caption}\"")
    return path, {"pair": 0, "layer": layer + 1, "token": token_text, "caption": caption}


def dictionary_figures(batches: List[Dict[str, Tensor]], entries: Tensor, valid: Tensor, stride: int,
                       processor: SohoProcessor, size: int, count: int, out: Path) -> Tuple[List[Path], List[Dict]]:
    """Image patches of the ``count`` most used dictionary entries.

    entries, valid: (images, h, w) over all batches; one caption per image, so pair n is image n.
    """
    usage = torch.bincount(entries[valid], minlength=size).double() / valid.sum()
    config = processor.image_config
    images = [figures.display_image(pixels, mask, config.mean, config.std)
              for batch in batches for pixels, mask in zip(batch["pixel_values"], batch["pixel_mask"])]
    paths, shown = [], []
    for entry in usage.argsort(descending=True)[:count].tolist():
        if usage[entry] == 0:
            break
        crops = figures.entry_crops(images, entries, valid, entry, stride)
        paths.append(figures.dictionary_entry_figure(crops, entry, float(usage[entry]),
                                                     out / f"dictionary_entry_{entry}.png"))
        shown.append({"entry": entry, "usage": float(usage[entry]), "cells_shown": len(crops)})
    return paths, shown


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a save_pretrained directory with its processor")
    parser.add_argument("--shards", required=True, help="an image-caption split (directory, tar or brace pattern)")
    parser.add_argument("--out", required=True, help="directory for results.json and the figures")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--token-threshold", type=float, default=0.5,
                        help="an image token reads text when more than this share of its attention is on text")
    parser.add_argument("--head-threshold", type=float, default=0.5,
                        help="a head is cross-modal when more than this fraction of image tokens read text")
    parser.add_argument("--tokens-per-batch", type=int, default=1024, help="tokens per batch sampled for k-means")
    parser.add_argument("--layer", type=int, default=-1, help="layer of the attention-over-grid figure")
    parser.add_argument("--entries", type=int, default=3, help="most used dictionary entries to show")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probes", action="store_true", help="also train the probing classifiers")
    parser.add_argument("--grounding", choices=sorted(GROUNDING_SOURCES), default="synthetic",
                        help="where the probes' ground truth comes from: synthetic scene graphs (every probe), "
                             "flickr30k_entities (coreference), visual_genome (relation); see soho/analysis/probes.py")
    parser.add_argument("--probe-shards", default=None,
                        help="the split the probes read (default: --shards), e.g. data/flickr30k_entities/"
                             "entities_val or data/vg/relations")
    parser.add_argument("--captions-per-image", type=int, default=5, help="captions of each image the probes use")
    parser.add_argument("--test-fraction", type=float, default=0.3, help="share of the images the probes hold out")
    parser.add_argument("--probe-l2", type=float, nargs="+", default=list(L2_VALUES),
                        help="L2 weights a probe chooses from on a validation part of its training images")
    args = parser.parse_args(argv)

    model = SohoModel.from_pretrained(args.checkpoint).eval().to(args.device)
    processor = SohoProcessor.from_pretrained(args.checkpoint)
    batches, skipped = image_caption_batches(args.shards, processor, args.batch_size, args.batches)
    statistics = ValueStatistics(args.token_threshold, args.tokens_per_batch, args.seed)
    first = None
    grids = []  # (entries, valid cells) per batch; the attention maps are not kept past the update
    for batch in batches:
        captured = capture(model, batch)
        statistics.update(captured)
        first = captured if first is None else first
        if captured.entries is not None:
            grids.append((captured.entries, captured.image_mask.view_as(captured.entries)))
    report = statistics.report(args.head_threshold)

    out = Path(args.out)
    written = [
        figures.head_heatmap(report.cls_text_share, out / "modality_importance.png",
                             f"[CLS] attention on text (uniform: {report.uniform_text_share:.2f})", "text share"),
        figures.head_heatmap(report.cross_modal_fraction, out / "cross_modal_heads.png",
                             f"image tokens with > {args.token_threshold} attention on text (red: cross-modal head)",
                             "fraction of image tokens", marked=report.cross_modal_heads),
        figures.fusion_curve(report.fusion_nmi, out / "fusion_nmi.png"),
    ]
    path, token_attention = token_figure(first, batches[0], processor, args.layer % len(first.attentions), out)
    written.append(path)
    shown = []
    if grids:
        paths, shown = dictionary_figures(batches, torch.cat([e for e, _ in grids]), torch.cat([v for _, v in grids]),
                                          first.stride, processor, model.visual_dictionary.size, args.entries, out)
        written += paths

    results = {
        "checkpoint": args.checkpoint, "shards": args.shards, "skipped": skipped, "value": report.to_dict(),
        "token_attention": token_attention, "dictionary_entries": shown, "figures": [p.name for p in written],
    }
    probes = None
    if args.probes:
        probe_shards = args.probe_shards or args.shards
        probe_batches, results["probe_skipped"] = read_probe_batches(
            probe_shards, processor, args.batch_size, args.batches, args.captions_per_image,
            GROUNDING_SOURCES[args.grounding])
        results["probe_data"] = {"shards": probe_shards, "grounding": args.grounding}
        probes = run_probes(model, probe_batches, args.test_fraction, args.probe_l2, args.seed)
        results["probes"] = {condition: {probe: {features: result.to_dict() for features, result in found.items()}
                                         for probe, found in by_probe.items()}
                             for condition, by_probe in probes.items()}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"VALUE probes of {args.checkpoint} on {report.pairs} image-caption pairs of {args.shards}")
    print_table(report)
    if probes is not None:
        print_probe_table(probes, args.test_fraction)
    print(f"\nwrote {out / 'results.json'} and {len(written)} figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
