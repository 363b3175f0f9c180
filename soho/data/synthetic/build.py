"""Generating a world on disk: every split through the converters' writer, then its tokenizer."""
from __future__ import annotations

import functools
import itertools
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

from soho.data.convert.writer import MANIFEST, Conversion, Sample, convert
from soho.data.synthetic.config import SPLITS, SyntheticWorldConfig, split_task
from soho.data.synthetic.samples import make_group, texts_of

CONVERTER = "synthetic"
TOKENIZER = "tokenizer"
_GROUPS_PER_TASK = 32
"""Groups a worker makes per round trip: enough to amortise the inter-process overhead."""

GroupMap = Callable[[Callable[[int], List[Sample]], Iterable[int]], Iterable[List[Sample]]]


def _group_samples(config: SyntheticWorldConfig, split: str, index: int) -> List[Sample]:
    return [sample for sample, _ in make_group(config, split, index)]


def _split_samples(config: SyntheticWorldConfig, split: str, map_groups: GroupMap, texts: List[str],
                   tally: Dict[str, Any]) -> Iterator[Sample]:
    """The samples of ``split`` in order, their texts appended to ``texts`` and counted in ``tally`` on the way."""
    total = config.split_sizes[split]
    groups = range(-(-total // config.group_size(split)))
    made = map_groups(functools.partial(_group_samples, config, split), groups)
    # The last group is cut short where the split's size is not a multiple of the group size.
    for sample in itertools.islice(itertools.chain.from_iterable(made), total):
        texts.extend(texts_of(sample.record))
        tally["texts"] = len(texts)
        yield sample


def _writer_task(split: str) -> str:
    """The task name the converters' manifests use for ``split``."""
    task = split_task(split)
    return "image_text" if task in ("pretrain", "retrieval") else task


def _remove_other_splits(root: Path, splits: Iterable[str]) -> None:
    """Shards of splits an earlier world had and this one has not: directory readers would find them."""
    for split in set(SPLITS) - set(splits):
        for path in (root / split).glob(f"{split}-*.tar*") if (root / split).is_dir() else ():
            path.unlink()


def generate_world(config: SyntheticWorldConfig, root: str | Path) -> Dict[str, Any]:
    """Write every split of ``config.split_sizes`` as shards under ``root`` with ``soho/data/convert/writer.py``,
    then train a WordPiece tokenizer on all their text into ``root/tokenizer``.

    Returns the manifest (``root/manifest.json``), in the converters' format: ``inputs`` are
    ``config.settings()``, and ``tokenizer``, ``texts`` (how many it was trained on) and
    ``num_workers`` are added."""
    from soho.tokenizer import train_wordpiece_tokenizer

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    # Gone before the new manifest is written, so a run that dies while training the tokenizer
    # leaves a world that ensure_world regenerates, not new shards beside an old tokenizer.
    shutil.rmtree(root / TOKENIZER, ignore_errors=True)
    splits = [split for split in SPLITS if config.split_sizes.get(split, 0) > 0]
    _remove_other_splits(root, splits)
    texts: List[str] = []
    extra = {TOKENIZER: TOKENIZER, "texts": 0, "num_workers": config.num_workers}
    # Samples are made in the worker processes and written in this one: making them is nearly
    # all of the work, while the writer only needs their bytes.
    pool = ProcessPoolExecutor(config.num_workers) if config.num_workers > 1 else None
    map_groups = functools.partial(pool.map, chunksize=_GROUPS_PER_TASK) if pool else map
    conversion = Conversion(
        converter=CONVERTER,
        splits={split: _split_samples(config, split, map_groups, texts, extra) for split in splits},
        tasks={split: _writer_task(split) for split in splits},
        inputs=config.settings(),
        extra=extra,
    )
    try:
        manifest = convert(conversion, root, shard_size=config.shard_size)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    partial = root / f"{TOKENIZER}.tmp"
    shutil.rmtree(partial, ignore_errors=True)
    train_wordpiece_tokenizer(texts, partial, vocab_size=config.tokenizer_vocab_size)
    os.replace(partial, root / TOKENIZER)
    return manifest


def _is_current(root: Path, config: SyntheticWorldConfig) -> bool:
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if manifest.get("converter") != CONVERTER or manifest.get("inputs") != json.loads(json.dumps(config.settings())):
        return False
    shards = [s["path"] for entry in manifest.get("splits", {}).values() for s in entry["shards"]]
    return (root / TOKENIZER).is_dir() and all((root / p).is_file() for p in shards)


def ensure_world(root: str | Path, config: Optional[SyntheticWorldConfig] = None) -> Path:
    """``root``, after generating the world there unless a complete one with the same settings exists."""
    config = config or SyntheticWorldConfig()
    root = Path(root)
    if not _is_current(root, config):
        generate_world(config, root)
    return root
