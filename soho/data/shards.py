"""Webdataset shards: listing, splitting across ranks and workers, reading, shuffling.

Streams here are deterministic functions of (seed, epoch, rank, worker), which is
what lets a resumed run skip exactly the samples it has already seen.
"""
from __future__ import annotations

import glob
import logging
import os
import random
import tarfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from braceexpand import braceexpand
from torch.utils.data import get_worker_info

from soho.errors import UserError

logger = logging.getLogger(__name__)

Sample = Dict[str, Any]

MAX_SKIPS_IN_A_ROW = 1000
"""A training stream that skips this many samples or shards in a row, with nothing usable in between, stops
with a :class:`DataError`: its data is broken, and it would otherwise spin forever."""
LOGGED_SKIPS_PER_REASON = 5
"""Skips of one reason logged one by one; later ones only in a summary, at most every SKIP_SUMMARY_SECONDS."""
SKIP_SUMMARY_SECONDS = 60.0


class DataError(UserError):
    """Shards that cannot be used: missing, empty, unreadable, or without a usable sample."""

    def __init__(self, message: str):
        # Raised in a DataLoader worker, it reaches the main process rebuilt from the worker's formatted
        # traceback (torch's ExceptionWrapper): what the user needs is the message, not the worker's stack.
        super().__init__(message.strip().rpartition(f"{__name__}.DataError: ")[2])


def describe_shards(urls: Sequence[str]) -> str:
    """``3 shards (a.tar, b.tar, c.tar)``; the first three and how many more."""
    more = f" and {len(urls) - 3} more" if len(urls) > 3 else ""
    return f"{len(urls)} shard{'s' if len(urls) != 1 else ''} ({', '.join(urls[:3])}{more})"


def expand_urls(spec: Union[str, Sequence[str]]) -> List[str]:
    """Shard paths from a directory, a brace pattern (``shard-{000..009}.tar``), a glob, or a list of these."""
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    urls: List[str] = []
    for item in specs:
        for expanded in braceexpand(str(item)):
            if os.path.isdir(expanded):
                found = sorted(str(p) for p in Path(expanded).glob("*.tar"))
                if not found:
                    raise DataError(f"no .tar shards in directory {expanded}")
                urls.extend(found)
                continue
            matches = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]
            missing = [m for m in matches if not os.path.isfile(m)]
            if not matches or missing:
                origin = f" (from {item!r})" if str(item) != expanded else ""
                raise DataError(f"shard not found: {missing[0] if missing else expanded}{origin}")
            urls.extend(matches)
    if not urls:
        raise DataError(f"no shards found for {spec!r}")
    return urls


class SkipCounter(Counter):
    """Samples (and shards) dropped from a stream, by reason: nothing is dropped silently, and nothing floods
    the log. The first LOGGED_SKIPS_PER_REASON skips of each reason are logged one by one, later ones in a
    summary at most every SKIP_SUMMARY_SECONDS.

    With ``limit``, ``limit`` skips or empty shards in a row (no :meth:`note_usable` in between) raise a
    :class:`DataError` naming ``source`` and the reasons.
    """

    def __init__(self, *counts, limit: Optional[int] = None, source: str = ""):
        super().__init__(*counts)
        self.limit = limit
        self.source = source
        self.empty_shards = 0
        self.in_a_row = 0
        self.last_summary = time.monotonic()

    def skip(self, reason: str, key: str, detail: Any = "") -> None:
        self[reason] += 1
        if self[reason] <= LOGGED_SKIPS_PER_REASON:
            later = " (further skips of this reason are summarised)" if self[reason] == LOGGED_SKIPS_PER_REASON else ""
            logger.warning("skipping sample %s: %s %s%s", key, reason, detail, later)
        elif time.monotonic() - self.last_summary > SKIP_SUMMARY_SECONDS:
            self.last_summary = time.monotonic()
            logger.warning("skipped so far%s: %s", f" in {self.source}" if self.source else "", self.summary())
        self._nothing_usable(key)

    def empty_shard(self, url: str) -> None:
        """A shard without files (a converter writes one when every sample it planned was unusable): no sample
        is skipped, but nothing usable came either."""
        self.empty_shards += 1
        self._nothing_usable(url)

    def note_usable(self) -> None:
        """A usable sample came: the run of skips is broken."""
        self.in_a_row = 0

    def summary(self) -> str:
        counts = [f"{reason} {count}" for reason, count in self.most_common()]
        return ", ".join(counts + ([f"empty shards {self.empty_shards}"] if self.empty_shards else [])) or "nothing"

    def _nothing_usable(self, key: str) -> None:
        self.in_a_row += 1
        if self.limit is not None and self.in_a_row >= self.limit:
            examples = "; the warnings above show examples of each reason" if self else ""
            raise DataError(f"{self.source or key}: no usable sample in {self.in_a_row} attempts in a row (so far: "
                            f"{self.summary()}){examples}")


def _split_name(name: str) -> Tuple[str, str]:
    """``dir/abc.left.jpg`` -> (``dir/abc``, ``left.jpg``): webdataset's rule, the first dot of the basename."""
    directory, _, base = name.rpartition("/")
    key, _, extension = base.partition(".")
    return (f"{directory}/{key}" if directory else key), extension


def read_shard(url: str, skips: SkipCounter) -> Iterator[Sample]:
    """Samples (raw bytes by extension, plus ``__key__`` and ``__url__``) of one tar shard.

    Members sharing a key form one sample, as in webdataset. A truncated, unreadable or
    empty shard ends with a counted skip: Python's tarfile would otherwise stop quietly at a
    cut-off header and the rest of the shard would vanish unnoticed.
    """
    sample: Sample = {}
    found = False
    try:
        with open(url, "rb") as stream:
            tar = tarfile.open(fileobj=stream, mode="r|")
            for member in tar:
                if not member.isfile():
                    continue
                key, extension = _split_name(member.name)
                if sample and sample["__key__"] != key:
                    yield sample
                    sample = {}
                if not sample:
                    sample = {"__key__": key, "__url__": url}
                    found = True
                sample[extension.lower()] = tar.extractfile(member).read()
            if sample:
                yield sample
                sample = {}
            stream.seek(tar.offset)
            if stream.read().strip(b"\0"):
                skips.skip("truncated_shard", url, f"data after byte {tar.offset} is not a tar member")
            elif not found:
                skips.empty_shard(url)
    except (OSError, tarfile.TarError) as error:
        skips.skip("unreadable_shard", url, repr(error))


def stream_samples(urls: Sequence[str], seed: int, rank: int, world_size: int, worker: int, num_workers: int,
                   skips: SkipCounter, repeat: bool, resampled: bool = False) -> Iterator[Sample]:
    """The raw samples one (rank, worker) reads; disjoint from every other (rank, worker).

    With at least as many shards as readers, whole shards are dealt out; with fewer,
    every reader opens every shard and keeps every n-th sample, so small data sets
    still split without duplicates. ``repeat`` restarts with a new shard order each
    epoch; ``resampled`` draws shards with replacement forever (reader-specific seed).
    """
    reader, readers = rank * num_workers + worker, world_size * num_workers
    if resampled:
        rng = random.Random(hash((seed, reader)))
        while True:
            yield from read_shard(rng.choice(urls), skips)
    epoch = 0
    while True:
        order = list(urls)
        random.Random(hash((seed, epoch))).shuffle(order)
        if len(order) >= readers:
            for url in order[reader::readers]:
                yield from read_shard(url, skips)
        else:
            position = 0
            for url in order:
                for sample in read_shard(url, skips):
                    if position % readers == reader:
                        yield sample
                    position += 1
        epoch += 1
        if not repeat:
            return


def shuffle(samples: Iterable[Sample], buffer_size: int, seed: int) -> Iterator[Sample]:
    """Shuffle within a bounded buffer (memory stays constant; mixing grows with the buffer)."""
    if buffer_size <= 1:
        yield from samples
        return
    rng = random.Random(seed)
    buffer: List[Sample] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        index = rng.randrange(buffer_size)
        buffer[index], sample = sample, buffer[index]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


def worker_stream(urls: Sequence[str], seed: int, rank: int, world_size: int, repeat: bool, shuffle_buffer: int,
                  resampled: bool = False, max_skips_in_a_row: Optional[int] = None,
                  ) -> Tuple[Iterator[Sample], SkipCounter, int, int]:
    """The shuffled raw samples of the calling DataLoader worker (or of the main process).

    Returns the stream, its skip counter (``max_skips_in_a_row``: its limit), the worker id and the reader's
    seed (for any other randomness that must be reproducible per reader).
    """
    info = get_worker_info()
    worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    reader_seed = hash((seed, rank, worker))
    skips = SkipCounter(limit=max_skips_in_a_row,
                        source=f"{describe_shards(urls)}, read by rank {rank} worker {worker}")
    samples = stream_samples(urls, seed, rank, world_size, worker, num_workers, skips, repeat=repeat,
                             resampled=resampled)
    return shuffle(samples, shuffle_buffer, reader_seed), skips, worker, reader_seed


def fast_forward(samples: Iterator[Sample], count: int) -> int:
    """Draw (without decoding) up to ``count`` samples a resumed stream had already handed out; returns how
    many were drawn (fewer only when a one-pass stream ends first)."""
    drawn = 0
    while drawn < count and next(samples, None) is not None:
        drawn += 1
    return drawn


def check_skip_fraction(skipped: int, seen: int, limit: float) -> None:
    """Stop a run whose data is broken: more than ``limit`` of at least 100 samples skipped."""
    if seen >= 100 and skipped / seen > limit:
        raise DataError(f"{skipped} of {seen} samples were skipped ({skipped / seen:.1%} > "
                        f"data.max_skip_fraction={limit}); the data is broken, see the warnings above "
                        "for which samples and why")
