"""Tests of ladmim_hf.visualization: every figure renders off-screen to a PNG of sensible size."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ladmim_hf import visualization as V


def _png_size(path):
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_heatmap_overlay_size_and_pixels():
    image = Image.new("RGB", (120, 90), (128, 128, 128))
    amap = np.zeros((9, 12), dtype=np.float32)
    amap[1:3, 1:3] = 1.0  # hot spot in the top-left corner
    out = V.heatmap_overlay(image, amap, alpha=0.5)
    assert isinstance(out, Image.Image) and out.size == (120, 90) and out.mode == "RGB"
    arr = np.asarray(out).astype(int)
    base = np.asarray(image).astype(int)
    hot, cold = arr[20, 20], arr[80, 110]
    assert hot[0] > hot[2] and cold[2] > cold[0]  # jet: red where high, blue where low
    assert np.abs(arr[20, 20] - base[20, 20]).sum() > 50
    # alpha 0 leaves the image untouched
    np.testing.assert_array_equal(np.asarray(V.heatmap_overlay(image, amap, alpha=0.0)), base)


def test_heatmap_overlay_one_pixel_and_one_row_images():
    """Maps of 1x1 or 1xW images (what `ladmim predict` gets for such files) stay 2-D; batch and
    channel axes of size 1 are dropped."""
    dot = Image.new("RGB", (1, 1), (200, 10, 10))
    assert V.heatmap_overlay(dot, np.full((1, 1), 0.5, np.float32)).size == (1, 1)
    assert V.heatmap_overlay(dot, np.full((1, 1, 1), 0.5, np.float32)).size == (1, 1)
    row = Image.new("RGB", (7, 1))
    out = V.heatmap_overlay(row, np.arange(7, dtype=np.float32)[None], alpha=1.0)
    arr = np.asarray(out).astype(int)
    assert out.size == (7, 1) and arr[0, 0, 2] > arr[0, 0, 0] and arr[0, -1, 0] > arr[0, -1, 2]  # low -> high along x
    assert V.heatmap_overlay(Image.new("RGB", (6, 4)), np.ones((1, 4, 6, 1))).size == (6, 4)
    with pytest.raises(ValueError, match="2-D"):
        V.heatmap_overlay(dot, np.ones((2, 3, 4)))


def test_heatmap_overlay_array_inputs_and_fixed_range():
    chw = np.random.default_rng(0).random((3, 32, 48)).astype(np.float32)  # CHW floats in [0, 1]
    out = V.heatmap_overlay(chw, np.ones((4, 6)), vmin=0.0, vmax=2.0)
    assert out.size == (48, 32)
    gray = (np.arange(32 * 32).reshape(32, 32) % 255).astype(np.uint8)
    assert V.heatmap_overlay(gray, np.zeros((8, 8))).size == (32, 32)  # constant map is fine
    with pytest.raises(ValueError, match="alpha"):
        V.heatmap_overlay(gray, np.zeros((8, 8)), alpha=1.5)


def test_plot_roc_curves(tmp_path):
    curves = {
        "logical": (np.array([0, 0.2, 1]), np.array([0, 0.7, 1]), 0.75),
        "structural": (np.array([0, 0.1, 1]), np.array([0, 0.9, 1]), 0.9),
    }
    path = V.plot_roc_curves(curves, tmp_path / "sub" / "roc.png", title="breakfast_box")
    w, h = _png_size(path)
    assert 300 <= w <= 1000 and 300 <= h <= 1000


def test_plot_score_histograms(tmp_path):
    rng = np.random.default_rng(0)
    scores = np.r_[rng.normal(0, 1, 30), rng.normal(2, 1, 20), rng.normal(3, 1, 10)]
    types = ["good"] * 30 + ["logical"] * 20 + ["structural"] * 10
    w, h = _png_size(V.plot_score_histograms(scores, types, tmp_path / "hist.png", title="scores"))
    assert 300 <= w <= 1200 and 200 <= h <= 900
    with pytest.raises(ValueError, match="differ in length"):
        V.plot_score_histograms(scores, types[:-1], tmp_path / "bad.png")


def test_heatmap_grid(tmp_path):
    rng = np.random.default_rng(0)
    items = [
        {
            "image": Image.fromarray((rng.random((64, 80, 3)) * 255).astype(np.uint8)),
            "title": f"image {i}",
            "maps": {"structural": rng.random((8, 10)), "logical": rng.random((8, 10))},
        }
        for i in range(3)
    ]
    items.append({"image": rng.random((64, 80)), "title": "only logical", "maps": {"logical": rng.random((8, 10))}})
    w, h = _png_size(V.heatmap_grid(items, tmp_path / "grid.png"))
    assert w > h / 4 * 2  # three columns wide, four rows high
    assert 500 <= w <= 1500 and 700 <= h <= 2000
    _png_size(V.heatmap_grid(items[:1], tmp_path / "grid_shared.png", shared_scale=True))
    with pytest.raises(ValueError, match="at least one"):
        V.heatmap_grid([], tmp_path / "empty.png")


def test_plot_histogram_comparison(tmp_path):
    rng = np.random.default_rng(0)
    for k in (16, 512):  # bars for small vocabularies, step lines for large ones
        predicted = rng.dirichlet(np.ones(k), size=4)
        actual = rng.dirichlet(np.ones(k), size=4)
        path = tmp_path / f"hist_{k}.png"
        image = V.plot_histogram_comparison(predicted, actual, path=path)
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        assert 400 <= image.size[0] <= 1200 and 400 <= image.size[1] <= 1500
        assert _png_size(path) == image.size
    assert V.plot_histogram_comparison(predicted[:1], actual[:1]).size[1] < image.size[1]
    with pytest.raises(ValueError, match="levels, K"):
        V.plot_histogram_comparison(predicted, actual[:, :10])

