"""Reading and preparing images for LADMIM, with numpy and PIL only (no torch).

Shipped to the Hub with the model and copied beside every exported graph (`ladmim export`), so a
deployment that scores with ONNX Runtime or OpenVINO prepares pixels exactly as
[`LadmimImageProcessor`] does without installing torch. `image_processing_ladmim` imports it
relatively.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Guard against decompression bombs: PIL warns at 89 MP by default and errors at twice that.
DEFAULT_MAX_PIXELS = 100_000_000
# The model sees a few hundred pixels a side: larger images are reduced while decoding (JPEG) or right
# after (an integer box filter), so memory follows this side, not the file's resolution.
MAX_DECODED_SIDE = 4096
# A 1 x 99,000,000 strip passes the pixel guard but is no picture to squash into a square.
MAX_ASPECT_RATIO = 100


class ImageDecodeError(ValueError):
    """An input could not be read as an image; the message names the file."""


def _describe(image) -> str:
    return getattr(image, "filename", None) or f"<{type(image).__name__}>"


def to_rgb(image: Image.Image, source: str = "") -> Image.Image:
    """Convert any PIL mode (1, L, LA, P, RGBA, CMYK, I;16, I, F) to 8-bit RGB.

    16-bit and float images are rescaled by their own range so they do not saturate to white;
    transparency is composited on black (industrial images have no meaningful alpha).
    """
    name = source or _describe(image)
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not reject an otherwise readable image
        pass
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if array.ndim == 3:
            array = array[..., 0]
        low, high = float(np.min(array)), float(np.max(array))
        scale = 255.0 / (high - low) if high > low else 0.0
        array = ((array - low) * scale).round().clip(0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if mode == "P":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except Exception as error:
        raise ImageDecodeError(f"cannot convert image {name} from mode {mode!r} to RGB: {error}") from error


def load_image(image, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open a path, PIL image or array as a decoded RGB PIL image, with errors naming the file.

    Args:
        image: a path, a PIL image, a `(H, W)`/`(H, W, C)` numpy array (uint8, uint16 or float in
            0..1) or a `(C, H, W)` torch tensor.
        max_pixels: images larger than this are refused (decompression-bomb guard).

    Images longer than `MAX_DECODED_SIDE` pixels on a side are returned reduced by an integer factor
    (JPEGs decode at the reduced scale), and aspect ratios over `MAX_ASPECT_RATIO` are refused.
    """
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise ImageDecodeError(f"image file not found: {path}")
        if os.path.getsize(path) == 0:
            raise ImageDecodeError(f"image file is empty (0 bytes): {path}")
        try:
            with Image.open(path) as opened:
                _check_size(opened.size, path, max_pixels, opened.mode)
                factor = _reduction(opened.size)
                if factor > 1 and opened.format == "JPEG":  # decode at 1/2, 1/4 or 1/8 scale directly
                    opened.draft(opened.mode, (-(-opened.size[0] // factor), -(-opened.size[1] // factor)))
                opened.load()
                return to_rgb(_shrink(opened), path)
        except ImageDecodeError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ImageDecodeError(f"image {path} is too large to decode safely: {error}") from error
        except Exception as error:  # PIL raises many types for corrupt or truncated files
            raise ImageDecodeError(f"cannot read image {path}: {type(error).__name__}: {error}") from error
    if isinstance(image, Image.Image):
        name = _describe(image)
        _check_size(image.size, name, max_pixels, image.mode)
        try:
            image.load()
        except Exception as error:
            raise ImageDecodeError(f"cannot decode image {name}: {type(error).__name__}: {error}") from error
        return to_rgb(_shrink(image), name)
    if hasattr(image, "detach") and hasattr(image, "numpy"):  # a torch tensor, without importing torch
        image = image.detach().cpu()
        if image.ndim == 3 and image.shape[0] in (1, 3, 4):
            image = image.permute(1, 2, 0)
        image = image.numpy()
    if isinstance(image, np.ndarray):
        return _array_to_image(image, max_pixels)
    raise ImageDecodeError(f"unsupported image input of type {type(image).__name__}; pass a path, PIL image or array")


def _reduction(size: tuple[int, int]) -> int:
    """The integer factor that brings the longer side to at most `MAX_DECODED_SIDE`."""
    return -(-max(size) // MAX_DECODED_SIDE)


def _shrink(image: Image.Image) -> Image.Image:
    """`image` with its longer side at most `MAX_DECODED_SIDE` (box filter by an integer factor)."""
    factor = _reduction(image.size)
    if factor <= 1:
        return image
    try:
        return image.reduce(factor)
    except ValueError:  # a mode `reduce` does not handle (e.g. P, CMYK): reduce its RGB version
        return to_rgb(image).reduce(factor)


# Bytes per pixel while decoding, relative to 8-bit RGB's 3: 16-bit and 32-bit modes are converted
# through float64 (8 bytes a pixel), so the pixel budget shrinks with them.
_DECODE_BYTES = {"1": 1, "L": 1, "P": 4, "LA": 4, "PA": 4, "RGB": 3, "RGBA": 4, "CMYK": 4, "YCbCr": 3,
                 "I;16": 8, "I;16B": 8, "I;16L": 8, "I;16N": 8, "I": 8, "F": 8}


def _check_size(size: tuple[int, int], name: str, max_pixels: int, mode: str = "RGB") -> None:
    """Refuse empty images, extreme aspect ratios, and images whose decoding would cost more memory than
    `max_pixels` of 8-bit RGB (a 16-bit image may have 3/8 as many pixels)."""
    width, height = size
    budget = max_pixels * 3 // _DECODE_BYTES.get(mode, 4) if max_pixels else 0
    if width < 1 or height < 1:
        raise ImageDecodeError(f"image {name} has no pixels ({width}x{height})")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageDecodeError(f"image {name} is {width}x{height}, an aspect ratio over {MAX_ASPECT_RATIO}:1; "
                               "crop it to the product first")
    if budget and width * height > budget:
        raise ImageDecodeError(
            f"image {name} is {width}x{height} = {width * height} pixels, over the limit of {budget} for mode {mode} "
            f"({max_pixels} of 8-bit RGB; decompression-bomb guard); resize it first or raise max_pixels"
        )


def _array_to_image(array: np.ndarray, max_pixels: int) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageDecodeError(f"array image must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {array.shape}")
    _check_size((array.shape[1], array.shape[0]), "<array>", max_pixels)
    if array.dtype == np.uint8:
        data = array
    elif array.dtype == np.uint16:
        data = (array.astype(np.float64) / 257.0).round().astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating) or array.dtype == np.bool_:
        values = array.astype(np.float64)
        if not np.all(np.isfinite(values)):
            raise ImageDecodeError("array image contains NaN or infinite values")
        data = (values.clip(0.0, 1.0) * 255.0).round().astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer):
        data = array.clip(0, 255).astype(np.uint8)
    else:
        raise ImageDecodeError(f"array image has unsupported dtype {array.dtype}")
    return to_rgb(Image.fromarray(np.ascontiguousarray(data)))


def prepare_image(image, size: int, resample: int = Image.BILINEAR, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """One image (path, PIL, array) -> normalised float32 pixels `(3, size, size)`: RGB, squash-resized
    to `size x size`, scaled to 0..1 and normalised with `image_mean` / `image_std`."""
    rgb = load_image(image, max_pixels=max_pixels)
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), resample=resample)
    array = np.asarray(rgb, dtype=np.float32) / 255.0
    array = (array - np.asarray(image_mean, dtype=np.float32)) / np.asarray(image_std, dtype=np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


__all__ = ["DEFAULT_MAX_PIXELS", "IMAGENET_MEAN", "IMAGENET_STD", "ImageDecodeError", "MAX_ASPECT_RATIO",
           "MAX_DECODED_SIDE", "load_image", "prepare_image", "to_rgb"]
