"""Optimizers and learning-rate schedules shared by pre-training and fine-tuning.

Two parameter groups as in the SOHO paper and release: the CNN with its own optimizer
(SGD in the paper), everything else with AdamW; each has its own scheduler on one schedule.
"""
from __future__ import annotations

import math
from typing import List, Tuple

import torch
from torch import nn

from soho.train.config import OptimConfig, OptimizerConfig


def build_optimizer(params: List[Tuple[str, nn.Parameter]], config: OptimizerConfig) -> torch.optim.Optimizer:
    """BERT convention: no weight decay on biases and normalisation weights."""
    decay = [p for n, p in params if p.ndim > 1]
    no_decay = [p for n, p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if config.name == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, fused=config.fused)
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps, fused=config.fused)


def lr_factor(step: int, config: OptimConfig, max_steps: int) -> float:
    """Multiplier of the peak learning rate after ``step`` optimizer steps."""
    if step < config.warmup_steps:
        start = config.warmup_start_factor
        return start + (1.0 - start) * step / config.warmup_steps
    if config.schedule == "step":
        return config.decay_factor ** sum(step >= m for m in config.milestones)
    if config.schedule == "cosine":
        progress = min(1.0, (step - config.warmup_steps) / max(1, max_steps - config.warmup_steps))
        return config.min_lr_factor + (1 - config.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def split_parameters(model: nn.Module) -> Tuple[List[Tuple[str, nn.Parameter]], List[Tuple[str, nn.Parameter]]]:
    """(CNN parameters, all other trainable parameters), by name."""
    backbone, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (backbone if name.startswith("soho.backbone.cnn") else rest).append((name, param))
    return backbone, rest


def build_optimizers(model: nn.Module, config: OptimConfig, max_steps: int):
    """The optimizers (rest first, then the CNN's if it trains) and one LambdaLR per optimizer."""
    backbone_params, other_params = split_parameters(model)
    optimizers = [build_optimizer(other_params, config.rest)]
    if backbone_params:
        optimizers.append(build_optimizer(backbone_params, config.backbone))
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, config, max_steps))
                  for o in optimizers]
    return optimizers, schedulers


def clip_gradients(accelerator, model: nn.Module, grad_clip: float) -> torch.Tensor:
    """The global gradient norm before clipping, clipping it to ``grad_clip`` (0: no clipping), inside
    ``accelerator.accumulate`` on a step that syncs gradients. Measured either way: a non-finite norm is how
    a diverging step shows (soho/train/trainer.py). The gradients are already reduced, so every process
    measures the same norm."""
    return torch.as_tensor(accelerator.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf))


def optimizer_step(accelerator, optimizers, skip: bool = False) -> None:
    """Step (unless ``skip``) and zero every optimizer, inside ``accelerator.accumulate``. A skipped step
    leaves the parameters and the optimizers' state as they were."""
    for optimizer in optimizers:
        if not skip:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if skip and accelerator.scaler is not None:
        # fp16: the scaler saw the overflow while unscaling for the norm; updating it lowers the scale, as a
        # step it skipped by itself would.
        accelerator.scaler.update()
