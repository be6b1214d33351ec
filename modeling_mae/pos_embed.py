"""Fixed 2-D sin-cos position embeddings, in the published MAE layout, and their interpolation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """1-D sin-cos table.

    Args:
        embed_dim: even output width D.
        positions: (M,) positions.
    Returns:
        (M, D) float64: `[sin(pos * omega), cos(pos * omega)]` with `omega_i = 1 / 10000^(2i / D)`.
    """
    if embed_dim % 2 != 0:
        raise ValueError(f"sin-cos embedding width must be even, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = positions.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(embed_dim: int, grid_size: tuple[int, int], add_cls_token: bool = True) -> torch.Tensor:
    """2-D sin-cos table in the layout of the published MAE weights.

    The first half of the channels encodes the patch's *column* (width) index and the second half its
    row index: the official code builds `meshgrid(grid_w, grid_h)` and names the first half "h".
    Converted checkpoints keep that layout, so we generate it too.

    Args:
        embed_dim: width D, divisible by 4.
        grid_size: (rows, columns) of the patch grid.
        add_cls_token: prepend an all-zero row for the CLS token.
    Returns:
        (1 + rows * cols, D) or (rows * cols, D) float32, row-major over the grid.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"2-D sin-cos embedding width must be divisible by 4, got {embed_dim}")
    rows, cols = grid_size
    row_idx, col_idx = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64), indexing="ij"
    )
    emb = torch.cat([sincos_1d(embed_dim // 2, col_idx), sincos_1d(embed_dim // 2, row_idx)], dim=1)
    if add_cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), emb], dim=0)
    return emb.to(torch.float32)


def interpolate_pos_embed(
    pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], num_prefix_tokens: int = 1
) -> torch.Tensor:
    """Resize a position-embedding table to a new patch grid with 2-D bicubic interpolation.

    Args:
        pos_embed: (1, num_prefix_tokens + old_rows * old_cols, D).
        old_grid / new_grid: (rows, columns).
    Returns:
        (1, num_prefix_tokens + new_rows * new_cols, D), same dtype as the input.
    """
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid == new_grid:
        return pos_embed
    expected = num_prefix_tokens + old_grid[0] * old_grid[1]
    if pos_embed.shape[1] != expected:
        raise ValueError(
            f"position embeddings have {pos_embed.shape[1]} tokens, expected {expected} for grid {old_grid} "
            f"with {num_prefix_tokens} prefix token(s)"
        )
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = patches.shape[-1]
    patches = patches.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    patches = F.interpolate(patches.float(), size=new_grid, mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)
