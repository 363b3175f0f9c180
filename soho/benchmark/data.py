"""Throughput of the pre-training data pipeline (shards -> decoded, tokenised, masked batches).

Measured twice per worker count: alone (how fast the loader can go) and feeding training steps
(how long each step waits for its batch while the workers compete with the model for the same
cores, which the isolated rate cannot show on a small machine).
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Optional, Sequence

import torch

from soho.benchmark.step import BareTrainer, model_inputs, time_steps, to_device
from soho.benchmark.timing import median, synchronize
from soho.data.pretraining import PretrainingDataset
from soho.data.stream import loader_batches, stream_loader
from soho.tasks import PretrainConfig


def loader_throughput(dataset: PretrainingDataset, workers: int, batches: int, warmup: int,
                      train_step: Optional[Callable[[Dict], object]] = None, train_steps: int = 0,
                      device: torch.device = torch.device("cpu")) -> Dict:
    """Batches and samples per second of ``batches`` batches after ``warmup``; worker start-up and
    the shuffle buffer's first fill are in ``first_batch_seconds``, not in the rates.

    With ``train_step``, ``train_steps`` steps are then fed by the same loader: the median step
    including its wait for the batch, and the mean wait (a mean, as a slow pipeline shows only in
    the steps after the loader's prefetched batches are used up).
    """
    start = time.perf_counter()
    with loader_batches(stream_loader(dataset, workers, dataset.seed)) as iterator:
        next(iterator)
        first_batch = time.perf_counter() - start
        for _ in range(warmup):
            next(iterator)
        samples = 0
        start = time.perf_counter()
        for _ in range(batches):
            samples += next(iterator)["samples"]
        seconds = time.perf_counter() - start
        result = {"workers": workers, "first_batch_seconds": first_batch, "batches_per_second": batches / seconds,
                  "samples_per_second": samples / seconds}
        if train_step is not None and train_steps > 0:
            waits, steps = [], []
            for _ in range(train_steps):
                start = time.perf_counter()
                batch = next(iterator)
                waits.append(time.perf_counter() - start)
                train_step(batch)
                synchronize(device)
                steps.append(time.perf_counter() - start)
            result.update(fed_wait_ms_mean=1000 * sum(waits) / train_steps, fed_step_ms_median=1000 * median(steps),
                          fed_samples_per_second=samples / batches / median(steps))
    return result


def data_against_model(config: PretrainConfig, tokenizer, batch_size: int, batches: Sequence[Dict],
                       worker_counts: Sequence[int], data_batches: int, steps: int, warmup: int,
                       device: torch.device) -> Dict:
    """The model's consumption (median of ``steps`` steps on ``batches`` in memory), then for each
    worker count the loader's rates of ``batch_size``-image batches, their ratio to that consumption,
    and ``steps`` steps fed by the loader."""
    torch.manual_seed(config.train.seed)
    trainer = BareTrainer(config, device)
    inputs = [model_inputs(to_device(batch, device)) for batch in batches]
    step_seconds = median(time_steps(trainer.step, inputs, steps, warmup, device))
    images = sum(b["pixel_values"].shape[0] for b in inputs) / len(inputs)
    pairs = sum(b["input_ids"].shape[0] for b in inputs) / len(inputs)
    result = {"batch_images": images, "default_workers": config.data.num_workers,
              "model_step_ms_median": 1000 * step_seconds, "model_images_per_second": images / step_seconds,
              "model_pairs_per_second": pairs / step_seconds, "loaders": {}}
    for workers in worker_counts:
        dataset = PretrainingDataset(config.data, tokenizer, batch_size, seed=config.train.seed)
        loader = loader_throughput(dataset, workers, data_batches, warmup,
                                   lambda batch: trainer.step(model_inputs(to_device(batch, device))), steps, device)
        loader["ratio_to_model"] = loader["samples_per_second"] / result["model_images_per_second"]
        result["loaders"][str(workers)] = loader
    return result
