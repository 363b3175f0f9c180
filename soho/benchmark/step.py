"""Where a pre-training step spends its time: CNN, visual dictionary, Transformer, heads, backward, optimizer.

The model is trained by :class:`BareTrainer`, a hand-written loop with the framework's model,
optimizers and schedulers and nothing else, on batches read once into memory, so the data
pipeline and the framework's bookkeeping are not part of these numbers (``data`` and
``overhead`` measure those).
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, ContextManager, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from soho.benchmark.timing import PeakMemory, StageTimer, median, synchronize
from soho.config import ConfigError
from soho.data.pretraining import PretrainingDataConfig, PretrainingDataset
from soho.models.soho import SohoForPretraining
from soho.tasks.pretraining import PRETRAINING_INPUTS, PretrainConfig
from soho.train.optim import build_optimizers

Phase = Callable[[str], ContextManager]

STAGES = ("backbone", "visual_dictionary", "embeddings", "encoder", "heads", "forward_other",
          "backward_rest", "backward_backbone", "optimizer", "loop_other")
"""The stages of a step, in order. Forward: the hooked modules, then ``forward_other``, what the
pre-training forward does between them (ITM negatives, MVM masking, losses, dictionary usage
statistics). Backward: ``backward_backbone`` from the moment the gradient reaches the CNN's
output, ``backward_rest`` before that (heads, Transformer, embeddings). ``optimizer``: gradient
clipping, every optimizer's step and zero_grad, the schedulers. ``loop_other``: what is left of
the step (the timing itself)."""


def read_batches(data: PretrainingDataConfig, tokenizer, batch_size: int, count: int, seed: int = 0) -> List[Dict]:
    """``count`` pre-training batches, read once by the main process so that every loop sees the same ones."""
    stream = iter(PretrainingDataset(data, tokenizer, batch_size, seed=seed))
    return [next(stream) for _ in range(count)]


def to_device(batch: Dict, device: torch.device) -> Dict:
    """The batch with its tensors on ``device``; the stream bookkeeping (worker, position, skips) is kept."""
    return {**batch, **{k: batch[k].to(device) for k in PRETRAINING_INPUTS if k in batch}}


def model_inputs(batch: Dict) -> Dict[str, Tensor]:
    return {k: batch[k] for k in PRETRAINING_INPUTS if k in batch}


def _no_phase(name: str) -> ContextManager:
    return contextlib.nullcontext()


class BareTrainer:
    """The pre-training model trained by a hand-written PyTorch loop: forward, backward, gradient
    clipping, the framework's optimizers (soho/train/optim.py) and their schedulers, nothing else."""

    def __init__(self, config: PretrainConfig, device: torch.device, model: Optional[SohoForPretraining] = None):
        if config.train.mixed_precision == "fp16":
            raise ConfigError("the bare loop has no gradient scaler: benchmark with train.mixed_precision=no or bf16")
        if config.optim.accumulation_steps != 1:
            raise ConfigError("the bare loop steps the optimizer on every batch: set optim.accumulation_steps=1")
        self.device = device
        self.model = (model if model is not None else SohoForPretraining(config.model)).to(device).train()
        self.optimizers, self.schedulers = build_optimizers(self.model, config.optim, config.train.max_steps)
        self.grad_clip = config.optim.grad_clip
        self.bf16 = config.train.mixed_precision == "bf16"

    def step(self, inputs: Dict[str, Tensor], phase: Phase = _no_phase) -> Tensor:
        """One training step on ``inputs`` (model keyword arguments); returns the detached loss."""
        with phase("forward"), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.model(**inputs).loss
        with phase("backward"):
            loss.backward()
        with phase("optimizer"):
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            for optimizer in self.optimizers:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for scheduler in self.schedulers:
                scheduler.step()
        return loss.detach()


def time_steps(step: Callable[[Dict], object], batches: Sequence[Dict], steps: int, warmup: int,
               device: torch.device) -> List[float]:
    """Seconds of each of ``steps`` calls after ``warmup`` untimed ones, cycling through ``batches``."""
    seconds = []
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        synchronize(device)
        start = time.perf_counter()
        step(batch)
        synchronize(device)
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
    return seconds


def stage_modules(model: SohoForPretraining) -> Dict[str, list]:
    soho = model.soho
    # The ITC head is used through its embed_* methods, which no hook sees; its projections are modules.
    heads = [soho.pooler] + [module for objective in model.objectives.values() for module in
                             ([objective.head.text_projection, objective.head.image_projection]
                              if objective.name == "itc" else [objective.head])]
    stages = {"backbone": [soho.backbone], "embeddings": [soho.text_embeddings, soho.visual_embeddings],
              "encoder": [soho.encoder], "heads": heads}
    if soho.visual_dictionary is not None:
        stages["visual_dictionary"] = [soho.visual_dictionary]
    return stages


def split_step(seconds: Dict[str, float], marks: Dict[str, float], total: float) -> Dict[str, float]:
    """One profiled step's seconds per :data:`STAGES` entry, from the timer's stages, marks and the step's total."""
    forward_parts = ("backbone", "visual_dictionary", "embeddings", "encoder", "heads")
    split = {name: seconds.get(name, 0.0) for name in forward_parts}
    split["forward_other"] = seconds["forward"] - sum(split.values())
    split["backward_backbone"] = marks["backward_end"] - marks["backbone"] if "backbone" in marks else 0.0
    split["backward_rest"] = seconds["backward"] - split["backward_backbone"]
    split["optimizer"] = seconds["optimizer"]
    split["loop_other"] = total - seconds["forward"] - seconds["backward"] - seconds["optimizer"]
    return {name: split[name] for name in STAGES}


def profile_training_step(config: PretrainConfig, batches: Sequence[Dict], steps: int, warmup: int,
                          device: torch.device) -> Dict:
    """``steps`` profiled steps alternating with ``steps`` plain ones (after ``warmup`` plain ones), each
    pair on the same batch, so that both meet the same load of the machine.

    The split per stage is the mean over the middle half of the profiled steps ranked by duration:
    that drops the steps a busy machine stretched and still adds up to the mean of those steps
    (``profiled_step_ms_mean``). Throughput comes from the median plain step.
    """
    torch.manual_seed(config.train.seed)
    trainer = BareTrainer(config, device)
    inputs = [model_inputs(to_device(batch, device)) for batch in batches]
    timer = StageTimer(stage_modules(trainer.model), device, gradient_marks={"backbone": trainer.model.soho.backbone})
    profiled, plain = [], []
    with PeakMemory(device) as memory:
        for i in range(warmup + 2 * steps):
            profile = i >= warmup and (i - warmup) % 2 == 0
            timer.enabled = profile
            timer.pop()
            batch = inputs[(i if i < warmup else (i - warmup) // 2) % len(inputs)]
            synchronize(device)
            start = time.perf_counter()
            trainer.step(batch, timer.phase if profile else _no_phase)
            synchronize(device)
            total = time.perf_counter() - start
            if profile:
                seconds, marks = timer.pop()
                profiled.append((total, split_step(seconds, marks, total)))
            elif i >= warmup:
                plain.append(total)
    timer.remove()
    profiled.sort(key=lambda item: item[0])
    middle = profiled[len(profiled) // 4:len(profiled) - len(profiled) // 4]
    mean_step = sum(total for total, _ in middle) / len(middle)
    stages_ms = {name: 1000 * sum(split[name] for _, split in middle) / len(middle) for name in STAGES}
    pairs = sum(b["input_ids"].shape[0] for b in inputs) / len(inputs)
    images = sum(b["pixel_values"].shape[0] for b in inputs) / len(inputs)
    return {
        "device": str(device), "threads": torch.get_num_threads(), "batch_images": images, "batch_pairs": pairs,
        "steps": steps, "warmup": warmup, "steps_in_split": len(middle),
        "stages": {name: {"ms": ms, "percent": 100 * ms / (1000 * mean_step)} for name, ms in stages_ms.items()},
        "profiled_step_ms_mean": 1000 * mean_step,
        "profiled_step_ms_median": 1000 * median([total for total, _ in profiled]),
        "step_ms_median": 1000 * median(plain),
        "pairs_per_second": pairs / median(plain),
        "images_per_second": images / median(plain),
        "memory": memory.result,
    }
