"""Image processor of LADMIM: any PIL mode to RGB, squash-resize, ImageNet normalisation.

Shipped to the Hub with the model; uses only PIL, numpy, torch and transformers (no torchvision).
Reading and preparing pixels is done by the torch-free sibling `imaging_ladmim`, which exported graphs
use too.
"""

from __future__ import annotations

from typing import Iterable

import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

from .imaging_ladmim import (  # noqa: F401  re-exported: the names callers import from here
    DEFAULT_MAX_PIXELS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_ASPECT_RATIO,
    MAX_DECODED_SIDE,
    ImageDecodeError,
    load_image,
    prepare_image,
    to_rgb,
)


class LadmimImageProcessor(BaseImageProcessor):
    r"""Prepares images for [`LadmimForAnomalyDetection`].

    Every image is converted to RGB (any PIL mode, EXIF orientation applied), resized to
    `size x size` without keeping the aspect ratio (as LADMIM does), scaled to 0..1 and normalised
    with the ImageNet mean and std.

    Args:
        size (`int`, *optional*, defaults to 224): output height and width.
        resample (`int`, *optional*, defaults to `PIL.Image.BILINEAR`): PIL resampling filter.
        image_mean (`tuple[float]`, *optional*): per-channel mean, ImageNet by default.
        image_std (`tuple[float]`, *optional*): per-channel std, ImageNet by default.
        max_pixels (`int`, *optional*, defaults to 100_000_000): larger inputs are refused.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        size: int = 224,
        resample: int = Image.BILINEAR,
        image_mean: Iterable[float] = IMAGENET_MEAN,
        image_std: Iterable[float] = IMAGENET_STD,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(size, dict):  # tolerate transformers-style {"height": h, "width": w}
            size = int(size.get("height", size.get("shortest_edge", 224)))
        self.size = int(size)
        self.resample = int(resample)
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        self.max_pixels = int(max_pixels)

    def preprocess_one(self, image) -> torch.Tensor:
        """One image (path, PIL, array) -> normalised float tensor `(3, size, size)`."""
        return torch.from_numpy(prepare_image(image, self.size, self.resample, self.image_mean, self.image_std,
                                              self.max_pixels))

    def preprocess(self, images, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        """Images -> `BatchFeature` with `pixel_values` of shape `(batch, 3, size, size)`."""
        if isinstance(images, (list, tuple)):
            if len(images) == 0:
                raise ImageDecodeError("no images given")
            items = list(images)
        else:
            items = [images]
        pixel_values = torch.stack([self.preprocess_one(item) for item in items])
        if return_tensors in (None, "np"):
            return BatchFeature({"pixel_values": pixel_values.numpy()}, tensor_type=return_tensors)
        return BatchFeature({"pixel_values": pixel_values})

    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)

    def postprocess_anomaly_map(self, anomaly_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Resize maps `(batch, H, W)` to an original image size `(height, width)`."""
        return torch.nn.functional.interpolate(
            anomaly_map[:, None].float(), size=size, mode="bilinear", align_corners=False
        )[:, 0]


__all__ = ["DEFAULT_MAX_PIXELS", "IMAGENET_MEAN", "IMAGENET_STD", "MAX_ASPECT_RATIO", "MAX_DECODED_SIDE",
           "ImageDecodeError", "LadmimImageProcessor", "load_image", "prepare_image", "to_rgb"]
