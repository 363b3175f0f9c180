"""Training checkpoints shared by pre-training and fine-tuning.

A checkpoint is ``<output_dir>/checkpoints/step_<N>/``: Accelerate's full training state (model,
optimizers, schedulers, RNG), each rank's data positions, ``trainer_state.json`` (step and config)
and a ``save_pretrained`` export with its processor. It is written to ``step_<N>.tmp`` and renamed
when complete, so a crash never leaves a broken latest checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from accelerate import Accelerator
from torch import nn

from soho.config import to_dict
from soho.processing import SohoProcessor

CHECKPOINT_PREFIX = "step_"
TRAINER_STATE = "trainer_state.json"


def checkpoints(output_dir: Path) -> List[Path]:
    """Complete checkpoints, oldest first (a crash mid-save leaves only a ``.tmp`` directory)."""
    root = output_dir / "checkpoints"
    found = [p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and not p.name.endswith(".tmp")]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def resolve_resume(resume: Optional[str], output_dir: Path) -> Optional[Path]:
    """``train.resume``: None, ``auto`` (the latest checkpoint of ``output_dir``, if any) or a checkpoint."""
    if resume is None:
        return None
    if resume == "auto":
        found = checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint directory (no {TRAINER_STATE})")
    return path


def save_checkpoint(accelerator: Accelerator, model: nn.Module, output_dir: Path, step: int,
                    data_positions: Dict[int, int], processor: SohoProcessor, keep_last: int, config: Any,
                    export: str = "pretrained") -> Path:
    """Write the full training state and a ``save_pretrained`` export (``export``), atomically; keep the
    last ``keep_last`` checkpoints."""
    final = output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    (tmp / f"data_state_rank{accelerator.process_index}.json").write_text(json.dumps({"positions": data_positions}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(tmp / export, processor=processor)
        (tmp / TRAINER_STATE).write_text(json.dumps({"step": step, "config": to_dict(config)}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> Tuple[int, Dict[int, int]]:
    """Restore the training state saved by :func:`save_checkpoint`: returns the step and this rank's data
    positions (worker id -> samples already handed out)."""
    accelerator.load_state(str(path))
    step = json.loads((path / TRAINER_STATE).read_text())["step"]
    data_state = path / f"data_state_rank{accelerator.process_index}.json"
    if not data_state.is_file():
        raise FileNotFoundError(f"{data_state} is missing: the checkpoint was written by fewer processes than "
                                f"this run has ({accelerator.num_processes})")
    return step, {int(k): v for k, v in json.loads(data_state.read_text())["positions"].items()}
