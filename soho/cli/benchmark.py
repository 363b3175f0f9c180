"""Measure soho: model size, where a training step's time goes, data, retrieval and framework speed.

    python tools/benchmark.py model --config configs/pretrain/synthetic.yaml --batch-size 8
    python tools/benchmark.py params --config configs/pretrain/coco_vg_r101.yaml
    python tools/benchmark.py dictionary --checkpoint runs/synthetic/pretrained \
        --reference runs/synthetic/checkpoints/step_500/pretrained
    python tools/benchmark.py step --steps 10 --warmup 3
    python tools/benchmark.py data --workers 0 1 2
    python tools/benchmark.py retrieval --checkpoint runs/synthetic/pretrained \
        --shards data/synthetic/retrieval_test --images 1000
    python tools/benchmark.py overhead --steps 20 --warmup 3

``dictionary`` measures a trained checkpoint's visual dictionary on held-out images
(entry geometry, assignment stability, MVM accuracy against baselines; see
soho/analysis/dictionary.py).

``step`` (soho/benchmark/step.py): a training step of --config split into stages, ms and percent
of the step (``stages.<stage>.ms``, ``stages.<stage>.percent``; means over the middle half of
--steps profiled steps): backbone, visual_dictionary (lookup + EMA update), embeddings, encoder,
heads, forward_other (losses, masking, ITM negatives), backward_rest, backward_backbone,
optimizer, loop_other; then ``step_ms_median``, ``pairs_per_second`` and ``images_per_second``
of --steps unprofiled steps, and ``memory`` (``peak_mib``, ``increase_mib``,
``memory_measure``: CUDA max allocated or the process's max RSS).

``data`` (soho/benchmark/data.py): per --workers count (``loaders.<n>``), batches and samples
per second of the pre-training loader alone, the ratio of that to the model's consumption
(``ratio_to_model``; the model's rate is ``model_images_per_second``, from the median of --steps
in-memory steps), and the mean wait and median step of --steps steps fed by the loader.

``retrieval`` (soho/benchmark/retrieval.py): seconds, fusion passes and R@1 of each protocol
(``protocols.<name>``: itm_all_naive, itm_all, itc, itc_itm) on the first --images images of
--shards scored by --checkpoint (or, with --random, random tensors and a random model of
--config), ``itc_itm_speedup_over_itm_all``, ``itc_itm_r1_drop`` and ``cached_speedup_over_naive``.

``overhead`` (soho/benchmark/overhead.py): median step of the trainer's loop against a
bare PyTorch loop on the same in-memory batches (``bare_step_ms_median``,
``framework_step_ms_median``, ``overhead_percent``; ``paired_overhead_percent``, the median of
the per-batch differences, is steadier on a busy machine; ``max_loss_difference``).

Prints a table and writes JSON (--json PATH). Timings on a shared machine are indicative only.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from soho.models.soho import SohoForPretraining
from soho.tasks import PretrainConfig, load_run_config


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


def device_of(args) -> torch.device:
    return torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")


def training_batches(args, config: PretrainConfig) -> list:
    from soho.benchmark.step import read_batches
    from soho.tokenizer import load_tokenizer

    return read_batches(config.data, load_tokenizer(config.data.tokenizer), args.batch_size, args.batches,
                        config.train.seed)


def step(args, config: PretrainConfig) -> dict:
    from soho.benchmark.step import profile_training_step

    return profile_training_step(config, training_batches(args, config), args.steps, args.warmup, device_of(args))


def data(args, config: PretrainConfig) -> dict:
    from soho.benchmark.data import data_against_model
    from soho.tokenizer import load_tokenizer

    return data_against_model(config, load_tokenizer(config.data.tokenizer), args.batch_size,
                              training_batches(args, config), args.workers, args.data_batches, args.steps,
                              args.warmup, device_of(args))


def retrieval(args, config: PretrainConfig) -> dict:
    from soho.benchmark.retrieval import benchmark_retrieval, random_gallery
    from soho.data.retrieval import read_retrieval_split
    from soho.processing import SohoProcessor

    device = device_of(args)
    if args.random:
        torch.manual_seed(config.train.seed)
        model = SohoForPretraining(config.model)
        images, texts, text_image = random_gallery(
            config.model.encoder.vocab_size, args.images, args.captions_per_image, config.data.image.min_size,
            config.data.max_text_length, args.batch_size, config.train.seed)
        source = {"gallery": "random tensors", "model": f"random weights of {args.config}"}
    else:
        model = SohoForPretraining.from_pretrained(args.checkpoint)
        split = read_retrieval_split(args.shards, SohoProcessor.from_pretrained(args.checkpoint), args.batch_size,
                                     args.images)
        images, texts, text_image = split.image_batches, split.text_batches, split.text_image
        source = {"gallery": args.shards, "model": args.checkpoint}
    return {**source, **benchmark_retrieval(model.to(device), images, texts, text_image, args.protocols, args.k,
                                            args.fusion_batch_size, args.naive_pairs, config.train.seed,
                                            args.mixed_precision)}


def overhead(args, config: PretrainConfig) -> dict:
    from soho.benchmark.overhead import framework_overhead

    return framework_overhead(config, training_batches(args, config), args.steps, args.warmup)


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def print_section(name: str, values: dict) -> None:
    """Scalars as ``key value`` lines, a dict of scalars as dotted keys, a dict of dicts as a Markdown table."""
    print(f"## {name}")
    for key, value in values.items():
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            columns = list(dict.fromkeys(column for row in value.values() for column in row))
            rows = [[key, *columns]] + [[row_name, *(_format(row.get(c, "")) for c in columns)]
                                        for row_name, row in value.items()]
            widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
            lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
            print("\n".join([lines[0], "|" + "|".join("-" * (w + 2) for w in widths) + "|", *lines[1:]]))
        elif isinstance(value, dict):
            for sub, item in value.items():
                print(f"  {key + '.' + sub:40s} {_format(item)}")
        else:
            print(f"  {key:40s} {_format(value)}")


MEASURES = {"step": step, "data": data, "retrieval": retrieval, "overhead": overhead}
DEFAULT_BATCH_SIZE = {"model": 8, "dictionary": 8, "retrieval": 64}
"""Otherwise the config's train.batch_size."""
DEFAULT_SHARDS = {"dictionary": "data/synthetic/retrieval_val", "retrieval": "data/synthetic/retrieval_test"}


def main(argv=None) -> int:
    from soho.benchmark.retrieval import BENCHMARK_PROTOCOLS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["model", "params", "dictionary", *MEASURES])
    parser.add_argument("--config", default="configs/pretrain/synthetic.yaml")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per batch (default: 8 for model and dictionary, 64 for retrieval's encoding "
                             "batches, else the config's train.batch_size)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (and batches) first")
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto",
                        help="step, data, retrieval: auto takes a GPU if there is one (overhead: Accelerate's choice)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice); on a machine shared with other "
                             "jobs, 1 keeps timings from collapsing when the threads outnumber the free cores")
    parser.add_argument("--json", default=None)
    parser.add_argument("--checkpoint", default="runs/synthetic/pretrained", help="dictionary, retrieval: the model")
    parser.add_argument("--reference", default=None, help="dictionary: an earlier checkpoint of the same run")
    parser.add_argument("--shards", default=None, help="dictionary: held-out images (default "
                        "data/synthetic/retrieval_val); retrieval: the gallery (default data/synthetic/retrieval_test)")
    parser.add_argument("--batches", type=int, default=16,
                        help="dictionary: batches of --batch-size images; step, data, overhead: batches read "
                             "into memory and cycled through")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="data: DataLoader worker counts")
    parser.add_argument("--data-batches", type=int, default=20, help="data: batches timed per worker count")
    parser.add_argument("--images", type=int, default=100, help="retrieval: gallery images")
    parser.add_argument("--random", action="store_true",
                        help="retrieval: random tensors and a random model of --config instead of --shards and "
                             "--checkpoint (timing only: random data has nothing to retrieve, so its recall means "
                             "nothing)")
    parser.add_argument("--captions-per-image", type=int, default=5, help="retrieval with --random")
    parser.add_argument("--protocols", nargs="+", default=list(BENCHMARK_PROTOCOLS), choices=BENCHMARK_PROTOCOLS)
    parser.add_argument("--k", type=int, default=16, help="retrieval: itc_itm shortlist size")
    parser.add_argument("--fusion-batch-size", type=int, default=512, help="retrieval: pairs per Transformer pass")
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no",
                        help="retrieval: autocast the fusion passes")
    parser.add_argument("--naive-pairs", type=int, default=1024,
                        help="retrieval: pairs timed for itm_all_naive (extrapolated to the gallery)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    config = load_run_config(args.config, args.overrides, default_task="pretraining")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.batch_size is None:
        args.batch_size = DEFAULT_BATCH_SIZE.get(args.what, config.train.batch_size)
    args.shards = args.shards or DEFAULT_SHARDS.get(args.what)
    if args.what == "dictionary":
        result = {"checkpoint": args.checkpoint, "dictionary": dictionary(args, config)}
    elif args.what in MEASURES:
        started = time.perf_counter()
        result = {"config": args.config, "threads": torch.get_num_threads(),
                  args.what: MEASURES[args.what](args, config), "wall_seconds": time.perf_counter() - started}
    else:
        result = {"config": args.config, "parameters": parameter_counts(SohoForPretraining(config.model))}
    if args.what == "model":
        result["training_step"] = time_training_step(config, args.batch_size, args.steps, args.warmup)
    for section, values in result.items():
        if isinstance(values, dict):
            print_section(section, values)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
