"""Wall-clock timing of stages inside a model's forward and backward, and peak memory.

A forward is one call, so its stages are timed by forward pre/post hooks on submodules. On a
GPU every boundary synchronises first: without that a stage would be charged for whatever
earlier kernels were still queued. The synchronisation also removes the overlap of launches
with execution, so a profiled step is slower than an unprofiled one; compare stages to the
profiled step, throughput to an unprofiled one.
"""
from __future__ import annotations

import resource
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from functools import partial
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else 0.5 * (ordered[middle - 1] + ordered[middle])


class StageTimer:
    """Seconds spent in named groups of submodules, accumulated over every call until :meth:`pop`.

    ``stages`` maps a stage name to its modules; a module called several times per forward
    (the encoder runs once for ITC text, once for ITC images and once fused) is charged for
    each call. The modules must not contain one another, or the inner time is counted twice.

    ``gradient_marks`` names modules whose output gradient is timestamped during backward:
    once it has arrived, everything downstream of that module has finished its backward, so
    backward end minus the mark is the module's own backward (when nothing else runs in
    parallel, true for the CNN, which is the root of the graph).
    """

    def __init__(self, stages: Dict[str, Sequence[nn.Module]], device: torch.device,
                 gradient_marks: Optional[Dict[str, nn.Module]] = None):
        self.device = device
        self.enabled = True
        """While False the hooks return at once, so profiled and plain steps can alternate."""
        self.seconds: Dict[str, float] = defaultdict(float)
        self.marks: Dict[str, float] = {}
        self._open: Dict[int, List[float]] = defaultdict(list)
        self._handles = []
        for name, modules in stages.items():
            for module in modules:
                self._handles.append(module.register_forward_pre_hook(partial(self._enter, name)))
                self._handles.append(module.register_forward_hook(partial(self._exit, name)))
        for name, module in (gradient_marks or {}).items():
            self._handles.append(module.register_forward_hook(partial(self._watch_gradient, name)))

    def _enter(self, name: str, module: nn.Module, args) -> None:
        if not self.enabled:
            return
        synchronize(self.device)
        self._open[id(module)].append(time.perf_counter())

    def _exit(self, name: str, module: nn.Module, args, output) -> None:
        if not self.enabled:
            return
        synchronize(self.device)
        self.seconds[name] += time.perf_counter() - self._open[id(module)].pop()

    def _watch_gradient(self, name: str, module: nn.Module, args, output) -> None:
        if self.enabled and isinstance(output, Tensor) and output.requires_grad:
            output.register_hook(partial(self._mark, name))

    def _mark(self, name: str, grad: Tensor) -> None:
        synchronize(self.device)
        # The earliest arrival, should a module have been called more than once.
        self.marks.setdefault(name, time.perf_counter())

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a block of the step itself (forward, backward, optimizer) under ``name``; its end
        is marked as ``<name>_end``, the reference for the gradient marks."""
        synchronize(self.device)
        start = time.perf_counter()
        yield
        synchronize(self.device)
        end = time.perf_counter()
        self.seconds[name] += end - start
        self.marks[f"{name}_end"] = end

    def pop(self) -> Tuple[Dict[str, float], Dict[str, float]]:
        """(seconds per stage, marks as ``time.perf_counter`` values) since the last pop."""
        seconds, marks = dict(self.seconds), dict(self.marks)
        self.seconds.clear()
        self.marks.clear()
        return seconds, marks

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def max_rss_bytes() -> int:
    """The process's peak resident set size so far (getrusage reports KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class PeakMemory:
    """Peak memory of a block: ``torch.cuda.max_memory_allocated`` on a GPU, else the process's max RSS.

    Max RSS is a high-water mark of the whole process (the Python heap, torch's CPU allocator, the
    data read so far), and only moves when the block exceeds every earlier peak; ``increase`` is
    therefore a lower bound of what the block needed.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.before = 0
        self.result: Dict[str, object] = {}

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            self.before = max_rss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.result = {"memory_measure": "torch.cuda.max_memory_allocated", "peak_mib": peak / 2**20,
                           "increase_mib": (peak - self.before) / 2**20}
        else:
            peak = max_rss_bytes()
            self.result = {"memory_measure": "max RSS of the process (resource.getrusage)", "peak_mib": peak / 2**20,
                           "increase_mib": (peak - self.before) / 2**20}
