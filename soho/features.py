"""Features of a checkpoint written to disk: image grids and dictionary entries, image, text and fused [CLS]
states, and ITC embeddings, for your own retrieval, clustering or probing.

The features, by the name ``--features`` takes (arrays of a part file in brackets):

- ``grid``: the CNN grid after the neck (the visual dictionary's input), the valid cells of each image,
  row-major (``grid`` (cells, D), ``grid_shape`` (images, 2): the valid cells' rows and columns);
- ``dictionary``: the visual dictionary entry of each valid cell (``grid_entries`` (cells,), ``grid_shape``);
  the entries themselves are ``dictionary.safetensors`` (K, D);
- ``image``: the mean over valid cells of an image-only pass through the Transformer (``image`` (images, D));
- ``text``: the [CLS] state of a text-only pass per caption (``text`` (texts, D));
- ``fused``: the [CLS] state of the fused pass of each caption with its image (``fused`` (texts, D));
- ``itc``: the L2-normalised ITC embeddings (``itc_image`` (images, E), ``itc_text`` (texts, E)), only for
  checkpoints pre-trained with ITC: ``image`` and ``text`` are the same passes before ITC's projections.

Texts are the captions of each image; ``text_image`` (texts,) gives each text's image row in its part.
Every process encodes its own images (whole shards, or every n-th sample when there are fewer shards than
processes) and writes its own part files; the main process then writes ``index.json`` (features, shapes,
parts, counts, skipped samples), ``images.jsonl`` and ``texts.jsonl``: one line per row in a global order
that does not depend on the number of processes, each naming its part file and row there.
:func:`load_features` reads it all back in that order.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from accelerate.utils import gather_object
from PIL import Image
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from torch import Tensor
from tqdm.auto import tqdm

from soho.data.convert.captions import caption_rows, index_captions
from soho.data.samples import SampleError, decode_image, decode_json
from soho.data.shards import SkipCounter, expand_urls, read_shard
from soho.models.objectives.itc import masked_mean
from soho.models.soho import SohoForPretraining
from soho.processing import SohoProcessor

logger = logging.getLogger(__name__)

FEATURES = ("grid", "dictionary", "image", "text", "fused", "itc")
TEXT_FEATURES = ("text", "fused")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
FORMATS = {"safetensors": ".safetensors", "numpy": ".npz"}
INDEX, IMAGES, TEXTS, DICTIONARY = "index.json", "images.jsonl", "texts.jsonl", "dictionary.safetensors"


@dataclass
class ImageItem:
    """One image to encode, with where it came from and its captions."""
    order: Tuple[int, int]
    """(source, position): sorts the rows into the same order whatever the number of processes."""
    image_id: str
    origin: str
    """The shard and key, or the file, it was read from."""
    captions: List[str]
    image: Image.Image


def shard_items(shards: Union[str, List[str]], rank: int, world_size: int,
                skips: SkipCounter) -> Iterator[ImageItem]:
    """This process's images of image-text shards, with their ``captions`` (none for records without)."""
    urls = expand_urls(shards)
    by_shard = len(urls) >= world_size
    for index, url in enumerate(urls):
        if by_shard and index % world_size != rank:
            continue
        for position, sample in enumerate(read_shard(url, skips)):
            if not by_shard and position % world_size != rank:
                continue
            key = f"{url}:{sample.get('__key__', '?')}"
            try:
                record, image = decode_json(sample), decode_image(sample)
            except SampleError as error:
                skips.skip(error.reason, key, error)
                continue
            captions = record.get("captions")
            captions = [c for c in captions if isinstance(c, str) and c] if isinstance(captions, list) else []
            yield ImageItem((index, position), str(record.get("image_id", sample.get("__key__"))), key, captions, image)


def folder_listing(folder: Union[str, Path], captions: Optional[Union[str, Path]] = None,
                   **caption_keys: str) -> List[Tuple[str, List[str]]]:
    """(image path relative to ``folder``, captions) of every image to encode: each image file under ``folder``,
    or, with a captions file (:func:`soho.data.convert.captions.caption_rows`), each image it names."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"image folder not found: {folder}")
    if captions is None:
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                       if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise FileNotFoundError(f"no {'/'.join(IMAGE_SUFFIXES)} images under {folder}")
        return [(name, []) for name in files]
    index = index_captions(caption_rows(captions, **caption_keys), default_split="all")
    for _, problem in index.problems:
        logger.warning("%s: %s, row left out", problem.detail, problem.reason)
    listing = [(image, texts) for images in index.splits.values() for image, texts in images.items()]
    if not listing:
        raise ValueError(f"{captions}: no usable caption rows")
    return listing


def folder_items(folder: Union[str, Path], listing: Sequence[Tuple[str, List[str]]], rank: int, world_size: int,
                 skips: SkipCounter) -> Iterator[ImageItem]:
    for position, (name, captions) in enumerate(listing):
        if position % world_size != rank:
            continue
        path = Path(folder) / name
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except FileNotFoundError:
            skips.skip("missing_image", str(path))
            continue
        except Exception as error:  # PIL raises many types for corrupt data
            skips.skip("corrupt_image", str(path), repr(error))
            continue
        yield ImageItem((0, position), name, str(path), list(captions), image)


def available_features(model: SohoForPretraining, with_captions: bool) -> List[str]:
    """The features ``model`` and the source can give."""
    return [name for name in FEATURES
            if not (name == "dictionary" and model.soho.visual_dictionary is None)
            and not (name == "itc" and "itc" not in model.objectives)
            and not (name in TEXT_FEATURES and not with_captions)]


def check_features(requested: Optional[Sequence[str]], model: SohoForPretraining, with_captions: bool) -> List[str]:
    """``requested`` (default: every available one), or an error naming what cannot be given and why."""
    available = available_features(model, with_captions)
    if requested is None:
        return available
    why = {"dictionary": "the checkpoint has no visual dictionary (use_visual_dictionary: false)",
           "itc": "the checkpoint has no ITC heads (pre-trained without itc.enabled); image and text give the "
                  "same passes before ITC's projections",
           "text": "the images have no captions (give shards with captions or a captions file)"}
    why["fused"] = why["text"]
    for name in requested:
        if name not in FEATURES:
            raise ValueError(f"unknown feature {name!r}; known: {', '.join(FEATURES)}")
        if name not in available:
            raise ValueError(f"feature {name!r} is not available: {why[name]}")
    return [name for name in FEATURES if name in requested]


@torch.no_grad()
def encode_batch(model: SohoForPretraining, processor: SohoProcessor, items: Sequence[ImageItem],
                 features: Sequence[str], device: torch.device) -> Dict[str, Tensor]:
    """The arrays of one batch of images (image rows, cells, and text rows for their captions), on the CPU."""
    soho = model.soho
    inputs = processor(images=[item.image for item in items])
    captured: List[Tensor] = []
    hook = soho.backbone.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        grid = soho.embed_image(inputs["pixel_values"].to(device), inputs["pixel_mask"].to(device))
    finally:
        hook.remove()
    out: Dict[str, Tensor] = {}
    if "grid" in features or "dictionary" in features:
        # Padding is at the bottom and right, so the valid cells of an image are its top-left rectangle.
        shapes = torch.stack([grid.mask.any(2).sum(1), grid.mask.any(1).sum(1)], dim=1)
        out["grid_shape"] = shapes
        rows = [slice(None, int(h)) for h in shapes[:, 0]]
        columns = [slice(None, int(w)) for w in shapes[:, 1]]
        if "grid" in features:
            cells = captured[0].permute(0, 2, 3, 1)
            out["grid"] = torch.cat([cells[b, rows[b], columns[b]].flatten(0, 1) for b in range(len(items))])
        if "dictionary" in features:
            out["grid_entries"] = torch.cat([grid.indices[b, rows[b], columns[b]].flatten() for b in range(len(items))])
    if "image" in features or "itc" in features:
        tokens, mask = soho.visual_tokens(grid)
        pooled = masked_mean(soho.encoder(image=tokens, image_mask=mask).image_states, mask)
        if "image" in features:
            out["image"] = pooled
        if "itc" in features:
            out["itc_image"] = model.objective("itc").head.embed_image(pooled)
    captions = [caption for item in items for caption in item.captions]
    if captions and (set(features) & {"text", "fused", "itc"}):
        text = {name: tensor.to(device) for name, tensor in processor(text=captions).items()}
        image_index = torch.tensor([b for b, item in enumerate(items) for _ in item.captions], device=device)
        out["text_image"] = image_index
        if "text" in features or "itc" in features:
            cls = soho(**text).text_states[:, 0]
            if "text" in features:
                out["text"] = cls
            if "itc" in features:
                out["itc_text"] = model.objective("itc").head.embed_text(cls)
        if "fused" in features:
            out["fused"] = soho(**text, grid=grid, image_index=image_index).text_states[:, 0]
    return {name: tensor.detach().float().cpu() if tensor.is_floating_point() else tensor.cpu()
            for name, tensor in out.items()}


class PartWriter:
    """Collects one process's rows and writes them as part files of ``part_size`` images, rounded up to whole
    batches."""

    def __init__(self, out_dir: Path, rank: int, part_size: int, file_format: str, dtype: np.dtype):
        self.out_dir, self.rank, self.part_size = out_dir, rank, part_size
        self.suffix, self.dtype = FORMATS[file_format], dtype
        self.parts: List[Dict[str, Any]] = []
        self.images: List[Dict[str, Any]] = []
        self.texts: List[Dict[str, Any]] = []
        self._reset()

    def _reset(self) -> None:
        self.arrays: Dict[str, List[np.ndarray]] = {}
        self.rows = self.text_rows = 0

    def add(self, items: Sequence[ImageItem], arrays: Dict[str, Tensor]) -> None:
        name = self.part_name
        for position, item in enumerate(items):
            row: Dict[str, Any] = {"order": list(item.order), "image_id": item.image_id, "origin": item.origin,
                                   "part": name, "part_row": self.rows + position}
            if "grid_shape" in arrays:
                row["grid"] = arrays["grid_shape"][position].tolist()
            self.images.append(row)
        if "text_image" in arrays:
            captions = [(item, index, caption) for item in items for index, caption in enumerate(item.captions)]
            for offset, (item, index, caption) in enumerate(captions):
                self.texts.append({"image_order": list(item.order), "caption_index": index, "caption": caption,
                                   "part": name, "part_row": self.text_rows + offset})
            arrays = {**arrays, "text_image": arrays["text_image"] + self.rows}
            self.text_rows += len(captions)
        for key, tensor in arrays.items():
            array = tensor.numpy()
            self.arrays.setdefault(key, []).append(array.astype(self.dtype) if array.dtype.kind == "f" else array)
        self.rows += len(items)
        if self.rows >= self.part_size:
            self.flush()

    @property
    def part_name(self) -> str:
        return f"part-{self.rank:03d}-{len(self.parts):05d}{self.suffix}"

    def flush(self) -> None:
        if not self.rows:
            return
        arrays = {key: np.ascontiguousarray(np.concatenate(chunks)) for key, chunks in self.arrays.items()}
        path = self.out_dir / self.part_name
        if self.suffix == ".npz":
            np.savez(path, **arrays)
        else:
            save_numpy(arrays, str(path))
        self.parts.append({"file": path.name, "images": self.rows, "texts": self.text_rows,
                           "arrays": {key: list(array.shape) for key, array in arrays.items()}})
        self._reset()


def batched(items: Iterable[ImageItem], size: int) -> Iterator[List[ImageItem]]:
    batch: List[ImageItem] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _clear(out_dir: Path) -> None:
    """What an earlier export left: parts that are not rewritten would otherwise be read with the new ones."""
    for pattern in ("part-*.safetensors", "part-*.npz", INDEX, IMAGES, TEXTS, DICTIONARY):
        for path in out_dir.glob(pattern):
            path.unlink()


def export_features(model: SohoForPretraining, processor: SohoProcessor, items: Iterable[ImageItem],
                    out_dir: Union[str, Path], features: Sequence[str], accelerator, batch_size: int = 32,
                    part_size: int = 10000, file_format: str = "safetensors", dtype: str = "float32",
                    skips: Optional[SkipCounter] = None, inputs: Optional[Dict[str, Any]] = None,
                    total: Optional[int] = None) -> Dict[str, Any]:
    """Encode this process's ``items`` in batches, write its parts, and (main process) the index; every
    process returns the index. ``model`` is in eval mode on ``accelerator.device``; ``inputs`` describes
    the checkpoint and source in the index; ``total`` is the number of images, when known, for the progress bar."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        _clear(out_dir)
    accelerator.wait_for_everyone()
    skips = SkipCounter() if skips is None else skips
    writer = PartWriter(out_dir, accelerator.process_index, part_size, file_format, np.dtype(dtype))
    progress = tqdm(total=total, unit="images", desc="export", disable=not accelerator.is_local_main_process)
    for batch in batched(items, batch_size):
        with accelerator.autocast():
            arrays = encode_batch(model, processor, batch, features, accelerator.device)
        writer.add(batch, arrays)
        # Every process works at about the same pace; the main one shows the total.
        progress.update(len(batch) * accelerator.num_processes)
    writer.flush()
    progress.close()
    return write_index(accelerator, out_dir, writer, features, dict(skips), model, file_format, dtype,
                       inputs or {}, time.perf_counter() - start)


def write_index(accelerator, out_dir: Path, writer: PartWriter, features: Sequence[str], skipped: Dict[str, int],
                model: SohoForPretraining, file_format: str, dtype: str, inputs: Dict[str, Any],
                seconds: float) -> Dict[str, Any]:
    """Gather every process's rows and parts; the main process writes the dictionary, the row files and the index."""
    parts = gather_object(writer.parts)
    images = sorted(gather_object(writer.images), key=lambda row: row["order"])
    texts = sorted(gather_object(writer.texts), key=lambda row: (row["image_order"], row["caption_index"]))
    skips = sum((Counter(s) for s in gather_object([skipped])), Counter())
    rows = {tuple(row["order"]): number for number, row in enumerate(images)}
    index = {"format": "soho-features", "version": 1, "inputs": inputs, "features": list(features),
             "file_format": file_format, "dtype": dtype, "images": len(images), "texts": len(texts),
             "dictionary": DICTIONARY if "dictionary" in features else None, "skipped": dict(skips),
             "processes": accelerator.num_processes, "seconds": round(seconds, 2),
             "parts": sorted(parts, key=lambda part: part["file"])}
    if accelerator.is_main_process:
        if "dictionary" in features:
            entries = model.soho.visual_dictionary.embedding.detach().float().cpu().numpy()
            save_numpy({"dictionary": entries}, str(out_dir / DICTIONARY))
        with open(out_dir / IMAGES, "w", encoding="utf-8") as stream:
            for number, row in enumerate(images):
                stream.write(json.dumps({"row": number, **row}, ensure_ascii=False) + "\n")
        with open(out_dir / TEXTS, "w", encoding="utf-8") as stream:
            for number, row in enumerate(texts):
                line = {"row": number, "image_row": rows[tuple(row["image_order"])],
                        **{k: v for k, v in row.items() if k != "image_order"}}
                stream.write(json.dumps(line, ensure_ascii=False) + "\n")
        (out_dir / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    accelerator.wait_for_everyone()
    if skips:
        logger.warning("skipped %d images: %s", sum(skips.values()), dict(skips))
    return index


@dataclass
class ExportedFeatures:
    """An export read back, rows in the global order of ``images.jsonl`` and ``texts.jsonl``."""
    index: Dict[str, Any]
    images: List[Dict[str, Any]]
    texts: List[Dict[str, Any]]
    arrays: Dict[str, np.ndarray] = field(default_factory=dict)
    """``image``, ``itc_image`` (image rows); ``text``, ``fused``, ``itc_text``, ``text_image`` (text rows;
    ``text_image`` holds global image rows)."""
    grids: List[np.ndarray] = field(default_factory=list)
    """Per image, (rows, columns, D) grid features."""
    entries: List[np.ndarray] = field(default_factory=list)
    """Per image, (rows, columns) dictionary entries."""
    dictionary: Optional[np.ndarray] = None


def _read_part(path: Path) -> Dict[str, np.ndarray]:
    if path.suffix == ".npz":
        with np.load(path) as stored:
            return {key: stored[key] for key in stored.files}
    return load_numpy(str(path))


def load_features(directory: Union[str, Path]) -> ExportedFeatures:
    """Read an export written by :func:`export_features`."""
    directory = Path(directory)
    if not (directory / INDEX).is_file():
        raise FileNotFoundError(f"{directory} holds no feature export: {INDEX} is missing")
    index = json.loads((directory / INDEX).read_text())
    images = [json.loads(line) for line in (directory / IMAGES).read_text(encoding="utf-8").splitlines()]
    texts = [json.loads(line) for line in (directory / TEXTS).read_text(encoding="utf-8").splitlines()]
    parts = {part["file"]: _read_part(directory / part["file"]) for part in index["parts"]}
    result = ExportedFeatures(index, images, texts)
    for rows, names in ((images, ("image", "itc_image")), (texts, ("text", "fused", "itc_text"))):
        for name in names:
            holding = [file for file, arrays in parts.items() if name in arrays]
            if rows and holding:
                # Each part's rows are contiguous in the concatenation: a row's place is its part's start + part_row.
                starts = dict(zip(holding, np.cumsum([0] + [len(parts[file][name]) for file in holding])))
                order = np.array([starts[row["part"]] + row["part_row"] for row in rows])
                result.arrays[name] = np.concatenate([parts[file][name] for file in holding])[order]
    if texts:
        result.arrays["text_image"] = np.array([row["image_row"] for row in texts], dtype=np.int64)
    cells = {}
    for file, arrays in parts.items():
        if "grid_shape" in arrays:
            counts = arrays["grid_shape"].prod(1)
            cells[file] = [np.cumsum(counts) - counts, arrays["grid_shape"]]
    for row in images:
        if row["part"] not in cells:
            continue
        offsets, shapes = cells[row["part"]]
        start, (height, width) = offsets[row["part_row"]], shapes[row["part_row"]]
        arrays = parts[row["part"]]
        if "grid" in arrays:
            result.grids.append(arrays["grid"][start:start + height * width].reshape(height, width, -1))
        if "grid_entries" in arrays:
            result.entries.append(arrays["grid_entries"][start:start + height * width].reshape(height, width))
    if index.get("dictionary"):
        result.dictionary = load_numpy(str(directory / index["dictionary"]))["dictionary"]
    return result
