"""Property-based fuzzing of the image path: random arrays, PIL modes and sizes through the image
processor and the detector. Anything other than our clear ImageDecodeError is a bug; scores must be
finite and shapes right."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ladmim_hf import ImageDecodeError, LadmimForAnomalyDetection, LadmimImageProcessor

MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "YCbCr", "HSV"]

_model = None


def _tiny_model():
    global _model
    if _model is None:
        from conftest import tiny_config

        torch.manual_seed(0)
        _model = LadmimForAnomalyDetection(tiny_config()).eval()
    return _model


@st.composite
def pil_images(draw):
    mode = draw(st.sampled_from(MODES))
    width = draw(st.integers(1, 48))
    height = draw(st.integers(1, 48))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    if mode in ("I;16", "I", "F"):
        values = rng.integers(0, 65536, (height, width)).astype(np.uint16 if mode == "I;16" else np.int32)
        image = Image.fromarray(values.astype(np.float32) if mode == "F" else values, mode if mode != "I;16" else None)
        return image if mode != "I;16" else image.convert("I;16") if image.mode != "I;16" else image
    return base.convert(mode)


@st.composite
def arrays(draw):
    dtype = draw(st.sampled_from([np.uint8, np.uint16, np.float32, np.float64, np.int64, np.bool_]))
    shape = draw(st.sampled_from([(5, 7), (5, 7, 1), (5, 7, 3), (5, 7, 4), (3,), (2, 2, 2, 2), (0, 4, 3), (6, 6, 5)]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    values = rng.normal(0.5, 2.0, shape)
    if draw(st.booleans()) and values.size:
        values.flat[0] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e30]))
    with np.errstate(invalid="ignore", over="ignore"):
        return values.astype(dtype) if dtype is not np.bool_ else values > 0.5


FUZZ = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(image=pil_images())
def test_processor_accepts_any_pil_mode_or_names_the_problem(image):
    processor = LadmimImageProcessor(size=32)
    try:
        out = processor(image)["pixel_values"]
    except ImageDecodeError as error:
        assert str(error)
        return
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


@FUZZ
@given(array=arrays())
def test_processor_arrays_are_handled_or_refused_clearly(array):
    processor = LadmimImageProcessor(size=32)
    try:
        out = processor(array)["pixel_values"]
    except ImageDecodeError as error:
        assert "array" in str(error) or "pixels" in str(error) or "NaN" in str(error)
        return
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(images=st.lists(pil_images(), min_size=1, max_size=3), num_masks=st.integers(1, 4), seed=st.integers(0, 1000))
def test_detector_scores_are_finite_with_right_shapes(images, num_masks, seed):
    model = _tiny_model()
    processor = LadmimImageProcessor(size=64)
    try:
        inputs = processor(images)
    except ImageDecodeError:
        return
    out = model(**inputs, category="pushpins", num_masks=num_masks, seed=seed)
    batch = len(images)
    assert out.pred_score.shape == (batch,) and torch.isfinite(out.pred_score).all()
    assert out.anomaly_map.shape == (batch, 64, 64) and torch.isfinite(out.anomaly_map).all()
    assert out.mask_scores.shape == (batch, num_masks)
