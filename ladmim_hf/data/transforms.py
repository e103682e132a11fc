"""Rows of the loaders as model inputs: images -> `pixel_values`, masks -> bool tensors, and a collate."""

from __future__ import annotations

from typing import Mapping

import numpy as np
from PIL import Image as PILImage

__all__ = ["collate_anomaly_batch", "make_batch_transform"]


def _to_pixel_values(transform, image):
    import torch

    if hasattr(transform, "preprocess_one"):
        out = transform.preprocess_one(image)
    else:
        out = transform(image)
        if isinstance(out, Mapping):  # dict or BatchFeature
            out = out["pixel_values"]
            if isinstance(out, (list, tuple)):
                out = out[0]
            elif getattr(out, "ndim", 0) == 4:
                out = out[0]
    if isinstance(out, np.ndarray):
        out = torch.from_numpy(out)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"transform returned {type(out).__name__}; expected a tensor, an array or a dict with 'pixel_values'")
    return out


def _binarise(mask_images, height: int, width: int):
    import torch

    arrays = []
    for mask in mask_images:
        if mask.size != (width, height):
            mask = mask.resize((width, height), PILImage.NEAREST)
        array = np.asarray(mask)
        if array.ndim == 3:
            array = array[..., 0]
        arrays.append(array > 0)
    if not arrays:
        return torch.zeros((0, height, width), dtype=torch.bool)
    return torch.from_numpy(np.stack(arrays))


def make_batch_transform(transform):
    """Wrap an image processor / callable as a ``Dataset.with_transform`` batch function."""

    def apply(batch: dict) -> dict:
        pixel_values = [_to_pixel_values(transform, image) for image in batch["image"]]
        out = {"pixel_values": pixel_values}
        for key in ("label", "anomaly_type", "category", "path", "defect_type"):
            if key in batch:
                out[key] = batch[key]
        if "masks" in batch:
            masks, unions = [], []
            for pv, regions in zip(pixel_values, batch["masks"]):
                h, w = pv.shape[-2:]
                m = _binarise(regions or [], h, w)
                masks.append(m)
                unions.append(m.any(0) if len(m) else m.new_zeros((h, w)))
            out["masks"] = masks
            out["mask"] = unions
        return out

    return apply


def collate_anomaly_batch(rows: list[dict]) -> dict:
    """``torch.utils.data.DataLoader`` collate function for transformed rows.

    Stacks ``pixel_values``, ``mask``, ``label`` and ``anomaly_type``; keeps ``masks``,
    ``category``, ``path`` and ``defect_type`` as lists (their lengths vary).
    """
    import torch

    out: dict = {"pixel_values": torch.stack([r["pixel_values"] for r in rows])}
    for key in ("label", "anomaly_type"):
        if key in rows[0]:
            out[key] = torch.tensor([int(r[key]) for r in rows])
    if "mask" in rows[0]:
        out["mask"] = torch.stack([r["mask"] for r in rows])
    for key in ("masks", "category", "path", "defect_type"):
        if key in rows[0]:
            out[key] = [r[key] for r in rows]
    return out
