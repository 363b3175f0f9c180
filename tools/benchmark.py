"""Measure soho: parameter counts and training-step time of a model config.

    python tools/benchmark.py model --config configs/pretrain/synthetic.yaml --batch-size 8
    python tools/benchmark.py params --config configs/pretrain/coco_vg_r101.yaml
    python tools/benchmark.py dictionary --checkpoint runs/synthetic/pretrained \
        --reference runs/synthetic/checkpoints/step_500/pretrained

``dictionary`` measures a trained checkpoint's visual dictionary on held-out images
(entry geometry, assignment stability, MVM accuracy against baselines; see
soho/analysis/dictionary.py).

Prints a table and writes JSON (--json PATH).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from soho.config import load_config  # noqa: E402
from soho.models.soho import SohoForPretraining  # noqa: E402
from soho.train.config import PretrainConfig  # noqa: E402


def parameter_counts(model: SohoForPretraining) -> dict:
    groups = {"backbone_cnn": "soho.backbone.cnn", "backbone_neck": "soho.backbone.", "text_embeddings":
              "soho.text_embeddings", "encoder": "soho.encoder", "pooler_and_heads": ""}
    counts = dict.fromkeys(groups, 0)
    for name, param in model.named_parameters():
        group = next(g for g, prefix in groups.items() if name.startswith(prefix))
        counts[group] += param.numel()
    counts["total"] = sum(p.numel() for p in model.parameters())
    counts["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counts["dictionary_buffer"] = model.soho.visual_dictionary.embedding.numel() if model.soho.visual_dictionary \
        is not None else 0
    return counts


def synthetic_batch(config: PretrainConfig, batch_size: int, generator: torch.Generator) -> dict:
    size = config.data.image.min_size
    captions = config.data.captions_per_image
    length = config.data.max_text_length
    vocab = config.model.encoder.vocab_size
    input_ids = torch.randint(5, vocab, (batch_size * captions, length), generator=generator)
    labels = torch.where(torch.rand(input_ids.shape, generator=generator) < 0.15, input_ids, -100)
    return {
        "pixel_values": torch.randn(batch_size, 3, size, size, generator=generator),
        "pixel_mask": torch.ones(batch_size, size, size, dtype=torch.long),
        "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
        "mlm_input_ids": input_ids.masked_fill(labels >= 0, 4), "mlm_labels": labels,
        "image_index": torch.arange(batch_size).repeat_interleave(captions),
    }


def time_training_step(config: PretrainConfig, batch_size: int, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    model = SohoForPretraining(config.model).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = synthetic_batch(config, batch_size, torch.Generator().manual_seed(0))
    timings = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        out = model(**batch)
        out.loss.backward()
        forward_backward = time.perf_counter() - start
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            timings.append(forward_backward)
    timings.sort()
    return {"batch_images": batch_size, "pairs": batch_size * config.data.captions_per_image,
            "forward_backward_ms_median": 1000 * timings[len(timings) // 2],
            "forward_backward_ms_min": 1000 * timings[0], "steps": steps,
            "threads": torch.get_num_threads()}


def dictionary(args, config: PretrainConfig) -> dict:
    import dataclasses

    from soho.analysis.dictionary import dictionary_report
    from soho.data.pretraining import PretrainingDataset
    from soho.processing import SohoProcessor

    model = SohoForPretraining.from_pretrained(args.checkpoint)
    reference = SohoForPretraining.from_pretrained(args.reference) if args.reference else None
    processor = SohoProcessor.from_pretrained(args.checkpoint)
    data = dataclasses.replace(config.data, shards=args.shards, shuffle_buffer=0, image=processor.image_config,
                               max_text_length=processor.max_text_length)
    stream = PretrainingDataset(data, processor.tokenizer, args.batch_size, seed=0, repeat=False)
    batches = (batch for _, batch in zip(range(args.batches), stream))
    return dictionary_report(model, batches, reference)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["model", "params", "dictionary"])
    parser.add_argument("--config", default="configs/pretrain/synthetic.yaml")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument("--checkpoint", default="runs/synthetic/pretrained", help="dictionary: the model to measure")
    parser.add_argument("--reference", default=None, help="dictionary: an earlier checkpoint of the same run")
    parser.add_argument("--shards", default="data/synthetic/retrieval_val", help="dictionary: held-out images")
    parser.add_argument("--batches", type=int, default=16, help="dictionary: batches of --batch-size images")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    config = load_config(PretrainConfig, args.config, args.overrides)
    if args.what == "dictionary":
        result = {"checkpoint": args.checkpoint, "dictionary": dictionary(args, config)}
    else:
        result = {"config": args.config, "parameters": parameter_counts(SohoForPretraining(config.model))}
    if args.what == "model":
        result["training_step"] = time_training_step(config, args.batch_size, args.steps, args.warmup)
    for section, values in result.items():
        if isinstance(values, dict):
            print(f"## {section}")
            for key, value in values.items():
                print(f"  {key:34s} {value:,.3f}" if isinstance(value, float) else f"  {key:34s} {value:,}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
