"""Stopping a run cleanly when its machine is taken away: SIGTERM (what Slurm, Kubernetes and torchrun send
before they kill a job) and SIGINT (Ctrl+C).

While :class:`StopSignals` is active, the first signal only raises a flag (:func:`stop_signal`). The trainer
(soho/train/trainer.py) reads it at the next step boundary, where every process agrees to stop, writes a
checkpoint and ends with exit code 128 + the signal number; evaluation loops read it between batches and stop
early. A second signal ends the process at once, without a checkpoint. Signals less than
:data:`REPEAT_SECONDS` apart count as one: Ctrl+C reaches every process of the terminal's foreground group,
and ``accelerate launch`` then sends a SIGTERM of its own.

DataLoader workers ignore both signals (soho/data/stream.py): launchers signal whole process groups, and a
worker killed mid-batch would make the main process fail before it could save.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Optional

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_SECONDS = 2.0

_received: Optional[int] = None
_received_at = 0.0


def stop_signal() -> Optional[int]:
    """The stop signal this process received while a :class:`StopSignals` was active, else None."""
    return _received


def stop_requested() -> bool:
    return _received is not None


def _handle(signum: int, frame) -> None:
    global _received, _received_at
    name = signal.Signals(signum).name
    now = time.monotonic()
    if _received is None:
        _received, _received_at = signum, now
        logger.warning("received %s: stopping after the current step, with a checkpoint (exit code %d); a second "
                       "signal exits at once, without one", name, 128 + signum)
    elif now - _received_at > REPEAT_SECONDS:
        # os._exit: nothing may run any more, not even a cleanup that could block.
        os.write(2, f"received {name} again: exiting at once, without a checkpoint\n".encode())
        os._exit(128 + signum)


class StopSignals:
    """Context manager: SIGTERM and SIGINT raise the stop flag instead of ending the process; on exit the flag
    is lowered and the previous handlers come back. Python delivers signals to the main thread only, so
    elsewhere it does nothing."""

    def __enter__(self) -> "StopSignals":
        global _received
        _received = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {signum: signal.signal(signum, _handle) for signum in STOP_SIGNALS}
        else:
            logger.warning("not on the main thread: SIGTERM and SIGINT will end the run without a checkpoint")
        return self

    def __exit__(self, *exc_info) -> None:
        global _received
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        _received = None  # evaluation loops run after the run must not find the flag still raised
