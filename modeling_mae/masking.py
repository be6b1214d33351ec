"""Patch masking: every strategy makes a per-sample score ("noise"); the lowest scores are kept.

The paper's random masking is an argsort of uniform noise. Block and grid masking (paper Table 1f)
are expressed as noise too, so one `random_masking` serves all three and `noise=` always reproduces a
mask exactly, whatever strategy produced it.
"""

from __future__ import annotations

import math

import torch


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Number of visible patches, `int(L * (1 - mask_ratio))` as in the official code."""
    return int(num_patches * (1 - mask_ratio))


def random_noise(batch_size: int, num_patches: int, device=None, generator=None) -> torch.Tensor:
    """Uniform noise (N, L): the paper's per-sample random masking."""
    return torch.rand(batch_size, num_patches, device=device, generator=generator)


def grid_noise(batch_size: int, grid_size: tuple[int, int], device=None, generator=None) -> torch.Tensor:
    """Noise (N, L) that keeps one patch of every 2x2 cell (its top-left one).

    With mask ratio 0.75 and an even grid exactly the grid patches are kept; at other ratios the rest
    of the order is random.
    """
    rows, cols = grid_size
    r = torch.arange(rows, device=device)[:, None]
    c = torch.arange(cols, device=device)[None, :]
    on_grid = ((r % 2 == 0) & (c % 2 == 0)).reshape(1, rows * cols)
    noise = torch.rand(batch_size, rows * cols, device=device, generator=generator)
    return noise + (~on_grid).to(noise.dtype)


def block_noise(
    batch_size: int,
    grid_size: tuple[int, int],
    mask_ratio: float,
    min_block_patches: int = 16,
    min_aspect: float = 0.3,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """Noise (N, L) from BEiT-style block masking: random rectangles until `mask_ratio` is covered.

    Rectangles have an area of at least `min_block_patches` patches (fewer on tiny grids) and an aspect
    ratio log-uniform in [min_aspect, 1 / min_aspect]. Patches inside rectangles get noise in [1, 2),
    the others [0, 1), so argsort keeps unmasked patches first and the kept count is exact.
    """
    rows, cols = grid_size
    num_patches = rows * cols
    target = num_patches - num_kept(num_patches, mask_ratio)
    min_area = max(1, min(min_block_patches, target))
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    masks = torch.zeros(batch_size, rows, cols, dtype=torch.bool)

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand((), generator=generator).item()

    for i in range(batch_size):
        covered, attempts = 0, 0
        while covered < target and attempts < 100 * num_patches:
            attempts += 1
            area = uniform(min_area, max(min_area, target - covered))
            aspect = math.exp(uniform(*log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if not (1 <= h <= rows and 1 <= w <= cols):
                continue
            top = int(torch.randint(0, rows - h + 1, (), generator=generator))
            left = int(torch.randint(0, cols - w + 1, (), generator=generator))
            block = masks[i, top : top + h, left : left + w]
            new = int((~block).sum())
            if new == 0 or covered + new > target + max(1, target // 10):
                continue  # stay close to the target, as BEiT's generator does
            block.fill_(True)
            covered += new
    noise = torch.rand(batch_size, num_patches, generator=generator)
    noise = noise + masks.reshape(batch_size, num_patches).to(noise.dtype)
    return noise.to(device)


def make_noise(
    strategy: str,
    batch_size: int,
    grid_size: tuple[int, int],
    mask_ratio: float,
    device=None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Masking noise (N, L) for `strategy` in {"random", "block", "grid"}."""
    num_patches = grid_size[0] * grid_size[1]
    if strategy == "random":
        return random_noise(batch_size, num_patches, device=device, generator=generator)
    if strategy == "grid":
        return grid_noise(batch_size, grid_size, device=device, generator=generator)
    if strategy == "block":
        return block_noise(batch_size, grid_size, mask_ratio, generator=generator, device=device)
    raise ValueError(f"`mask_strategy` must be one of ('random', 'block', 'grid'), got {strategy!r}")


def random_masking(x: torch.Tensor, noise: torch.Tensor, mask_ratio: float):
    """Keep the `int(L * (1 - mask_ratio))` patches with the lowest noise; remove the others.

    Args:
        x: (N, L, D) patch embeddings (without the CLS token).
        noise: (N, L) per-patch scores; lower is kept.
        mask_ratio: fraction to remove, in [0, 1).
    Returns:
        x_masked: (N, L_keep, D) the visible patches, in shuffled order.
        mask: (N, L) float, 1 = removed, 0 = kept, in the original patch order.
        ids_restore: (N, L) long, the inverse permutation: `gather(shuffled, ids_restore)` unshuffles.
        ids_keep: (N, L_keep) long, original indices of the visible patches.
    """
    batch_size, length, dim = x.shape
    if noise.shape != (batch_size, length):
        raise ValueError(f"`noise` must have shape {(batch_size, length)}, got {tuple(noise.shape)}")
    len_keep = num_kept(length, mask_ratio)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small is keep, large is remove
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    # expand (not repeat) the index: no (N, L_keep, D) index tensor is materialised
    x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
    mask = torch.ones(batch_size, length, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_masked, mask, ids_restore, ids_keep
