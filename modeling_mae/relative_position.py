"""Relative position bias (BEiT), the transfer-only part of MAE's segmentation backbone.

MAE pretraining uses absolute sin-cos positions only. For ADE20K the paper follows BEiT's segmentation
code, which adds a learned bias to every attention logit that depends on where the query and the key
sit relative to each other; since pretraining has no such bias, it is "turned on only during transfer
learning, initialised as zero" (He et al. 2021, appendix A.4). mmsegmentation's `MAE` backbone does
the same. One table per block, shape ((2 * rows - 1) * (2 * cols - 1) + 3, heads):

    entry  (dr + rows - 1) * (2 * cols - 1) + (dc + cols - 1)   patch -> patch, dr / dc = query - key
                                                                 row / column offset
    entry  R - 3    CLS (query) -> patch (key)                 (R = number of entries)
    entry  R - 2    patch (query) -> CLS (key)
    entry  R - 1    CLS -> CLS

`relative_position_index(grid)` gathers the table into a (1 + L, 1 + L) bias per head; the attention
adds it to the logits after the 1 / sqrt(d) scaling, before the softmax (an additive mask for eager and
SDPA, a `score_mod` for flex attention; flash attention cannot add it and is refused).
The layout is BEiT's, mmsegmentation's and transformers' `BeitRelativePositionBias`' (same entry order),
so their tables copy over unchanged.

A table belongs to the grid it was built for (the config's `image_size / patch_size`). Another input
size (whole-image inference, a checkpoint loaded at a new resolution) resizes the patch -> patch part
bilinearly over its (2 rows - 1, 2 cols - 1) offset grid, as transformers' BEiT does; the three CLS
entries are kept. (mmsegmentation resizes on load with BEiT's geometric-sequence interpolation
instead; the two agree for zero tables, the MAE transfer's starting point.)

This file imports only torch, so that `save_pretrained` can ship it beside the modeling code.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


NUM_CLS_ENTRIES = 3  # CLS -> patch, patch -> CLS, CLS -> CLS


def num_relative_positions(grid: tuple[int, int]) -> int:
    """Entries of a table for a (rows, cols) patch grid: (2 rows - 1)(2 cols - 1) offsets + 3 CLS entries."""
    rows, cols = grid
    return (2 * rows - 1) * (2 * cols - 1) + NUM_CLS_ENTRIES


@functools.lru_cache(maxsize=32)
def relative_position_index(grid: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """(1 + rows * cols, 1 + rows * cols) int64: the table entry of each (query, key) pair, CLS first,
    patches in row-major order (the token order of the encoder). Cached per grid and device."""
    rows, cols = grid
    coords = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")).flatten(1)  # (2, L)
    offsets = coords[:, :, None] - coords[:, None, :]  # (2, L, L): query minus key, row and column
    patch_to_patch = (offsets[0] + rows - 1) * (2 * cols - 1) + (offsets[1] + cols - 1)
    total = num_relative_positions(grid)
    index = torch.empty(rows * cols + 1, rows * cols + 1, dtype=torch.long)
    index[1:, 1:] = patch_to_patch
    index[0, 1:] = total - 3  # CLS query -> patch keys
    index[1:, 0] = total - 2  # patch queries -> CLS key
    index[0, 0] = total - 1
    return index.to(device) if device is not None else index


def resize_relative_position_table(
    table: torch.Tensor, source_grid: tuple[int, int], target_grid: tuple[int, int]
) -> torch.Tensor:
    """(R_source, heads) -> (R_target, heads): the patch -> patch offsets resized bilinearly from the
    (2 rows - 1, 2 cols - 1) offset grid of `source_grid` to that of `target_grid`; CLS entries kept."""
    source_grid, target_grid = tuple(source_grid), tuple(target_grid)
    if table.shape[0] != num_relative_positions(source_grid):
        raise ValueError(
            f"a relative position table for grid {source_grid} has {num_relative_positions(source_grid)} rows, "
            f"got {table.shape[0]}"
        )
    if source_grid == target_grid:
        return table
    (rows, cols), (new_rows, new_cols) = source_grid, target_grid
    heads = table.shape[1]
    offsets = table[: -NUM_CLS_ENTRIES].reshape(1, 2 * rows - 1, 2 * cols - 1, heads).permute(0, 3, 1, 2)
    resized = F.interpolate(
        offsets.float(), size=(2 * new_rows - 1, 2 * new_cols - 1), mode="bilinear", align_corners=False
    ).to(table.dtype)
    resized = resized.permute(0, 2, 3, 1).reshape(-1, heads)
    return torch.cat([resized, table[-NUM_CLS_ENTRIES:]], dim=0)


class MAERelativePositionBias(nn.Module):
    """One block's table ((2 rows - 1)(2 cols - 1) + 3, heads), zero-initialised, for the config's grid.

    forward(grid) -> (heads, 1 + L, 1 + L) bias for an input of that patch grid (table resized when
    the grid differs from the one it was built for)."""

    def __init__(self, grid: tuple[int, int], num_heads: int):
        super().__init__()
        self.grid = tuple(grid)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_relative_positions(self.grid), num_heads))

    def forward(self, grid: tuple[int, int]) -> torch.Tensor:
        grid = tuple(grid)
        table = resize_relative_position_table(self.relative_position_bias_table, self.grid, grid)
        index = relative_position_index(grid, table.device)
        length = index.shape[0]
        return table[index.view(-1)].view(length, length, -1).permute(2, 0, 1)


__all__ = [
    "MAERelativePositionBias",
    "num_relative_positions",
    "relative_position_index",
    "resize_relative_position_table",
]
