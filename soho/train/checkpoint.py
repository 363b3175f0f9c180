"""Training checkpoints shared by pre-training and fine-tuning.

A checkpoint is ``<output_dir>/checkpoints/step_<N>/``: Accelerate's full training state (model,
optimizers, schedulers, RNG), each rank's data positions, ``trainer_state.json`` (step and config),
a ``save_pretrained`` export with its processor and, written last, ``manifest.json``: every file with
its size and sha256. It is written to ``step_<N>.tmp-<run id>`` and renamed when complete; a save that
fails removes its temporary directory and says how much space is left.

Only a checkpoint whose manifest verifies is resumed from (:func:`resolve_resume`): a save cut short, a
truncated copy or a flipped bit is named and passed over for the previous good checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch import nn

from soho.config import to_dict
from soho.errors import SohoError, UserError
from soho.models.pretrained import file_sha256
from soho.processing import SohoProcessor

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
_CHECKPOINT_NAME = re.compile(rf"{CHECKPOINT_PREFIX}(\d+)")
_TEMPORARY_NAME = re.compile(rf"{CHECKPOINT_PREFIX}\d+\.tmp.*")


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed from."""


class CheckpointSaveError(SohoError, OSError):
    """A checkpoint could not be written (a full disk, say); its temporary directory was removed."""


def checkpoint_step(path: Path) -> int:
    return int(_CHECKPOINT_NAME.fullmatch(path.name).group(1))


def checkpoints(output_dir: Path) -> List[Path]:
    """The ``step_<N>`` directories of ``output_dir``, oldest first, complete or not (temporary ones are not)."""
    found = [p for p in (output_dir / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*")
             if p.is_dir() and _CHECKPOINT_NAME.fullmatch(p.name)]
    return sorted(found, key=checkpoint_step)


def remove_stale_temporaries(output_dir: Path) -> None:
    """Remove what saves cut short left behind. Only the run holding the output directory's lock
    (soho/train/lock.py) may call this: every temporary directory is then a dead run's."""
    for path in (output_dir / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*"):
        if _TEMPORARY_NAME.fullmatch(path.name):
            logger.warning("removing %s, left by a save that did not finish", path)
            shutil.rmtree(path, ignore_errors=True)


def write_manifest(directory: Path) -> None:
    """List every file of ``directory`` with its size and sha256 in ``manifest.json``: the last file a save
    writes, so that a checkpoint without a valid one is known to be incomplete or damaged."""
    files = {path.relative_to(directory).as_posix(): {"size": path.stat().st_size, "sha256": file_sha256(path)}
             for path in sorted(directory.rglob("*")) if path.is_file()}
    (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def verify_checkpoint(directory: Path) -> Optional[str]:
    """What is wrong with a checkpoint, or None when every file of its manifest is there with its size and sha256."""
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST}: its save did not finish (or a soho without manifests wrote it)"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{MANIFEST} is unreadable ({error})"
    if TRAINER_STATE not in files:
        return f"{MANIFEST} does not list {TRAINER_STATE}"
    # Sizes first: a truncated file shows without reading anything.
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, its manifest says {expected['size']}"
    for name, expected in files.items():
        if file_sha256(directory / name) != expected["sha256"]:
            return f"{name} does not match its sha256 in {MANIFEST}"
    return None


def _choose_resume(resume: str, output_dir: Path) -> Optional[Path]:
    if resume != "auto":
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"--resume {resume}: no such directory")
        problem = verify_checkpoint(path)
        if problem is not None:
            raise CheckpointError(f"--resume {resume}: not a usable checkpoint: {problem}")
        return path
    damaged = []
    for path in reversed(checkpoints(output_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        logger.warning("--resume auto: passing over %s: %s", path, problem)
        damaged.append(f"{path.name} ({problem})")
    if damaged:
        raise CheckpointError(f"--resume auto: no usable checkpoint in {output_dir / 'checkpoints'}: "
                              f"{'; '.join(damaged)}")
    logger.warning("--resume auto: no checkpoint in %s: starting from scratch", output_dir / "checkpoints")
    return None


def resolve_resume(resume: Optional[str], output_dir: Path, accelerator: Accelerator) -> Optional[Path]:
    """``train.resume`` as a verified checkpoint: None (start fresh); ``auto``, the newest checkpoint of
    ``output_dir`` whose manifest verifies (damaged newer ones are named and passed over; None, said so, when
    there is none); or a checkpoint directory. A :class:`CheckpointError` when nothing usable is found.

    The main process reads the files once and tells the others.
    """
    if resume is None:
        return None
    outcome: List[Any] = [None]
    if accelerator.is_main_process:
        try:
            outcome = [_choose_resume(resume, output_dir)]
        except CheckpointError as error:
            outcome = [error]
    outcome = broadcast_object_list(outcome)
    if isinstance(outcome[0], CheckpointError):
        raise outcome[0]
    return outcome[0]


def save_checkpoint(accelerator: Accelerator, model: nn.Module, output_dir: Path, step: int,
                    data_positions: Dict[int, int], processor: SohoProcessor, keep_last: int, config: Any,
                    run_id: str, export: str = "pretrained") -> Path:
    """Write the full training state and a ``save_pretrained`` export (``export``) to a temporary directory
    named after ``run_id``, its manifest last, then rename it; keep the last ``keep_last`` checkpoints up to
    this one. Every process must call it."""
    root = output_dir / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    tmp = root / f"{final.name}.tmp-{run_id}"
    try:
        accelerator.save_state(str(tmp))
        (tmp / f"data_state_rank{accelerator.process_index}.json").write_text(
            json.dumps({"positions": data_positions}))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            accelerator.unwrap_model(model).save_pretrained(tmp / export, processor=processor)
            (tmp / TRAINER_STATE).write_text(json.dumps({"step": step, "config": to_dict(config)}, indent=2))
            write_manifest(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    except Exception as error:  # torch and safetensors report a full disk as RuntimeError or their own errors
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(root).free if root.is_dir() else 0
        space = f"{free / 2**30:.1f} GiB" if free >= 2**30 else f"{free / 2**20:.1f} MiB"
        raise CheckpointSaveError(f"could not write checkpoint {final}: {type(error).__name__}: {error}; removed "
                                  f"the partial {tmp.name}; {space} free on {root}") from error
    if accelerator.is_main_process:
        # Checkpoints past this step are ones a resume passed over as damaged: they stay until this run
        # writes their steps again.
        earlier = [path for path in checkpoints(output_dir) if checkpoint_step(path) <= step]
        for old in earlier[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> Tuple[int, Dict[int, int]]:
    """Restore the training state saved by :func:`save_checkpoint`: returns the step and this rank's data
    positions (worker id -> samples already handed out)."""
    data_state = path / f"data_state_rank{accelerator.process_index}.json"
    if not data_state.is_file():
        raise CheckpointError(f"{data_state} is missing: the checkpoint was written by fewer processes than "
                              f"this run has ({accelerator.num_processes})")
    try:
        accelerator.load_state(str(path))
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        raise CheckpointError(f"cannot load {path} into this run: {str(error).splitlines()[0]}") from None
    step = json.loads((path / TRAINER_STATE).read_text())["step"]
    return step, {int(k): v for k, v in json.loads(data_state.read_text())["positions"].items()}
