"""PNG figures of the analysis: layer x head heatmaps, the fusion curve, attention over the image grid
and the image patches of a visual dictionary entry.

Figures are drawn on matplotlib's Agg canvas directly, without pyplot, so nothing depends on (or
changes) the interactive backend of the caller.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
except ModuleNotFoundError as error:  # an optional dependency: the rest of soho runs without it
    raise ModuleNotFoundError(f"soho's analysis figures need matplotlib ({error}): "
                              "pip install 'soho[analysis]'", name=error.name) from error

Box = Tuple[int, int, int, int]
"""(x0, y0, x1, y1) in pixels, end exclusive."""
OUTSIDE_IMAGE = 0.8
"""Grey that fills crops beyond the image edge, told apart from the white page."""


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return path


def head_heatmap(values: Tensor, path: str | Path, title: str, label: str,
                 marked: Optional[Tensor] = None) -> Path:
    """A layer x head heatmap of values in [0, 1], each cell annotated; ``marked`` (layers, heads) cells outlined."""
    layers, heads = values.shape
    figure = Figure(figsize=(1.0 + 0.7 * heads, 1.0 + 0.55 * layers))
    axes = figure.add_subplot()
    image = axes.imshow(values.numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for layer in range(layers):
        for head in range(heads):
            value = float(values[layer, head])
            axes.text(head, layer, f"{value:.2f}", ha="center", va="center", fontsize=8,
                      color="black" if value > 0.6 else "white")
            if marked is not None and marked[layer, head]:
                axes.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    axes.set_xticks(range(heads))
    axes.set_yticks(range(layers), [str(layer + 1) for layer in range(layers)])
    axes.set_xlabel("head")
    axes.set_ylabel("layer")
    axes.set_title(title, fontsize=10)
    figure.colorbar(image, ax=axes, label=label)
    return _save(figure, path)


def fusion_curve(nmi: Sequence[float], path: str | Path) -> Path:
    """NMI between 2-means clusters and modality per layer (0 = embeddings)."""
    figure = Figure(figsize=(4.5, 3.2))
    axes = figure.add_subplot()
    axes.plot(range(len(nmi)), nmi, marker="o")
    axes.set_xticks(range(len(nmi)), ["emb"] + [str(layer) for layer in range(1, len(nmi))])
    axes.set_ylim(-0.02, 1.02)
    axes.set_xlabel("layer")
    axes.set_ylabel("NMI(clusters, modality)")
    axes.set_title("fusion degree (lower = more fused)", fontsize=10)
    axes.grid(alpha=0.3)
    return _save(figure, path)


def display_image(pixel_values: Tensor, pixel_mask: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(H, W, 3) RGB in [0, 1] of a normalised (3, H', W') image, cut to its unpadded (H, W) part."""
    height = int(pixel_mask.any(1).sum())
    width = int(pixel_mask.any(0).sum())
    pixels = pixel_values[:, :height, :width].float().cpu()
    pixels = pixels * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return pixels.clamp(0, 1).permute(1, 2, 0).numpy()


def cell_box(row: int, column: int, stride: int, height: int, width: int) -> Box:
    """The pixels grid cell (row, column) covers, clipped to an image of (height, width)."""
    return (column * stride, row * stride, min((column + 1) * stride, width), min((row + 1) * stride, height))


def grid_attention_figure(image: np.ndarray, attention: Tensor, stride: int, path: str | Path, title: str) -> Path:
    """One panel per head: a token's attention over the (h, w) grid, each cell drawn over the pixels it covers.

    attention (heads, h, w); each head has its own colour scale (its image mass is in the panel title).
    """
    heads, rows, columns = attention.shape
    height, width = image.shape[:2]
    figure = Figure(figsize=(2.2 * (heads + 1), 2.6))
    panels = figure.subplots(1, heads + 1, squeeze=False)[0]
    # Both layers in pixel coordinates (imshow's default is centred on pixel indices), so cells sit on their boxes.
    pixels = (0, width, height, 0)
    panels[0].imshow(image, extent=pixels)
    panels[0].set_title("image", fontsize=9)
    for head, axes in enumerate(panels[1:]):
        axes.imshow(image, extent=pixels)
        axes.imshow(attention[head].numpy(), cmap="inferno", alpha=0.6, interpolation="nearest",
                    extent=(0, columns * stride, rows * stride, 0), vmin=0.0, vmax=float(attention[head].max()))
        axes.set_title(f"head {head}: {float(attention[head].sum()):.2f} on image", fontsize=9)
    for axes in panels:
        axes.set_xlim(0, width)
        axes.set_ylim(height, 0)
        axes.set_axis_off()
    figure.suptitle(title, fontsize=10)
    return _save(figure, path)


def entry_crops(images: Sequence[np.ndarray], entries: Tensor, valid: Tensor, entry: int, stride: int,
                limit: int = 16, context: int = 1) -> List[Tuple[np.ndarray, Box]]:
    """Up to ``limit`` cells assigned to ``entry``, in image order, each as a crop of the cell with
    ``context`` cells around it (grey beyond the image, so every crop has the same scale) and the
    cell's box within the crop.

    images: (H, W, 3) unpadded display images; entries, valid: (B, h, w) entry and validity of each cell.
    """
    margin = context * stride
    side = stride + 2 * margin
    crops = []
    for image, image_entries, image_valid in zip(images, entries, valid):
        padded = np.pad(image, ((margin, side), (margin, side), (0, 0)), constant_values=OUTSIDE_IMAGE)
        height, width = image.shape[:2]
        for row, column in (image_entries.eq(entry) & image_valid).nonzero().tolist():
            x0, y0, x1, y1 = cell_box(row, column, stride, height, width)
            crop = padded[y0:y0 + side, x0:x0 + side]
            crops.append((crop, (margin, margin, margin + x1 - x0, margin + y1 - y0)))
            if len(crops) == limit:
                return crops
    return crops


def dictionary_entry_figure(crops: Sequence[Tuple[np.ndarray, Box]], entry: int, usage: float,
                            path: str | Path) -> Path:
    """A grid of the image patches assigned to a dictionary entry, the cell outlined in its context."""
    if not crops:
        raise ValueError(f"entry {entry} has no cells to show")
    columns = min(len(crops), 8)
    rows = -(-len(crops) // columns)
    figure = Figure(figsize=(1.3 * columns, 1.3 * rows + 0.4))
    panels = figure.subplots(rows, columns, squeeze=False)
    for axes in panels.flat:
        axes.set_axis_off()
    for axes, (crop, (x0, y0, x1, y1)) in zip(panels.flat, crops):
        axes.imshow(crop, interpolation="nearest")
        axes.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="red", linewidth=1.5))
    figure.suptitle(f"dictionary entry {entry}: {100 * usage:.1f}% of cells", fontsize=10)
    return _save(figure, path)
