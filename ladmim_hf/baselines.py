"""PatchCore-style kNN baseline on backbone patch features (Roth et al., CVPR 2022).

``KNNPatchBaseline.fit`` stores every training patch feature (optionally a coreset of them) in a
memory bank; ``score`` gives each test patch the Euclidean distance to its nearest bank patch and
each image the maximum over its patches. This is the plain PatchCore score without its
neighbourhood re-weighting of the image score.

The coreset selection and the bounded-memory nearest-neighbour search are the detector's own
(``branches_ladmim``), whose memory-bank branch is this baseline stored inside the model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .models.branches_ladmim import greedy_coreset, nearest_distances

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
