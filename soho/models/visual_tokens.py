"""From a (quantised) feature grid to the visual tokens the Transformer reads."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def grid_mask(pixel_mask: Tensor, size: Tuple[int, int]) -> Tensor:
    """Valid cells of a feature grid of ``size`` = (h, w), from a (B, H, W) pixel mask.

    Nearest sampling reads the top-left pixel of each cell, so a cell counts as valid
    as soon as it starts inside the image. Height and width are resized separately:
    the official code used the padded height for both, which cut real columns of
    portrait images.
    """
    if pixel_mask.dim() != 3:
        raise ValueError(f"pixel_mask must be (B, H, W), got shape {tuple(pixel_mask.shape)}")
    mask = F.interpolate(pixel_mask[:, None].float(), size=size, mode="nearest")[:, 0]
    return mask > 0.5


def sine_position_encoding(mask: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """2-D sine encoding (B, h, w, dim) of a (B, h, w) validity mask.

    Half the channels encode y and half x; coordinates are normalised by each image's
    valid extent so a padded image and the same image unpadded get the same codes.
    """
    if dim % 4:
        raise ValueError(f"sine position encoding needs a dimension divisible by 4, got {dim}")
    valid = mask.float()
    y = valid.cumsum(1)
    x = valid.cumsum(2)
    eps = 1e-6
    y = y / (y[:, -1:, :] + eps) * 2 * math.pi
    x = x / (x[:, :, -1:] + eps) * 2 * math.pi
    quarter = dim // 4
    freqs = temperature ** (torch.arange(quarter, device=mask.device, dtype=torch.float32) / quarter)
    y = y[..., None] / freqs
    x = x[..., None] / freqs
    pos_y = torch.cat([y.sin(), y.cos()], dim=-1)
    pos_x = torch.cat([x.sin(), x.cos()], dim=-1)
    return torch.cat([pos_y, pos_x], dim=-1)


class VisualEmbeddings(nn.Module):
    """Grid features + 2-D sine positions, LayerNorm, dropout; masked cells get a learned vector.

    As in the release, visual tokens get no BERT token-type or position embedding.
    """

    def __init__(self, hidden_size: int, layer_norm_eps: float = 1e-12, dropout: float = 0.1):
        super().__init__()
        self.hidden_size = hidden_size
        self.mask_embedding = nn.Parameter(torch.zeros(hidden_size))
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, grid: Tensor, mask: Tensor, masked_cells: Optional[Tensor] = None) -> Tensor:
        """grid (B, h, w, D), mask (B, h, w) valid cells, masked_cells (B, h, w) -> tokens (B, h*w, D)."""
        if masked_cells is not None:
            grid = torch.where(masked_cells[..., None], self.mask_embedding.to(grid.dtype), grid)
        pos = sine_position_encoding(mask, self.hidden_size).to(grid.dtype)
        tokens = self.dropout(self.norm(grid + pos))
        return tokens.flatten(1, 2)
