"""PatchCore-style kNN baseline on backbone patch features (Roth et al., CVPR 2022).

``KNNPatchBaseline.fit`` stores every training patch feature (optionally a coreset of them) in a
memory bank; ``score`` gives each test patch the Euclidean distance to its nearest bank patch and
each image the maximum over its patches. This is the plain PatchCore score without its
neighbourhood re-weighting of the image score.

Coreset: greedy k-center selection as in PatchCore -- start from one seeded random patch, then
repeatedly add the patch farthest from everything selected so far. Distances for the selection are
taken in a seeded Gaussian random projection of the features (Johnson-Lindenstrauss) when the
feature dimension exceeds ``projection_dim``; the bank keeps the original features.

Distances are computed with ``torch`` in (query chunk x bank chunk) blocks, so memory stays bounded
by ``chunk_size * bank_chunk_size`` floats whatever the bank size.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["KNNPatchBaseline", "greedy_coreset", "nearest_distances"]


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if not t.is_floating_point():
        t = t.float()
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contain NaN or inf values")
    return t


def _to_rows(features: torch.Tensor, name: str) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``(N, C, H, W)`` -> ``(N*H*W, C)`` rows (patch-major order: image, row, column)."""
    if features.ndim != 4:
        raise ValueError(f"{name} must be (N, C, H, W), got shape {tuple(features.shape)}")
    n, c, h, w = features.shape
    return features.permute(0, 2, 3, 1).reshape(n * h * w, c), (n, h, w)


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between rows of ``a`` and ``b``, clamped at 0."""
    d = (a * a).sum(1, keepdim=True) - 2.0 * (a @ b.T) + (b * b).sum(1)[None, :]
    return d.clamp_min_(0.0)


def nearest_distances(
    queries: torch.Tensor,
    bank: torch.Tensor,
    chunk_size: int = 4096,
    bank_chunk_size: int = 65536,
) -> torch.Tensor:
    """Euclidean distance of each query row to its nearest bank row, in bounded-memory blocks."""
    if queries.shape[1] != bank.shape[1]:
        raise ValueError(f"feature dims differ: queries have {queries.shape[1]}, the bank has {bank.shape[1]}")
    if bank.shape[0] == 0:
        raise ValueError("the memory bank is empty")
    if chunk_size < 1 or bank_chunk_size < 1:
        raise ValueError("chunk sizes must be >= 1")
    out = torch.empty(queries.shape[0], dtype=queries.dtype, device=queries.device)
    for i in range(0, queries.shape[0], chunk_size):
        q = queries[i : i + chunk_size]
        best = torch.full((q.shape[0],), float("inf"), dtype=q.dtype, device=q.device)
        for j in range(0, bank.shape[0], bank_chunk_size):
            best = torch.minimum(best, _sq_dists(q, bank[j : j + bank_chunk_size]).min(dim=1).values)
        out[i : i + chunk_size] = best.sqrt()
    return out


def greedy_coreset(
    rows: torch.Tensor,
    n_select: int,
    projection_dim: int | None = 128,
    seed: int = 0,
    start_index: int | None = None,
    chunk_size: int = 65536,
) -> torch.Tensor:
    """Greedy k-center coreset (PatchCore): indices of ``n_select`` rows, in selection order.

    Each step adds the row whose distance to the nearest already-selected row is largest.

    Args:
        rows: ``(M, C)`` features.
        n_select: how many rows to keep (1..M).
        projection_dim: if set and smaller than ``C``, distances are computed after a seeded
            Gaussian random projection to this many dimensions (``None`` = exact distances).
        seed: seeds the projection and the random first row.
        start_index: first row (default: random, seeded).
        chunk_size: rows per block when updating distances.
    """
    m, c = rows.shape
    if not 1 <= n_select <= m:
        raise ValueError(f"n_select must be in 1..{m}, got {n_select}")
    gen = torch.Generator().manual_seed(int(seed))
    x = rows.float()
    if projection_dim is not None and projection_dim < c:
        proj = torch.randn(c, projection_dim, generator=gen) / float(np.sqrt(projection_dim))
        x = x @ proj.to(x.device)
    first = int(torch.randint(m, (1,), generator=gen)) if start_index is None else int(start_index)
    if not 0 <= first < m:
        raise ValueError(f"start_index {first} out of range 0..{m - 1}")
    selected = torch.empty(n_select, dtype=torch.long)
    selected[0] = first
    min_d = torch.full((m,), float("inf"), device=x.device)
    last = x[first : first + 1]
    for k in range(1, n_select):
        for j in range(0, m, chunk_size):
            block = _sq_dists(x[j : j + chunk_size], last)[:, 0]
            min_d[j : j + chunk_size] = torch.minimum(min_d[j : j + chunk_size], block)
        nxt = int(torch.argmax(min_d))
        selected[k] = nxt
        last = x[nxt : nxt + 1]
    return selected


class KNNPatchBaseline:
    """Nearest-neighbour patch-feature anomaly scorer (PatchCore without re-weighting).

    Args:
        coreset_ratio: fraction of training patches kept in the memory bank (1.0 = all).
        coreset_method: ``"greedy"`` (k-center, PatchCore) or ``"random"`` (seeded uniform subset).
        projection_dim: random-projection size used only for greedy selection.
        seed: seed of the coreset start / random subset / projection.
        chunk_size: test patches per distance block.
        bank_chunk_size: bank patches per distance block.
        device: torch device for the bank and the distance computation.

    Example:
        >>> import torch
        >>> model = KNNPatchBaseline(coreset_ratio=0.1).fit(torch.randn(8, 16, 7, 7))
        >>> image_scores, patch_maps = model.score(torch.randn(2, 16, 7, 7))
        >>> image_scores.shape, patch_maps.shape
        ((2,), (2, 7, 7))
    """

    def __init__(
        self,
        coreset_ratio: float = 1.0,
        coreset_method: str = "greedy",
        projection_dim: int | None = 128,
        seed: int = 0,
        chunk_size: int = 4096,
        bank_chunk_size: int = 65536,
        device: str | torch.device = "cpu",
    ) -> None:
        if not 0.0 < coreset_ratio <= 1.0:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
        if coreset_method not in ("greedy", "random"):
            raise ValueError(f"coreset_method must be 'greedy' or 'random', got {coreset_method!r}")
        self.coreset_ratio = float(coreset_ratio)
        self.coreset_method = coreset_method
        self.projection_dim = projection_dim
        self.seed = int(seed)
        self.chunk_size = int(chunk_size)
        self.bank_chunk_size = int(bank_chunk_size)
        self.device = torch.device(device)
        self.memory_bank: torch.Tensor | None = None
        self.coreset_indices: torch.Tensor | None = None

    def fit(self, train_features: Any) -> "KNNPatchBaseline":
        """Build the memory bank from ``(N, C, H, W)`` training patch features; returns ``self``."""
        feats = _as_tensor(train_features, "train_features").to(self.device, torch.float32)
        rows, _ = _to_rows(feats, "train_features")
        m = rows.shape[0]
        if m == 0:
            raise ValueError("train_features hold no patches")
        n_keep = max(1, int(round(self.coreset_ratio * m)))
        if n_keep >= m:
            idx = torch.arange(m)
        elif self.coreset_method == "random":
            gen = torch.Generator().manual_seed(self.seed)
            idx = torch.randperm(m, generator=gen)[:n_keep].sort().values
        else:
            idx = greedy_coreset(rows, n_keep, projection_dim=self.projection_dim, seed=self.seed,
                                 chunk_size=self.bank_chunk_size)
        self.coreset_indices = idx
        self.memory_bank = rows[idx.to(rows.device)].contiguous()
        return self

    def score(self, test_features: Any) -> tuple[np.ndarray, np.ndarray]:
        """Score ``(N, C, H, W)`` test features.

        Returns:
            ``(image_scores (N,), patch_maps (N, H, W))`` as float32 numpy arrays: each patch's
            distance to its nearest memory-bank patch, and the maximum per image.
        """
        if self.memory_bank is None:
            raise RuntimeError("call fit() before score()")
        feats = _as_tensor(test_features, "test_features").to(self.device, torch.float32)
        rows, (n, h, w) = _to_rows(feats, "test_features")
        if rows.shape[1] != self.memory_bank.shape[1]:
            raise ValueError(
                f"test features have {rows.shape[1]} channels but the memory bank has {self.memory_bank.shape[1]}"
            )
        with torch.no_grad():
            d = nearest_distances(rows, self.memory_bank, self.chunk_size, self.bank_chunk_size)
        maps = d.reshape(n, h, w).cpu().numpy().astype(np.float32)
        return maps.reshape(n, -1).max(axis=1), maps
