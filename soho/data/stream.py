"""The base of every batch stream: shards -> decoded samples -> batches, with the bookkeeping that
logging and exact resumption need.

A stream reads its (rank, DataLoader worker) slice of the shards (:func:`soho.data.shards.worker_stream`),
decodes each sample (a sample that cannot be used is skipped, logged and counted, never dropped
silently) and collates ``batch_size`` of them. A training stream that finds nothing usable in
:data:`~soho.data.shards.MAX_SKIPS_IN_A_ROW` attempts in a row stops with a
:class:`~soho.data.shards.DataError` rather than spin. Every batch says which reader made it (``worker``), how
many shuffled samples that reader had handed out (``position``), how many it skipped since its last
batch and why (``skipped``), and how many samples it holds (``samples``). ``start_positions`` (worker ->
position) skips what a checkpointed run had already seen, undecoded, so a resumed run sees the batches
an uninterrupted one would have. Randomness in decoding and collating is keyed by the stream position
for the same reason.
"""
from __future__ import annotations

import signal
from collections import Counter
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, IterableDataset

from soho.data.samples import SampleError
from soho.data.shards import MAX_SKIPS_IN_A_ROW, Sample, expand_urls, fast_forward, worker_stream
from soho.train.signals import STOP_SIGNALS


class ShardStream(IterableDataset):
    """Batches of one rank's slice of ``shards``. Subclasses implement :meth:`decode` and :meth:`collate`.

    ``repeat=True``: an infinite, shuffled stream (training). ``repeat=False``: one pass over the slice,
    ending with a last partial batch (or, when only skips remain, a batch of ``samples=0`` that reports
    them), so that over all ranks every usable sample is seen exactly once.
    """

    def __init__(self, shards: Union[str, Sequence[str]], batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, repeat: bool = True, shuffle_buffer: int = 0, resampled: bool = False,
                 start_positions: Optional[Dict[int, int]] = None):
        super().__init__()
        self.urls = expand_urls(shards)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.repeat = repeat
        self.shuffle_buffer = shuffle_buffer
        self.resampled = resampled
        self.start_positions = dict(start_positions or {})

    def decode(self, sample: Sample, key: int) -> Any:
        """One usable item from a raw sample, or :class:`SampleError`. ``key`` seeds any randomness."""
        raise NotImplementedError

    def collate(self, items: List[Any], key: int) -> Dict[str, Any]:
        """A batch from decoded items. ``key`` seeds any randomness."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        # A one-pass stream ends by itself; an endless one must give up on data it cannot use.
        samples, skips, worker, reader_seed = worker_stream(
            self.urls, self.seed, self.rank, self.world_size, self.repeat, self.shuffle_buffer, self.resampled,
            max_skips_in_a_row=MAX_SKIPS_IN_A_ROW if self.repeat else None)
        position = fast_forward(samples, self.start_positions.get(worker, 0))
        items: List[Any] = []
        reported: Counter = Counter()
        for sample in samples:
            position += 1
            try:
                items.append(self.decode(sample, hash((reader_seed, position))))
            except SampleError as error:
                skips.skip(error.reason, f"{sample.get('__url__', '')}:{sample.get('__key__', '?')}", error)
                continue
            skips.note_usable()
            if len(items) == self.batch_size:
                yield self._batch(items, reader_seed, worker, position, skips - reported)
                reported = Counter(skips)
                items = []
        if items:
            yield self._batch(items, reader_seed, worker, position, skips - reported)
        elif skips - reported:
            yield {"skipped": dict(skips - reported), "samples": 0, "worker": worker, "position": position}

    def _batch(self, items: List[Any], reader_seed: int, worker: int, position: int,
               skipped: Counter) -> Dict[str, Any]:
        batch = self.collate(items, hash((reader_seed, position)) & 0x7FFFFFFF)
        batch.update(worker=worker, position=position, skipped=dict(skipped), samples=len(items))
        return batch


def ignore_stop_signals(worker_id: int) -> None:
    """A worker leaves SIGTERM and SIGINT to the main process (soho/train/signals.py), which shuts it down.
    Launchers signal whole process groups, and a worker killed mid-batch would make the main process fail
    before it could write its checkpoint."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def stream_loader(stream: IterableDataset, num_workers: int, seed: int, pin_memory: bool = False) -> DataLoader:
    """Batches are built inside the workers, so the loader passes them through unchanged.

    The loader gets its own generator: drawing its base seed from the global one would shift the
    model's random stream, and a resumed run would diverge from the original. Its workers ignore stop
    signals (:func:`ignore_stop_signals`): iterate it with :func:`loader_batches`.
    """
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None,
                      generator=torch.Generator().manual_seed(seed), worker_init_fn=ignore_stop_signals)


@contextmanager
def loader_batches(loader: DataLoader) -> Iterator[Iterator[Dict[str, Any]]]:
    """Iterate ``loader``; its workers are shut down on leaving, an error included. They ignore stop signals
    (:func:`ignore_stop_signals`), so nothing else would stop them: Python's exit would wait for them forever."""
    batches = iter(loader)
    try:
        yield batches
    finally:
        # torch's multi-process iterator; one that reads in the main process (num_workers=0) has no workers.
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
