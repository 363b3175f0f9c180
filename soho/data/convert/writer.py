"""Writing converted datasets: checked images, shards, resumable parallel jobs, the manifest.

A converter turns a dataset's own files into a plan: per split, a stream of
``Sample`` (one output sample: its key, JSON record and image files) and ``Problem``
(an input record that cannot become a sample, with the reason). ``convert`` cuts
every split into shards of ``shard_size`` planned samples, writes them in worker
processes (each image file opened, checked and optionally resized on the way; an
``EncodedImage`` already in memory is stored as it is), and writes
``manifest.json``: counts per split, every dropped record with its reason, and the
sha256 of every shard.

Only the plan's current shard and the writers' in-flight shards are held in memory,
so images are streamed whatever the dataset's size. A shard is written under a
temporary name and then renamed, and described by a small ``<shard>.json`` beside
it; a resumed conversion keeps every shard whose description matches the planned
samples and the settings, and rewrites the rest.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import re
import time
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Set, Tuple, Union

import webdataset as wds
from PIL import Image

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STORED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
"""Formats readers decode as they are (``soho.data.pretraining.IMAGE_KEYS``); others are re-encoded as PNG."""


@dataclass(frozen=True)
class TarMember:
    """An image inside another tar file (e.g. img2dataset's shards), read by its byte range
    (``tarfile.TarInfo.offset_data`` and ``size``) without scanning the tar again."""
    tar: str
    name: str
    offset: int
    size: int


@dataclass(frozen=True)
class EncodedImage:
    """An image already encoded in memory in a format the readers take, e.g. one a generator has
    just drawn (``soho/data/synthetic/samples.py``).

    Stored byte for byte whatever the ``WriteOptions``: it is neither decoded nor resized, and
    the record, written by whoever encoded the image, is left as it is."""
    data: bytes = field(repr=False)
    extension: str

    def __post_init__(self):
        if self.extension not in STORED_FORMATS.values():
            raise ValueError(f"extension must be one of {', '.join(STORED_FORMATS.values())}, got {self.extension!r}")


ImageRef = Union[str, Path, TarMember, EncodedImage]


@dataclass
class Sample:
    """One output sample.

    ``images`` maps a slot to its file: slot ``""`` is stored as ``<key>.<ext>``, any other
    slot as ``<key>.<slot>.<ext>`` (NLVR2's ``left`` / ``right``). For a ``""`` image read from
    a file (a path or a ``TarMember``), the writer sets ``width`` and ``height`` of the stored image in the record, and
    rescales every ``box`` (``[x0, y0, x1, y1]`` in pixels) anywhere in the record when it
    resizes that image.
    """
    key: str
    record: Dict[str, Any]
    images: Dict[str, ImageRef]


@dataclass
class Problem:
    """An input record that is not in the output, and why."""
    key: str
    reason: str
    detail: str = ""
    split: str = ""


@dataclass(frozen=True)
class WriteOptions:
    max_short_side: Optional[int] = None
    """Resize images whose shorter side is longer than this (aspect kept); ``None`` keeps them as they are."""
    max_long_side: Optional[int] = None
    """A cap on the longer side as well, applied with ``max_short_side`` (SOHO: 600 / 1000)."""
    jpeg_quality: int = 95


class ImageProblem(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


def safe_key(text: str) -> str:
    """A webdataset key for an id: no dots (they start the extension), slashes or other punctuation.

    The original id stays in the record; converters check keys are unique within a split."""
    return _KEY_UNSAFE.sub("_", str(text))


def read_image_bytes(ref: ImageRef) -> bytes:
    if isinstance(ref, TarMember):
        try:
            with open(ref.tar, "rb") as stream:
                stream.seek(ref.offset)
                data = stream.read(ref.size)
        except OSError as error:
            raise ImageProblem("missing_image", f"{ref.tar}: {error!r}") from None
        if len(data) != ref.size:
            raise ImageProblem("corrupt_image", f"{ref.name} in {ref.tar}: cut off at {len(data)} of {ref.size} bytes")
        return data
    try:
        return Path(ref).read_bytes()
    except FileNotFoundError:
        raise ImageProblem("missing_image", f"{ref} does not exist") from None
    except OSError as error:
        raise ImageProblem("missing_image", f"{ref}: {error!r}") from None


def _target_size(width: int, height: int, options: WriteOptions) -> Tuple[int, int]:
    scale = 1.0
    if options.max_short_side and min(width, height) > options.max_short_side:
        scale = options.max_short_side / min(width, height)
    if options.max_long_side and max(width, height) * scale > options.max_long_side:
        scale = options.max_long_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def prepare_image(data: bytes, options: WriteOptions, name: str = "") -> Tuple[bytes, str, Tuple[int, int],
                                                                              Tuple[float, float]]:
    """(stored bytes, extension, (width, height) stored, (x scale, y scale)) of an image file's bytes.

    The image is fully decoded, so truncated files are caught here and not in training.
    Images already within the size caps keep their original bytes; the others are stored
    as RGB JPEG (resized) or PNG (a format the readers do not take)."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as error:  # PIL raises many types for corrupt data
        raise ImageProblem("corrupt_image", f"{name}: {error!r}") from None
    width, height = image.size
    target = _target_size(width, height, options)
    if target == (width, height) and image.format in STORED_FORMATS:
        return data, STORED_FORMATS[image.format], (width, height), (1.0, 1.0)
    buffer = io.BytesIO()
    try:
        # Readers decode to RGB anyway; converting first also makes CMYK or 16-bit files storable.
        if target != (width, height):
            image.convert("RGB").resize(target, Image.BICUBIC).save(buffer, format="JPEG",
                                                                     quality=options.jpeg_quality)
        else:
            image.convert("RGB").save(buffer, format="PNG")
    except (OSError, ValueError) as error:
        raise ImageProblem("corrupt_image", f"{name}: cannot re-encode: {error!r}") from None
    extension = "jpg" if target != (width, height) else "png"
    return buffer.getvalue(), extension, target, (target[0] / width, target[1] / height)


def scale_boxes(value: Any, scale: Tuple[float, float]) -> Any:
    """``value`` with every ``box`` entry ``[x0, y0, x1, y1]``, at any depth, scaled by (x scale, y scale)."""
    if isinstance(value, dict):
        return {key: [round(c * scale[i % 2], 2) for i, c in enumerate(item)] if key == "box"
                else scale_boxes(item, scale) for key, item in value.items()}
    if isinstance(value, list):
        return [scale_boxes(item, scale) for item in value]
    return value


# ----------------------------------------------------------------------------- shards

def shard_path(root: Path, split: str, index: int) -> Path:
    return root / split / f"{split}-{index:06d}.tar"


def _keys_digest(samples: List[Sample]) -> str:
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(sample.key.encode() + b"\0")
        digest.update(json.dumps(sample.record, sort_keys=True).encode() + b"\0")
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ShardJob:
    root: str
    split: str
    index: int
    samples: List[Sample]
    options: WriteOptions
    settings_digest: str

    @property
    def path(self) -> Path:
        return shard_path(Path(self.root), self.split, self.index)

    @property
    def description_path(self) -> Path:
        return self.path.with_name(self.path.name + ".json")


def _describe(job: ShardJob, samples: int, images: int, problems: List[Problem]) -> Dict[str, Any]:
    return {
        "path": job.path.relative_to(job.root).as_posix(),
        "samples": samples,
        "images": images,
        "sha256": _file_sha256(job.path),
        "planned": len(job.samples),
        "plan_digest": _keys_digest(job.samples),
        "settings_digest": job.settings_digest,
        "problems": [asdict(p) for p in problems],
    }


def write_shard(job: ShardJob) -> Dict[str, Any]:
    """Write one shard (images read, checked and prepared here) and its description; returns the description."""
    problems: List[Problem] = []
    samples = images = 0
    partial = job.path.with_name(job.path.name + ".tmp")
    with open(partial, "wb") as stream:
        # Fixed mtime: the bytes depend on the data only, so reruns give the same checksums.
        with wds.TarWriter(stream, encoder=False, mtime=0) as writer:
            for sample in job.samples:
                members: Dict[str, bytes] = {}
                record = dict(sample.record)
                try:
                    for slot, ref in sample.images.items():
                        if isinstance(ref, EncodedImage):
                            data, extension = ref.data, ref.extension
                        else:
                            data, extension, (width, height), scale = prepare_image(
                                read_image_bytes(ref), job.options, name=str(ref))
                            if not slot:
                                record["width"], record["height"] = width, height
                                if scale != (1.0, 1.0):
                                    record = scale_boxes(record, scale)
                        members[f"{slot}.{extension}" if slot else extension] = data
                except ImageProblem as problem:
                    problems.append(Problem(sample.key, problem.reason, problem.detail, job.split))
                    continue
                members["json"] = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()
                writer.write({"__key__": sample.key, **members})
                samples += 1
                images += len(sample.images)
    os.replace(partial, job.path)
    description = _describe(job, samples, images, problems)
    partial_description = job.description_path.with_name(job.description_path.name + ".tmp")
    partial_description.write_text(json.dumps(description, indent=1) + "\n")
    os.replace(partial_description, job.description_path)
    return description


def _finished(job: ShardJob) -> Optional[Dict[str, Any]]:
    """The description of ``job``'s shard when an earlier run wrote exactly this shard."""
    try:
        description = json.loads(job.description_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if (description.get("settings_digest") != job.settings_digest or description.get("planned") != len(job.samples)
            or description.get("plan_digest") != _keys_digest(job.samples) or not job.path.is_file()
            or _file_sha256(job.path) != description.get("sha256")):
        return None
    return description


# ----------------------------------------------------------------------------- conversion

@dataclass
class Conversion:
    """What a converter plans: per split, its task (``image_text``, ``nlvr2``, ``ve``, ``vqa``, ...)
    and its stream of samples and problems, plus what describes the inputs in the manifest."""
    converter: str
    splits: Mapping[str, Iterable[Union[Sample, Problem]]]
    tasks: Mapping[str, str]
    inputs: Dict[str, Any] = field(default_factory=dict)
    extra: Dict[str, Any] = field(default_factory=dict)
    """More manifest entries (e.g. an answer vocabulary's size). Read after every split's stream
    is exhausted, so a converter may fill tallies in here while its streams are consumed."""


def _plan_jobs(conversion: Conversion, root: Path, shard_size: int, options: WriteOptions, settings_digest: str,
               planning_problems: List[Problem]) -> Iterator[ShardJob]:
    for split, items in conversion.splits.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        keys: Set[str] = set()
        batch: List[Sample] = []
        index = 0
        for item in items:
            if isinstance(item, Problem):
                item.split = split
                planning_problems.append(item)
                continue
            if item.key in keys:
                planning_problems.append(Problem(item.key, "duplicate_key", "an earlier sample has this key", split))
                continue
            keys.add(item.key)
            batch.append(item)
            if len(batch) == shard_size:
                yield ShardJob(str(root), split, index, batch, options, settings_digest)
                batch, index = [], index + 1
        if batch or index == 0:
            yield ShardJob(str(root), split, index, batch, options, settings_digest)


def _remove_stale(root: Path, splits: Iterable[str], keep: Set[str]) -> None:
    """Shards of an earlier, larger conversion: directory readers glob ``*.tar`` and would mix them in."""
    for split in splits:
        for path in (root / split).glob(f"{split}-*.tar*"):
            if str(path.with_name(path.name.split(".tar")[0] + ".tar")) not in keep:
                path.unlink()


def convert(conversion: Conversion, root: Union[str, Path], shard_size: int = 1000, workers: int = 1,
            options: WriteOptions = WriteOptions(), resume: bool = False) -> Dict[str, Any]:
    """Write ``conversion`` as shards under ``root/<split>/`` and return the manifest (also in ``root/manifest.json``).

    ``workers`` processes write shards in parallel; at most two shards per worker are
    planned ahead, so memory does not grow with the dataset. With ``resume``, shards an
    earlier run finished with the same samples and settings are kept."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    (root / MANIFEST).unlink(missing_ok=True)  # no manifest vouches for a half-finished conversion
    settings = {"converter": conversion.converter, "shard_size": shard_size, **asdict(options)}
    settings_digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    planning_problems: List[Problem] = []
    descriptions: Dict[Tuple[str, int], Dict[str, Any]] = {}
    kept = 0

    def finish(job: ShardJob, description: Dict[str, Any]) -> None:
        descriptions[job.split, job.index] = description
        logger.info("%s: %d samples, %d problems", description["path"], description["samples"],
                    len(description["problems"]))

    jobs = _plan_jobs(conversion, root, shard_size, options, settings_digest, planning_problems)
    pool: Optional[Executor] = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    pending: Dict[Future, ShardJob] = {}
    try:
        for job in jobs:
            previous = _finished(job) if resume else None
            if previous is not None:
                finish(job, previous)
                kept += 1
            elif pool is None:
                finish(job, write_shard(job))
            else:
                while len(pending) >= 2 * workers:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        finish(pending.pop(future), future.result())
                pending[pool.submit(write_shard, job)] = job
        for future in list(pending):
            finish(pending.pop(future), future.result())
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    _remove_stale(root, conversion.splits, {str(shard_path(root, s, i)) for s, i in descriptions})
    manifest = _manifest(conversion, settings, descriptions, planning_problems)
    manifest["resumed_shards"] = kept
    manifest["seconds"] = round(time.perf_counter() - started, 2)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return manifest


def _manifest(conversion: Conversion, settings: Dict[str, Any], descriptions: Dict[Tuple[str, int], Dict[str, Any]],
              planning_problems: List[Problem]) -> Dict[str, Any]:
    problems = [asdict(p) for p in planning_problems]
    splits: Dict[str, Dict[str, Any]] = {}
    for (split, _), description in sorted(descriptions.items()):
        entry = splits.setdefault(split, {"task": conversion.tasks[split], "samples": 0, "images": 0,
                                          "dropped": 0, "shards": []})
        entry["samples"] += description["samples"]
        entry["images"] += description["images"]
        entry["shards"].append({k: description[k] for k in ("path", "samples", "sha256")})
        problems += description["problems"]
    for problem in problems:
        splits[problem["split"]]["dropped"] += 1
    for entry in splits.values():
        entry["problems"] = {}
    for problem in problems:
        counts = splits[problem["split"]]["problems"]
        counts[problem["reason"]] = counts.get(problem["reason"], 0) + 1
    return {"converter": conversion.converter, "settings": settings, "inputs": conversion.inputs,
            **conversion.extra, "splits": splits, "problems": problems}


# ----------------------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every converter script shares."""
    parser.add_argument("--out", required=True, help="output root: <out>/<split>/*.tar and <out>/manifest.json")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes writing shards (default: %(default)s)")
    parser.add_argument("--max-short-side", type=int, default=None,
                        help="resize images whose shorter side is longer (aspect kept; default: keep as they are)")
    parser.add_argument("--max-long-side", type=int, default=None, help="also cap the longer side")
    parser.add_argument("--jpeg-quality", type=int, default=95, help="for resized images (default: %(default)s)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the shards an interrupted run with the same inputs and settings finished")


def command_line(parser: argparse.ArgumentParser, build: Callable[[argparse.Namespace], Conversion],
                 argv: Optional[Sequence[str]] = None) -> int:
    """A converter script's ``main``: add the shared options to ``parser``, parse ``argv``, plan the conversion
    with ``build`` and run it.

    The inputs are read while planning, so a missing or malformed one ends the script here, before any
    work, with one line naming it and exit status 2 (argparse's, without its usage: the command was right)."""
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        conversion = build(args)
    except (OSError, ValueError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    run(conversion, args)
    return 0


def run(conversion: Conversion, args: argparse.Namespace) -> Dict[str, Any]:
    """Convert with the shared options and print a summary."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    options = WriteOptions(max_short_side=args.max_short_side, max_long_side=args.max_long_side,
                           jpeg_quality=args.jpeg_quality)
    manifest = convert(conversion, args.out, shard_size=args.shard_size, workers=args.workers, options=options,
                       resume=args.resume)
    print(summary(manifest, args.out))
    return manifest


def summary(manifest: Dict[str, Any], root: Union[str, Path]) -> str:
    lines = [f"{'split':<20}{'samples':>10}{'images':>10}{'dropped':>9}{'shards':>8}  problems"]
    for split, entry in manifest["splits"].items():
        problems = ", ".join(f"{reason} {count}" for reason, count in sorted(entry["problems"].items())) or "-"
        lines.append(f"{split:<20}{entry['samples']:>10}{entry['images']:>10}{entry['dropped']:>9}"
                     f"{len(entry['shards']):>8}  {problems}")
    lines.append(f"wrote {root} in {manifest['seconds']:.1f} s ({manifest['resumed_shards']} shards kept from an "
                 f"earlier run); every dropped record is listed under 'problems' in {Path(root) / MANIFEST}")
    return "\n".join(lines)
