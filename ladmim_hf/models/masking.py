"""BEiT-style block masking with an exact masked-cell count and explicit, seeded randomness.

Shipped to the Hub with the model (imported relatively by the modeling files), so it uses only
numpy and torch.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

SeedLike = int | np.random.Generator | Sequence[int] | None


def _as_generator(seed: int | np.random.Generator | None) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


class BlockMaskGenerator:
    """Draws block masks over a `grid_size x grid_size` grid with exactly `num_masked` cells set.

    The algorithm is BEiT's (as LADMIM uses it): rectangles with an area uniform between
    `min_block` and the remaining budget and a log-uniform aspect ratio in
    `[min_aspect, 1 / min_aspect]` are placed at random until no attempt (10 per block) adds cells;
    then random single cells top the mask up to exactly `num_masked`.

    Args:
        grid_size: side of the square grid (24 in the paper).
        num_masked: cells to mask (paper: 130 in training, 230 when scoring).
        min_block: smallest block area (paper: 46 in training, 92 when scoring).
        min_aspect: smallest aspect ratio; the largest is `1 / min_aspect`.
        max_block: largest block area (default: the remaining budget).
        patch_size: mask whole `patch_size x patch_size` squares of cells (a predictor with
            `patch_size > 1` reads one token per square): the masks are drawn on the coarser grid of
            squares, and `num_masked`, `min_block` and `max_block`, still counted in cells, must be
            multiples of `patch_size**2`.
    """

    def __init__(self, grid_size: int, num_masked: int, min_block: int = 4, min_aspect: float = 0.3,
                 max_block: int | None = None, attempts: int = 10, patch_size: int = 1):
        cells = grid_size * grid_size
        if not 0 < num_masked <= cells:
            raise ValueError(f"num_masked must be in 1..{cells} for a {grid_size}x{grid_size} grid, got {num_masked}")
        if min_block < 1:
            raise ValueError(f"min_block must be >= 1, got {min_block}")
        if not 0 < min_aspect <= 1:
            raise ValueError(f"min_aspect must be in (0, 1], got {min_aspect}")
        if patch_size < 1 or grid_size % patch_size:
            raise ValueError(f"patch_size must divide grid_size ({grid_size}), got {patch_size}")
        area = patch_size * patch_size
        for name, value in (("num_masked", num_masked), ("min_block", min_block), ("max_block", max_block)):
            if value is not None and value % area:
                raise ValueError(f"{name} ({value}) must be a multiple of patch_size**2 ({area}): masks cover whole "
                                 f"{patch_size}x{patch_size} patches")
        self.grid_size = grid_size
        self.num_masked = num_masked
        self.min_block = min_block
        self.max_block = max_block
        self.patch_size = patch_size
        # Blocks are placed on the grid of patches, in patch units; `sample` expands them to cells.
        self._grid = grid_size // patch_size
        self._budget = num_masked // area
        self._min_block = min_block // area  # >= 1: min_block >= 1 is a multiple of area
        self._max_block = None if max_block is None else max_block // area
        self.log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))
        self.attempts = attempts

    def __repr__(self) -> str:
        patches = f", patch={self.patch_size}" if self.patch_size > 1 else ""
        return (f"BlockMaskGenerator(grid={self.grid_size}x{self.grid_size}{patches}, num_masked={self.num_masked}, "
                f"min_block={self.min_block}, "
                f"aspect=[{math.exp(self.log_aspect[0]):.2f}, {math.exp(self.log_aspect[1]):.2f}])")

    def _place_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        size = self._grid
        upper = budget if self._max_block is None else min(budget, self._max_block)
        for _ in range(self.attempts):
            area = rng.uniform(min(self._min_block, upper), max(self._min_block, upper))
            aspect = math.exp(rng.uniform(*self.log_aspect))
            height = int(round(math.sqrt(area * aspect)))
            width = int(round(math.sqrt(area / aspect)))
            if height < 1 or width < 1 or height >= size or width >= size:
                continue
            top = int(rng.integers(0, size - height + 1))
            left = int(rng.integers(0, size - width + 1))
            window = mask[top:top + height, left:left + width]
            added = height * width - int(window.sum())
            if 0 < added <= budget:
                window[...] = True
                return added
        return 0

    def sample(self, seed: int | np.random.Generator | None = None) -> np.ndarray:
        """One mask as a flat boolean array `(grid_size * grid_size,)` with exactly `num_masked` cells set."""
        rng = _as_generator(seed)
        mask = np.zeros((self._grid, self._grid), dtype=bool)
        count = 0
        while count < self._budget:
            added = self._place_block(mask, self._budget - count, rng)
            if added == 0:
                break
            count += added
        if count < self._budget:
            flat = mask.reshape(-1)
            free = np.flatnonzero(~flat)
            flat[rng.choice(free, size=self._budget - count, replace=False)] = True
        if self.patch_size > 1:
            mask = np.repeat(np.repeat(mask, self.patch_size, 0), self.patch_size, 1)
        return mask.reshape(-1)

    def __call__(self, batch_size: int, num_masks: int | None = None, seed: SeedLike = None) -> torch.Tensor:
        """Masks for a batch.

        Args:
            batch_size: images in the batch.
            num_masks: masks per image; `None` gives one mask per image without the mask axis.
            seed: an int (one stream for the batch), a sequence of ints (one stream per image, so an
                image's masks do not depend on how the data is batched), a numpy `Generator`, or
                `None` (fresh entropy).

        Returns:
            Bool tensor `(batch, num_masks, grid*grid)`, or `(batch, grid*grid)` if `num_masks` is None.
        """
        per_image = num_masks or 1
        if isinstance(seed, (list, tuple, np.ndarray, torch.Tensor)):
            seeds = [int(s) for s in seed]
            if len(seeds) != batch_size:
                raise ValueError(f"got {len(seeds)} per-image seeds for a batch of {batch_size}")
            generators = [np.random.default_rng(s) for s in seeds]
        else:
            shared = _as_generator(seed)
            generators = [shared] * batch_size
        masks = np.stack([
            np.stack([self.sample(generators[b]) for _ in range(per_image)]) for b in range(batch_size)
        ])
        out = torch.from_numpy(masks)
        return out if num_masks is not None else out[:, 0]
