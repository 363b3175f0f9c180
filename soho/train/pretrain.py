"""The pre-training loop, on Accelerate: one CPU, one GPU, many GPUs or many nodes."""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch import nn
from tqdm.auto import tqdm

from soho.config import ConfigError, to_dict
from soho.data.pretraining import PretrainingDataset, pretraining_loader
from soho.data.shards import check_skip_fraction
from soho.models.soho import SohoForPretraining
from soho.processing import SohoProcessor
from soho.tokenizer import load_tokenizer
from soho.train.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from soho.train.config import PretrainConfig
from soho.train.optim import build_optimizers, optimizer_step

logger = logging.getLogger(__name__)

TENSOR_KEYS = ("pixel_values", "pixel_mask", "input_ids", "attention_mask", "token_type_ids", "mlm_input_ids",
               "mlm_labels", "image_index", "image_ids")
class MetricWriter:
    """Appends one JSON object per record to ``metrics.jsonl`` (main process only)."""

    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled

    def write(self, record: Dict) -> None:
        if self.enabled:
            with self.path.open("a") as stream:
                stream.write(json.dumps(record) + "\n")


def _to_device(batch: Dict, device: torch.device) -> Dict[str, torch.Tensor]:
    return {k: batch[k].to(device, non_blocking=True) for k in TENSOR_KEYS if k in batch}


def logged_values(out) -> Dict[str, float]:
    """Losses and metrics of one step as floats.

    An accuracy is undefined (NaN) on a step without its labels, e.g. no masked cell
    for MVM; it is left out so means run over the steps where it is defined. Losses
    are always kept, so a diverged run shows NaN.
    """
    values = {name: float(value.detach()) for name, value in {"loss": out.loss, **out.losses}.items()}
    values.update({name: float(value) for name, value in out.metrics.items() if not torch.isnan(value)})
    return values


@torch.no_grad()
def evaluate(model: nn.Module, config: PretrainConfig, tokenizer, accelerator: Accelerator) -> Dict[str, float]:
    """Mean losses and accuracies on held-out shards, with fixed ITM swaps and MVM masks.

    Each rank evaluates its own disjoint slice; every value is averaged over the
    batches where it is defined (MVM needs masked cells), over all ranks. Each accuracy
    comes with its chance level, ``chance_<name>``: the accuracy of always answering
    the most frequent label of the evaluated set (matched/mismatched for ITM, the
    commonest masked token for MLM, the commonest dictionary entry of the masked
    cells for MVM), which is what a model that ignores its input can reach. MVM also gets
    ``chance_mvm_hidden_acc``: the commonest entry among those not visible in the image,
    a baseline that looks only at which entries the unmasked cells have.
    """
    eval_data = dataclasses.replace(config.data, shards=config.train.eval_shards, shuffle_buffer=0)
    dataset = PretrainingDataset(eval_data, tokenizer, config.train.batch_size, seed=config.train.seed,
                                 rank=accelerator.process_index, world_size=accelerator.num_processes, repeat=False)
    was_training = model.training
    model.eval()
    sums: Dict[str, float] = defaultdict(float)
    counts: Dict[str, int] = defaultdict(int)
    unwrapped = accelerator.unwrap_model(model)
    num_classes = {"itm": 2, "mlm": unwrapped.config.encoder.vocab_size,
                   "mvm": unwrapped.config.visual_dictionary.size}
    histograms = {task: torch.zeros(n, dtype=torch.float64, device=accelerator.device)
                  for task, n in num_classes.items()}
    hidden_choices = []
    batches = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed + accelerator.process_index)
        for batch in dataset:
            if batches >= config.train.eval_batches:
                break
            with accelerator.autocast():
                out = model(**_to_device(batch, accelerator.device))
            for name, value in logged_values(out).items():
                sums[name] += value
                counts[name] += 1
            for task, labels in out.labels.items():
                histograms[task] += torch.bincount(labels, minlength=num_classes[task]).to(torch.float64)
            if out.mvm_visible is not None:
                hidden_choices.append((out.labels["mvm"], out.mvm_visible))
            batches += 1
    model.train(was_training)
    # Every rank must send the same keys in the same order, also one that saw no batch.
    names = sorted(set(gather_object(sorted(sums))))
    totals = torch.tensor([[sums.get(k, 0.0), counts.get(k, 0)] for k in names] + [[batches, 0]],
                          device=accelerator.device, dtype=torch.float64)
    totals = accelerator.reduce(totals, reduction="sum")
    results = {name: (totals[i, 0] / totals[i, 1]).item() if totals[i, 1] > 0 else float("nan")
               for i, name in enumerate(names)}
    results["batches"] = int(totals[-1, 0].item())
    for task, histogram in histograms.items():
        histogram = accelerator.reduce(histogram, reduction="sum")
        if histogram.sum() > 0:
            results[f"chance_{task}_acc"] = (histogram.max() / histogram.sum()).item()
        if task == "mvm":
            # A stronger MVM baseline that needs only the unmasked cells' entries: the commonest
            # target entry among those not visible in the cell's image.
            hits = sum(int((histogram.expand(len(t), -1).masked_fill(v, -1.0).argmax(1) == t).sum())
                       for t, v in hidden_choices)
            tally = accelerator.reduce(torch.tensor([hits, sum(len(t) for t, _ in hidden_choices)],
                                                    device=accelerator.device, dtype=torch.float64), reduction="sum")
            if tally[1] > 0:
                results["chance_mvm_hidden_acc"] = (tally[0] / tally[1]).item()
    return results


def build_accelerator(config: PretrainConfig) -> Accelerator:
    """The Accelerator of a pre-training run (also what ``tools/benchmark.py overhead`` measures)."""
    train = config.train
    return Accelerator(
        # Without this, processes started by torchrun on a GPU-less machine would not form a group.
        cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        mixed_precision=train.mixed_precision,
        gradient_accumulation_steps=config.optim.accumulation_steps,
        log_with=list(train.trackers) or None,
        project_dir=str(Path(train.output_dir)),
        step_scheduler_with_optimizer=False,
    )


class TrainingLoop:
    """What pre-training does with each batch: forward, backward, optimizer and scheduler steps, the
    window of metrics logged every ``train.log_every`` steps and the data positions a checkpoint
    needs for exact resumption.

    :func:`pretrain` feeds it from the loader; ``tools/benchmark.py overhead`` times it against a
    bare PyTorch loop on the same batches, so the two must stay one code path.
    """

    def __init__(self, accelerator: Accelerator, model: nn.Module, optimizers, schedulers, config: PretrainConfig,
                 writer: MetricWriter, step: int = 0, positions: Optional[Dict[int, int]] = None,
                 progress: Optional[tqdm] = None):
        self.accelerator = accelerator
        self.model = model
        self.optimizers = optimizers
        self.schedulers = schedulers
        self.config = config
        self.writer = writer
        self.step = step
        self.positions: Dict[int, int] = dict(positions or {})
        self.progress = progress
        self.skipped_total = 0
        self.samples_total = 0
        self.last_values: Dict[str, float] = {}
        """Losses and metrics of the last batch."""
        self.started = time.perf_counter()
        self._open_window()

    def _open_window(self) -> None:
        self.window: Dict[str, List[float]] = defaultdict(list)
        self.window_start = time.perf_counter()
        self.pairs_in_window = 0
        self.images_in_window = 0

    def train_batch(self, batch: Dict) -> bool:
        """Train on one batch; True when it completed an optimizer step (not on accumulation micro-steps)."""
        accelerator, model, config = self.accelerator, self.model, self.config
        freeze_at = config.train.freeze_backbone_norm_at
        if freeze_at is not None and self.step >= freeze_at:
            accelerator.unwrap_model(model).soho.backbone.freeze_norm_statistics()
        self.positions[batch["worker"]] = batch["position"]
        skipped = sum(batch["skipped"].values())
        self.skipped_total += skipped
        self.samples_total += batch["samples"] + skipped
        with accelerator.accumulate(model):
            with accelerator.autocast():
                out = model(**_to_device(batch, accelerator.device))
            accelerator.backward(out.loss)
            grad_norm = optimizer_step(accelerator, model, self.optimizers, config.optim.grad_clip)
        if grad_norm is not None:
            self.window["grad_norm"].append(grad_norm)
        self.last_values = logged_values(out)
        for name, value in self.last_values.items():
            self.window[name].append(value)
        self.pairs_in_window += batch["input_ids"].shape[0]
        self.images_in_window += batch["pixel_values"].shape[0]
        if not accelerator.sync_gradients:
            return False
        for scheduler in self.schedulers:
            scheduler.step()
        self.step += 1
        if self.progress is not None:
            self.progress.update(1)
        if self.step % config.train.log_every == 0 or self.step == config.train.max_steps:
            self._log()
        return True

    def _log(self) -> None:
        accelerator = self.accelerator
        elapsed = time.perf_counter() - self.window_start
        counts = accelerator.reduce(torch.tensor([self.skipped_total, self.samples_total], device=accelerator.device),
                                    reduction="sum")
        skip_fraction = counts[0].item() / max(1, counts[1].item())
        record = {"step": self.step, **{k: sum(v) / len(v) for k, v in self.window.items() if v},
                  "lr": self.schedulers[0].get_last_lr()[0],
                  "pairs_per_second": self.pairs_in_window * accelerator.num_processes / elapsed,
                  "images_per_second": self.images_in_window * accelerator.num_processes / elapsed,
                  "skipped_samples": int(counts[0].item()), "skip_fraction": skip_fraction,
                  "elapsed_seconds": time.perf_counter() - self.started}
        if len(self.optimizers) > 1:
            record["lr_backbone"] = self.schedulers[1].get_last_lr()[0]
        self.writer.write(record)
        if self.config.train.trackers:
            accelerator.log({k: v for k, v in record.items() if k != "step"}, step=self.step)
        if self.progress is not None:
            self.progress.set_postfix({k: f"{record[k]:.3f}" for k in ("loss", "itm_acc", "mlm_acc", "mvm_acc")
                                       if k in record})
        check_skip_fraction(int(counts[0].item()), int(counts[1].item()), self.config.data.max_skip_fraction)
        self._open_window()

    def out_of_time(self) -> bool:
        """Whether ``train.max_minutes`` has passed on any rank; every rank gets the same answer."""
        max_minutes = self.config.train.max_minutes
        out_of_time = max_minutes is not None and time.perf_counter() - self.started > max_minutes * 60
        # Every rank must agree to stop, or the others would wait forever in a collective.
        return bool(self.accelerator.reduce(torch.tensor([float(out_of_time)], device=self.accelerator.device),
                                            reduction="sum").item() > 0)


def pretrain(config: PretrainConfig) -> Dict[str, float]:
    """Run pre-training; returns the final held-out evaluation."""
    train = config.train
    output_dir = Path(train.output_dir)
    accelerator = build_accelerator(config)
    set_seed(train.seed, device_specific=True)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(json.dumps(to_dict(config), indent=2))
    if config.synthetic_root is not None and accelerator.is_main_process:
        from soho.data.synthetic import SyntheticWorldConfig, ensure_world

        ensure_world(config.synthetic_root, SyntheticWorldConfig())
    accelerator.wait_for_everyone()

    tokenizer = load_tokenizer(config.data.tokenizer)
    if len(tokenizer) > config.model.encoder.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but model.encoder.vocab_size is "
                          f"{config.model.encoder.vocab_size}")
    processor = SohoProcessor(tokenizer, config.data.image, config.data.max_text_length)
    model = SohoForPretraining(config.model)
    parameters = model.parameter_counts()
    logger.info("model: %s", ", ".join(f"{k} {v:,}" for k, v in parameters.items()))
    optimizers, schedulers = build_optimizers(model, config.optim, train.max_steps)
    if train.compile:
        model = torch.compile(model)
    model, *prepared = accelerator.prepare(model, *optimizers, *schedulers)
    optimizers, schedulers = prepared[:len(optimizers)], prepared[len(optimizers):]

    step = 0
    positions: Dict[int, int] = {}
    resume_from = resolve_resume(train.resume, output_dir)
    if resume_from is not None:
        step, positions = load_checkpoint(accelerator, resume_from)
        logger.info("resumed from %s at step %d", resume_from, step)
    if train.trackers:
        accelerator.init_trackers("soho-pretrain", config={k: str(v) for k, v in to_dict(config).items()})

    dataset = PretrainingDataset(config.data, tokenizer, train.batch_size, seed=train.seed,
                                 rank=accelerator.process_index, world_size=accelerator.num_processes,
                                 start_positions=positions)
    loader = pretraining_loader(dataset, config.data.num_workers, pin_memory=accelerator.device.type == "cuda")
    writer = MetricWriter(output_dir / "metrics.jsonl", accelerator.is_main_process)
    progress = tqdm(total=train.max_steps, initial=step, disable=not accelerator.is_local_main_process,
                    desc="pretrain")
    loop = TrainingLoop(accelerator, model, optimizers, schedulers, config, writer, step, positions, progress)

    model.train()
    batches = iter(loader)
    while loop.step < train.max_steps:
        if not loop.train_batch(next(batches)):
            continue
        step = loop.step
        out_of_time = loop.out_of_time()
        if train.eval_every and step % train.eval_every == 0 and train.eval_shards:
            writer.write({"step": step, "eval": evaluate(model, config, tokenizer, accelerator)})
        if step % train.save_every == 0 or step == train.max_steps or out_of_time:
            save_checkpoint(accelerator, model, output_dir, step, loop.positions, processor, train.keep_last, config)
        if out_of_time:
            logger.info("stopping at step %d: train.max_minutes=%s reached", step, train.max_minutes)
            break
    progress.close()

    final = {"step": loop.step, "final": True, "wall_seconds": time.perf_counter() - loop.started,
             "parameters": parameters}
    if train.eval_shards:
        final["eval"] = evaluate(model, config, tokenizer, accelerator)
    writer.write(final)
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(output_dir / "pretrained", processor=processor)
    accelerator.end_training()
    return final
