"""Image-caption pairs downloaded by img2dataset (Conceptual Captions, SBU Captions, ...) -> ``pretrain`` shards.

CC3M and SBU are published as URLs with captions; https://github.com/rom1504/img2dataset downloads
them. With ``--output_format webdataset`` its output folder holds, per input shard (names
zero-padded to ``--oom_shard_count`` digits, 5 by default):

- ``00000.tar``: for every image that was downloaded and resized, ``<key>.jpg`` (``.png`` / ``.webp``
  with ``--encode_format``), ``<key>.txt`` (the caption; written when ``--caption_col`` is given) and
  ``<key>.json`` (metadata: the input columns ``url``, ``caption`` and any ``--save_additional_columns``,
  then ``key``, ``status``, ``error_message``, ``width``, ``height``, ``original_width``,
  ``original_height``, ``exif`` (``--extract_exif``, the default) and the hash named by
  ``--compute_hash`` (``sha256`` by default; ``md5`` in older versions)). The key is the shard id
  followed by the position in the shard (``000010005``: shard 1, sample 5).
- ``00000.parquet``: the same metadata for every input row, failed ones included (not read here).
- ``00000_stats.json``: ``{"count", "successes", "failed_to_download", "failed_to_resize", "duration",
  "status_dict", ...}``, written when the shard is finished.

Images img2dataset could not download or decode never reach the tars: the stats files' counts of
them are summed into the manifest (``img2dataset``). The tars are read member by member with
seeks over the image data (``tarfile`` mode ``r:``; one tar's member headers are held at a time);
images reach the writer as byte ranges of the tar, captions come from ``.txt``, else from the
``caption`` of ``.json``. A tar without tar's end-of-archive blocks (a shard img2dataset did not
finish, or a copy cut off) or holding fewer samples than its stats file counts is a listed problem.
"""
from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

from soho.data.convert.inputs import load_json
from soho.data.convert.writer import Conversion, Problem, Sample, TarMember, safe_key

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
STATS_COUNTS = ("count", "successes", "failed_to_download", "failed_to_resize")
END_OF_ARCHIVE = 2 * tarfile.BLOCKSIZE
"""A finished tar ends with (at least) two zero blocks."""

PathLike = Union[str, Path]
Item = Union[Sample, Problem]


def stats_path(tar: Path) -> Path:
    return tar.with_name(f"{tar.stem}_stats.json")


def read_stats(path: Path) -> Dict[str, Any]:
    """One shard's stats file; an error naming the file when it is not img2dataset's."""
    stats = load_json(path, "img2dataset stats file")
    if not isinstance(stats, dict) or not all(isinstance(stats.get(name), int) for name in STATS_COUNTS):
        raise ValueError(f"{path}: expected img2dataset's shard stats, a JSON object with integer "
                         f"{', '.join(STATS_COUNTS)}")
    return stats


def summarize_stats(folder: Path, tars: List[Path]) -> Tuple[Dict[str, Any], Dict[str, int]]:
    """The manifest entry about what img2dataset did (summed over its stats files), and each tar's successes."""
    stats = {path: read_stats(path) for path in sorted(folder.glob("*_stats.json"))}
    totals = {name: sum(entry[name] for entry in stats.values()) for name in STATS_COUNTS}
    failures: Counter = Counter()
    for entry in stats.values():
        status = entry.get("status_dict")
        if isinstance(status, dict):
            failures.update({reason: count for reason, count in status.items()
                             if reason != "success" and isinstance(count, int)})
    tar_stats = {tar.name: stats_path(tar) for tar in tars}
    summary = {
        "folder": str(folder), "tars": len(tars), "stats_files": len(stats), **totals,
        "not_downloaded": totals["failed_to_download"] + totals["failed_to_resize"],
        "most_common_failures": dict(failures.most_common(10)),
        "tars_without_stats": sorted(name for name, path in tar_stats.items() if path not in stats),
        "stats_without_tar": sorted(path.name for path in stats if path not in tar_stats.values()),
    }
    successes = {name: stats[path]["successes"] for name, path in tar_stats.items() if path in stats}
    return summary, successes


def _split_name(name: str) -> Tuple[str, str]:
    # webdataset's rule: the key ends at the first dot of the basename
    directory, _, base = name.rpartition("/")
    key, _, extension = base.partition(".")
    return (f"{directory}/{key}" if directory else key), extension.lower()


def grouped_members(tar: tarfile.TarFile) -> Iterator[Tuple[str, Dict[str, tarfile.TarInfo]]]:
    """(key, members by extension) of every sample; a sample's members are consecutive in the tar.

    A read error (a cut-off tar) is raised after the sample read so far, so that sample is not lost."""
    key, members, error = None, {}, None
    try:
        for member in tar:
            if not member.isfile():
                continue
            member_key, extension = _split_name(member.name)
            if member_key != key and members:
                yield key, members
                members = {}
            key = member_key
            members[extension] = member
    except (tarfile.TarError, OSError) as caught:
        error = caught
    if members:
        yield key, members
    if error is not None:
        raise error


def _read_text(tar: tarfile.TarFile, member: Optional[tarfile.TarInfo]) -> Optional[str]:
    if member is None:
        return None
    try:
        return tar.extractfile(member).read().decode("utf-8", errors="replace")
    except (tarfile.TarError, OSError):  # cut off with the tar
        return None


def make_sample(key: str, members: Dict[str, tarfile.TarInfo], tar: tarfile.TarFile, path: Path, tar_size: int,
                source: str) -> Item:
    """One img2dataset sample -> its output sample, or the problem that keeps it out."""
    where = f"{path.name}: {key}"
    image = next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)
    if image is None:
        return Problem(safe_key(key), "missing_image", f"{where} has no image member (members: {sorted(members)})")
    if image.offset_data + image.size > tar_size:  # its caption, written after it, is gone too
        return Problem(safe_key(key), "corrupt_image", f"{where}: {image.name} is cut off with the tar "
                                                       f"({tar_size - image.offset_data} of {image.size} bytes)")
    try:
        meta = json.loads(_read_text(tar, members.get("json")) or "null")
    except json.JSONDecodeError:
        meta = None
    meta = meta if isinstance(meta, dict) else {}
    caption = (_read_text(tar, members.get("txt")) or "").strip()
    if not caption and isinstance(meta.get("caption"), str):
        caption = meta["caption"].strip()
    if not caption:
        return Problem(safe_key(key), "missing_caption", f"{where}: no .txt caption and no caption in its .json")
    record: Dict[str, Any] = {"image_id": key, "captions": [caption], "source": source}
    if isinstance(meta.get("url"), str):
        record["url"] = meta["url"]
    return Sample(safe_key(key), record, {"": TarMember(str(path), image.name, image.offset_data, image.size)})


def _ends_properly(path: Path, offset: int) -> bool:
    with open(path, "rb") as stream:
        stream.seek(offset)
        block = stream.read(END_OF_ARCHIVE)
    return len(block) == END_OF_ARCHIVE and not block.strip(b"\0")


def tar_stream(path: Path, source: str, successes: Optional[int]) -> Iterator[Item]:
    """The samples of one img2dataset tar, then a problem if the tar is cut off or short of its stats."""
    try:
        tar = tarfile.open(path, "r:")
    except (tarfile.TarError, OSError) as error:
        yield Problem(path.name, "unreadable_tar", f"{path}: {error!r}")
        return
    found, cut, size = 0, None, path.stat().st_size
    with tar:
        try:
            for key, members in grouped_members(tar):
                found += 1
                yield make_sample(key, members, tar, path, size, source)
            if not _ends_properly(path, tar.offset):
                # tarfile stops quietly at a cut-off header: what followed must still be reported.
                cut = "no end-of-archive blocks"
        except (tarfile.TarError, OSError) as error:
            cut = repr(error)
    expected = f"; {stats_path(path).name} counts {successes} images written" if successes is not None else ""
    if cut is not None:
        yield Problem(path.name, "truncated_tar", f"{path} is cut off after {found} samples ({cut}): a shard "
                                                  f"img2dataset did not finish, or a broken copy{expected}")
    elif successes is not None and found != successes:
        yield Problem(path.name, "sample_count_mismatch", f"{path} holds {found} samples{expected}")


def folder_stream(tars: List[Path], source: str, successes: Dict[str, int]) -> Iterator[Item]:
    for path in tars:
        yield from tar_stream(path, source, successes.get(path.name))


def convert_img2dataset(folder: PathLike, source: str, split: str = "pretrain") -> Conversion:
    """The plan for ``split`` shards (image-text) from an img2dataset webdataset output ``folder``.

    ``source`` names the dataset in every record (``cc3m``, ``sbu``, ...). The folder and its stats
    files are checked here, before any work."""
    folder = Path(folder)
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"source must name the dataset (e.g. cc3m, sbu), got {source!r}")
    if not folder.is_dir():
        raise FileNotFoundError(f"img2dataset output folder not found: {folder}")
    tars = sorted(folder.glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"no .tar shards in {folder} (run img2dataset with --output_format webdataset)")
    summary, successes = summarize_stats(folder, tars)
    return Conversion(
        converter="img2dataset",
        splits={split: folder_stream(tars, source, successes)},
        tasks={split: "image_text"},
        inputs={"folder": str(folder), "source": source},
        extra={"img2dataset": summary},
    )
