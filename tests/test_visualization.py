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


def test_heatmap_scale_is_centred_on_the_threshold():
    assert V.heatmap_scale(3.0) == (0.0, 6.0)  # threshold >= 1: [0, 2 * threshold]
    assert V.heatmap_scale(1.0) == (0.0, 2.0)
    assert V.heatmap_scale(0.25) == (-0.75, 1.25)  # below 1: still 2 z units wide
    assert V.heatmap_scale(0.0) == (-1.0, 1.0)
    assert V.heatmap_scale(-2.0) == (-3.0, -1.0)  # never collapsed or inverted
    with pytest.raises(ValueError, match="finite"):
        V.heatmap_scale(float("nan"))


def test_fixed_scale_gives_one_value_one_colour_and_clips():
    """On a fixed [0, 2] scale, 0.5 is the same colour in a map spanning [0, 1] and in one spanning
    [0, 10] (jet at 0.25: no red, half green, full blue); 2, 5 and 10 all clip to jet's top (dark red)."""
    image = Image.new("RGB", (4, 1))
    small, large = np.array([[0.0, 0.5, 1.0, 1.0]]), np.array([[0.5, 2.0, 5.0, 10.0]])
    fixed = [np.asarray(V.heatmap_overlay(image, m, alpha=1.0, vmin=0.0, vmax=2.0)).astype(int)[0]
             for m in (small, large)]
    np.testing.assert_array_equal(fixed[0][1], fixed[1][0])
    assert np.abs(fixed[0][1] - [0, 128, 255]).max() <= 2
    for pixel in fixed[1][1:]:
        assert np.abs(pixel - [128, 0, 0]).max() <= 2  # jet(1.0) = (0.5, 0, 0)
    # Per-image min-max (no vmin/vmax) colours the two 0.5 cells differently: the fixed scale is what matters.
    own = [np.asarray(V.heatmap_overlay(image, m, alpha=1.0)).astype(int)[0] for m in (small, large)]
    assert np.abs(own[0][1] - own[1][0]).max() > 50


def _bar_column(panel: np.ndarray) -> int:
    """The panel column through the colour bar: the one with the most saturated pixels."""
    saturation = panel.max(axis=2).astype(int) - panel.min(axis=2)
    return int(np.argmax((saturation > 150).sum(axis=0)))


def test_heatmap_with_colorbar_layout_and_bar():
    image = Image.new("RGB", (40, 30), (128, 128, 128))
    amap = np.linspace(-1.0, 5.0, 12, dtype=np.float32).reshape(3, 4)
    out = V.heatmap_with_colorbar(image, amap, 0.0, 2.0, threshold=1.0)
    assert isinstance(out, Image.Image) and out.mode == "RGB"
    # 30 px tall: enlarged 11 times (to >= 320 px), the colour bar to the right of the 440 x 330 overlay
    assert out.height == 330 and out.width > 440 + 100
    arr = np.asarray(out)
    expected = V.heatmap_overlay(image, amap, vmin=0.0, vmax=2.0).resize((440, 330), Image.NEAREST)
    np.testing.assert_array_equal(arr[:, :440], np.asarray(expected))
    panel = arr[:, 440:].astype(int)
    column = panel[:, _bar_column(panel)]
    coloured = np.flatnonzero(column.max(axis=1) - column.min(axis=1) > 150)
    top, bottom = column[coloured[0] + 3], column[coloured[-1] - 3]
    assert top[0] > 100 and top[2] < 50 and bottom[2] > 100 and bottom[0] < 50  # red (high) above blue (low)
    # The threshold, mid-scale, is a black line across the middle of the bar.
    middle = column[out.height // 2 - 4: out.height // 2 + 5]
    assert (middle.max(axis=1) < 60).any(), middle
    unmarked = np.asarray(V.heatmap_with_colorbar(image, amap, 0.0, 2.0, threshold=None))[:, 440:].astype(int)
    assert (unmarked[out.height // 2 - 4: out.height // 2 + 5, _bar_column(panel)].max(axis=1) > 60).all()


def test_heatmap_with_colorbar_small_odd_and_bad_inputs():
    dot = V.heatmap_with_colorbar(Image.new("RGB", (1, 1)), np.ones((1, 1)), -1.0, 1.0, threshold=5.0)  # off scale
    assert dot.height == 320 and dot.width > 320
    wide = V.heatmap_with_colorbar(Image.new("RGB", (2000, 1)), np.zeros((1, 8)), 0.0, 1.0)
    assert wide.height == 320 and wide.width < 4096 + 1000, "enlargement capped at 4096 px wide"
    with pytest.raises(ValueError, match="vmin < vmax"):
        V.heatmap_with_colorbar(Image.new("RGB", (4, 4)), np.zeros((4, 4)), 1.0, 1.0)


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

