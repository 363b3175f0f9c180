"""One run per output directory.

Two runs writing one ``train.output_dir`` would append to one ``metrics.jsonl``, interleave their
checkpoints and delete each other's files. The main process of a run holds ``<output_dir>/run.lock``
(the holder's host and pid) from set-up to the end; a second run is refused with one line. A lock whose
holder died without removing it (kill -9, a lost node) is taken over when the holder ran on this host;
one from another host names that host, for the user to judge.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any, Dict, List

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from soho.errors import UserError

logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


class OutputDirLocked(UserError):
    """Another run is writing the output directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class RunLock:
    """The lock of ``output_dir``; :meth:`acquire` on every process, :meth:`release` at the end of the run.

    ``run_id`` is the same on every process of a run and different for every run: what temporary names are
    made unique with.
    """

    def __init__(self, output_dir: Path):
        self.output_dir = output_dir
        self.path = output_dir / LOCK_NAME
        self.held = False
        self.created_dir = False
        self.run_id = ""

    def acquire(self, accelerator: Accelerator) -> None:
        """The main process takes the lock and tells the others; every process raises :class:`OutputDirLocked`
        when it is held (a :class:`~soho.errors.UserError` when the directory cannot be written)."""
        outcome: List[Any] = [None, secrets.token_hex(4)]
        if accelerator.is_main_process:
            try:
                self._take()
            except UserError as error:
                outcome[0] = error
        error, self.run_id = broadcast_object_list(outcome)
        if error is not None:
            raise error

    def _take(self) -> None:
        self.created_dir = not self.output_dir.exists()
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        while True:
            try:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                break
            except FileExistsError:
                holder = self._holder()
                if holder.get("host") != record["host"] or not isinstance(holder.get("pid"), int) \
                        or _alive(holder["pid"]):
                    raise OutputDirLocked(self._refusal(holder)) from None
                logger.warning("taking over %s: its holder (pid %d, since %s) is gone", self.path, holder["pid"],
                               holder.get("started", "?"))
                self.path.unlink(missing_ok=True)
            except OSError as error:
                raise UserError(f"train.output_dir {self.output_dir} cannot be written: {error}") from None
        with os.fdopen(descriptor, "w") as stream:
            json.dump(record, stream)
        self.held = True

    def _holder(self) -> Dict[str, Any]:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _refusal(self, holder: Dict[str, Any]) -> str:
        who = (f"host {holder['host']}, pid {holder.get('pid', '?')}, since {holder.get('started', '?')}"
               if holder.get("host") else "its lock file is unreadable")
        return (f"train.output_dir {self.output_dir} is in use by another run ({who}): give this run another "
                f"output directory or wait for that one to end; if no run is using it, remove {self.path}")

    def release(self) -> None:
        """Remove the lock, and the output directory when acquiring created it and nothing was written since."""
        if not self.held:
            return
        self.path.unlink(missing_ok=True)
        self.held = False
        if self.created_dir and not any(self.output_dir.iterdir()):
            self.output_dir.rmdir()
