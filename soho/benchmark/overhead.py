"""What the training framework costs: the trainer's per-batch path against a bare PyTorch loop.

Both train copies of one freshly initialised model, with the same optimizers and schedulers
(soho/train/optim.py), on the same batches already in memory (on the device), for the same
steps. The framework side is :meth:`soho.train.trainer.Trainer.train_batch` as ``Trainer.fit`` drives
it: Accelerate's prepare, accumulate, autocast, backward and gradient clipping, the task's step,
the metrics window (a JSON record every ``train.log_every``), the data-state bookkeeping, and the
per-step agreement of the processes (non-finite steps, stop signals, ``max_minutes``); evaluation and
checkpoints, which run every few hundred steps, are left out. The bare side is :class:`BareTrainer`.

The loops alternate step by step, each starting from the same random seed, so they see the same
ITM negatives and MVM masks (their losses agree, ``max_loss_difference``) and share whatever
load the machine is under.
"""
from __future__ import annotations

import copy
import dataclasses
import tempfile
import time
from typing import Dict, Sequence

import torch

from soho.benchmark.step import BareTrainer, model_inputs, to_device
from soho.benchmark.timing import median, synchronize
from soho.models.soho import SohoForPretraining
from soho.tasks.pretraining import PretrainConfig
from soho.train.trainer import Trainer


def framework_overhead(config: PretrainConfig, batches: Sequence[Dict], steps: int, warmup: int) -> Dict:
    """Median step of each loop over ``steps`` steps after ``warmup``, and the framework's overhead in percent."""
    with tempfile.TemporaryDirectory() as output_dir:
        config = dataclasses.replace(config, synthetic_root=None,
                                     train=dataclasses.replace(config.train, output_dir=output_dir, resume=None))
        trainer = Trainer(config)
        device = trainer.accelerator.device
        torch.manual_seed(config.train.seed)
        model = SohoForPretraining(config.model)
        bare = BareTrainer(config, device, model)
        trainer.setup(model=copy.deepcopy(model))
        trainer.model.train()
        batches = [to_device(batch, device) for batch in batches]
        inputs = [model_inputs(batch) for batch in batches]
        seconds = {"bare": [], "framework": []}
        losses = {"bare": [], "framework": []}

        def framework_step(i: int) -> float:
            trainer.train_batch(batches[i % len(batches)])
            return trainer.last_output.loss.detach()

        def bare_step(i: int) -> torch.Tensor:
            return bare.step(inputs[i % len(inputs)])

        loops = {"bare": bare_step, "framework": framework_step}
        for i in range(warmup + steps):
            # Alternating which goes first cancels whatever advantage the second one has (warm caches).
            for name in (("bare", "framework") if i % 2 == 0 else ("framework", "bare")):
                torch.manual_seed(config.train.seed + i)
                synchronize(device)
                start = time.perf_counter()
                loss = loops[name](i)
                synchronize(device)
                if i >= warmup:
                    seconds[name].append(time.perf_counter() - start)
                losses[name].append(float(loss))
    bare_ms, framework_ms = 1000 * median(seconds["bare"]), 1000 * median(seconds["framework"])
    return {
        "device": str(device), "steps": steps, "warmup": warmup,
        "bare_step_ms_median": bare_ms, "framework_step_ms_median": framework_ms,
        "bare_step_ms_mean": 1000 * sum(seconds["bare"]) / steps,
        "framework_step_ms_mean": 1000 * sum(seconds["framework"]) / steps,
        "overhead_percent": 100 * (framework_ms - bare_ms) / bare_ms,
        # The same batch, a moment apart: the per-pair difference cancels most of a busy machine's drift.
        "paired_overhead_percent": 100 * median([f - b for f, b in zip(seconds["framework"], seconds["bare"])])
        / median(seconds["bare"]),
        "max_loss_difference": max(abs(a - b) for a, b in zip(losses["bare"], losses["framework"])),
    }
