"""Textures: scikit-image's brick, grass and gravel images (CC0), normalised, loaded once per process."""

from __future__ import annotations

import numpy as np

_TEXTURES: dict[str, np.ndarray] = {}


def load_textures() -> dict[str, np.ndarray]:
    """Name -> (512, 512) float32 texture with zero mean and unit std (also ``<name>_smooth``)."""
    if not _TEXTURES:
        from scipy.ndimage import gaussian_filter
        from skimage import data as skdata

        for name in ("brick", "grass", "gravel"):
            t = getattr(skdata, name)().astype(np.float32)
            t = (t - t.mean()) / (t.std() + 1e-6)
            _TEXTURES[name] = t
            smooth = gaussian_filter(t, 6.0, mode="wrap")
            _TEXTURES[name + "_smooth"] = (smooth - smooth.mean()) / (smooth.std() + 1e-6)
    return _TEXTURES
