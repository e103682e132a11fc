"""Tests of ladmim_hf.metrics (image AUROC helpers and AU-sPRO) and of the evaluate wrappers."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from ladmim_hf import metrics as M

# --------------------------------------------------------------------------------------------
# Image level
# --------------------------------------------------------------------------------------------


def test_image_auroc_hand_computed():
    # Anomalous scores {0.35, 0.8} vs normal {0.1, 0.4}: 3 of the 4 pairs are ordered -> 0.75.
    assert M.image_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert M.image_auroc(np.array([0.1, 0.2, 0.9]), np.array([False, False, True])) == 1.0
    # Ties between classes count one half: (0.5 vs 0.5) -> 0.5.
    assert M.image_auroc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)


def test_image_auroc_is_never_flipped():
    assert M.image_auroc([0.9, 0.8, 0.1, 0.2], [0, 0, 1, 1]) == 0.0


def test_image_auroc_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    assert M.image_auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("scores", "labels", "match"),
    [
        ([0.1, 0.2, 0.3], [0, 0, 0], "only one class"),
        ([0.1, 0.2, 0.3], [1, 1, 1], "only one class"),
        ([0.1, float("nan"), 0.3], [0, 1, 1], "NaN"),
        ([0.1, float("inf"), 0.3], [0, 1, 1], "inf"),
        ([0.1, 0.2, 0.3], [0, 1, 2], "0 \\(normal\\) or 1"),
        ([0.1, 0.2, 0.3], [0, 1], "differ in length"),
    ],
)
def test_image_auroc_errors(scores, labels, match):
    with pytest.raises(ValueError, match=match):
        M.image_auroc(scores, labels)


def test_roc_curve_points_endpoints():
    fpr, tpr, thr = M.roc_curve_points([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    assert (fpr[0], tpr[0]) == (0.0, 0.0)
    assert (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.isinf(thr[0])
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.75)


def test_loco_image_aurocs():
    scores = [0.1, 0.2, 0.3, 0.5, 0.15, 0.9]
    types = ["good", "good", "logical", "logical", "structural", "structural"]
    out = M.loco_image_aurocs(scores, types)
    # logical {0.3, 0.5} > good {0.1, 0.2}: 1.0; structural {0.15, 0.9}: 0.15 beats 0.1 only -> 3/4.
    assert out["auroc_logical"] == pytest.approx(1.0)
    assert out["auroc_structural"] == pytest.approx(0.75)
    assert out["auroc_mean"] == pytest.approx(0.875)


def test_loco_image_aurocs_missing_subset_warns():
    with pytest.warns(RuntimeWarning, match="structural"):
        out = M.loco_image_aurocs([0.1, 0.2, 0.3], ["good", "good", "logical"])
    assert out["auroc_logical"] == 1.0
    assert math.isnan(out["auroc_structural"])
    assert out["auroc_mean"] == 1.0
    with pytest.raises(ValueError, match="unknown anomaly type"):
        M.loco_image_aurocs([0.1, 0.2], ["good", "bad"])


def test_threshold_at_fpr():
    normal = np.arange(100, dtype=float)  # 0..99
    t = M.threshold_at_fpr(normal, fpr=0.05)
    # At most 5 of 100 may lie above: 95..99 -> the threshold sits between 94 and 95.
    assert t == pytest.approx(94.5)
    assert np.mean(normal > t) == pytest.approx(0.05)
    assert np.mean(normal >= t) == pytest.approx(0.05)
    t0 = M.threshold_at_fpr(normal, fpr=0.0)
    assert t0 > 99 and np.mean(normal > t0) == 0.0
    assert np.mean(normal > M.threshold_at_fpr(normal, fpr=1.0)) == 1.0
    # Ties: with 10 copies of 1.0 the 5 % budget cannot be met by splitting them.
    tied = np.r_[np.zeros(90), np.ones(10)]
    assert np.mean(tied > M.threshold_at_fpr(tied, fpr=0.05)) == 0.0


def test_f1_optimal_threshold():
    t, f1 = M.f1_optimal_threshold([0.1, 0.2, 0.3, 0.8, 0.9], [0, 0, 1, 1, 1])
    assert t == pytest.approx(0.25) and f1 == pytest.approx(1.0)
    # A normal score (0.7) between anomalies. Cuts: {0.9} F1 1/2; {0.9, 0.8} P=1, R=2/3 -> 0.8;
    # {.., 0.7} 2/3; {.., 0.3} P=3/4, R=1 -> 6/7 (best); all -> 3/4. Threshold = (0.3 + 0.1) / 2.
    t, f1 = M.f1_optimal_threshold([0.1, 0.3, 0.7, 0.8, 0.9], [0, 1, 0, 1, 1])
    assert f1 == pytest.approx(6 / 7)
    assert t == pytest.approx(0.2)


# --------------------------------------------------------------------------------------------
# sPRO: a 4x4 hand-computed case
# --------------------------------------------------------------------------------------------
#
# One anomalous image, one region = the top-left 2x2 block (grey value 255, area 4):
#
#     map = 0.9 0.3 0.0 0.0        region values  : 0.9 0.3 0.5 0.7
#           0.5 0.7 0.0 0.0        defect-free    : 0.8 0.6 and ten 0.0  (12 pixels)
#           0.0 0.0 0.8 0.0
#           0.0 0.0 0.0 0.6
#
# A pixel is anomalous iff map > t. Walking t down through the distinct values:
#
#   t        region px > t      FP px > t   FPR    sPRO(sat=2)  sPRO(rel .75 -> 3)  sPRO(no sat, 4)
#   0.9      -                  -           0      0            0                   0
#   0.8      0.9                -           0      1/2          1/3                 1/4
#   0.7      0.9                0.8         1/12   1/2          1/3                 1/4
#   0.6      0.9 0.7            0.8         1/12   1            2/3                 2/4
#   0.5      0.9 0.7            0.8 0.6     2/12   1            2/3                 2/4
#   0.3      0.9 0.7 0.5        0.8 0.6     2/12   1            1                   3/4
#   0.0      all four           0.8 0.6     2/12   1            1                   1
#   -inf     all four           all 12      1      1            1                   1
#
# AU-sPRO up to max_fpr = 0.25 (trapezoids; the vertical steps at FPR 0, 1/12, 2/12 add nothing):
#   sat = 2     : [0, 1/12] at 1/2, [1/12, 0.25] at 1
#                 = 1/2 * 1/12 + 1 * (0.25 - 1/12) = 2.5/12        -> / 0.25 = 5/6
#   rel 0.75    : [0, 1/12] at 1/3, [1/12, 2/12] at 2/3, [2/12, 0.25] at 1
#                 = (1/3 + 2/3 + 1) / 12 = 2/12                    -> / 0.25 = 2/3
#   no sat      : [0,1/12] at 1/4, [1/12,2/12] at 2/4, [2/12,0.25] at 1 (sPRO reaches 1 at FPR 2/12)
#                 = (1/4 + 1/2 + 1) / 12 = 1.75/12                 -> / 0.25 = 7/12
# AU-sPRO up to max_fpr = 0.05 (< 1/12, the value there is interpolated on the flat part):
#   sat = 2: sPRO = 1/2 on [0, 0.05] -> 0.5.   rel 0.75: 1/3.   no sat: 1/4.

MAP = np.array(
    [
        [0.9, 0.3, 0.0, 0.0],
        [0.5, 0.7, 0.0, 0.0],
        [0.0, 0.0, 0.8, 0.0],
        [0.0, 0.0, 0.0, 0.6],
    ]
)
REGION = np.zeros((4, 4), dtype=np.uint8)
REGION[:2, :2] = 255


def _cfg(threshold, relative, pixel_value=255, name="defect"):
    return [
        {
            "defect_name": name,
            "pixel_value": pixel_value,
            "saturation_threshold": threshold,
            "relative_saturation": relative,
        }
    ]


def test_spro_curve_hand_computed_absolute_saturation():
    fpr, spro, thr = M.spro_curve([MAP], [[REGION]], _cfg(2, False))
    # Region values 0.5 and 0.3 add nothing once the region is saturated, so the curve needs no
    # vertex there; every listed threshold is a distinct map value, descending, then -inf.
    np.testing.assert_allclose(fpr, [0, 0, 1 / 12, 1 / 12, 2 / 12, 1])
    np.testing.assert_allclose(spro, [0, 0.5, 0.5, 1, 1, 1])
    np.testing.assert_allclose(thr, [0.9, 0.8, 0.7, 0.6, 0.0, -np.inf])
    assert M.au_spro([MAP], [[REGION]], _cfg(2, False), max_fpr=0.25) == pytest.approx(5 / 6)
    assert M.au_spro([MAP], [[REGION]], _cfg(2, False), max_fpr=0.05) == pytest.approx(0.5)


def test_spro_at_thresholds_hand_computed():
    ts = [0.9, 0.85, 0.65, 0.6, 0.4, 0.3, -1.0]
    spro, fpr = M.spro_at_thresholds([MAP], [[REGION]], _cfg(2, False), ts)
    np.testing.assert_allclose(spro, [0, 0.5, 1, 1, 1, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 1 / 12, 1 / 12, 2 / 12, 2 / 12, 1])
    # Relative 0.75 -> saturation area int(0.75 * 4) = 3. Strict ">": at t=0.6 only 0.9, 0.7 count.
    spro, _ = M.spro_at_thresholds([MAP], [[REGION]], _cfg(0.75, True), ts)
    np.testing.assert_allclose(spro, [0, 1 / 3, 2 / 3, 2 / 3, 1, 1, 1])


@pytest.mark.parametrize(
    ("config", "au_025", "au_005"),
    [
        (_cfg(2, False), 5 / 6, 0.5),
        (_cfg(0.5, True), 5 / 6, 0.5),  # int(0.5 * 4) = 2, same as absolute 2
        (_cfg(0.75, True), 2 / 3, 1 / 3),
        (_cfg(10, False), 7 / 12, 0.25),  # min(10, area 4) = 4: no saturation
        (None, 7 / 12, 0.25),
    ],
)
def test_au_spro_hand_computed(config, au_025, au_005):
    assert M.au_spro([MAP], [[REGION]], config, max_fpr=0.25) == pytest.approx(au_025)
    assert M.au_spro([MAP], [[REGION]], config, max_fpr=0.05) == pytest.approx(au_005)


def test_au_spro_fpr_on_good_images_only():
    # fpr_pixels="good_images": the anomalous image's own defect-free pixels are ignored; the FPR
    # comes from one good 4x4 image that is 0 except a single 0.85 (16 pixels).
    #   t=0.9: (0, 0)  t=0.85: (0, 1/2)  t=0.7: (1/16, 1/2)  t=0.0...: (1/16, 1)  -inf: (1, 1)
    #   area to 0.25 = 1/2 * 1/16 + 1 * (0.25 - 1/16) = 0.21875 -> / 0.25 = 0.875
    good = np.zeros((4, 4))
    good[0, 0] = 0.85
    maps, regions = [MAP, good], [[REGION], []]
    assert M.au_spro(maps, regions, _cfg(2, False), max_fpr=0.25, fpr_pixels="good_images") == pytest.approx(0.875)
    # Default (official code): defect-free pixels of all images, 12 + 16 = 28.
    fpr, _, _ = M.spro_curve(maps, regions, _cfg(2, False))
    assert set(np.round(fpr * 28, 9)) <= set(range(29))


def test_au_spro_perfect_and_constant_maps():
    rng = np.random.default_rng(0)
    masks = [(rng.random((16, 16)) > 0.8).astype(np.uint8) * 255 for _ in range(3)]
    perfect = [m.astype(float) / 255.0 for m in masks] + [np.zeros((16, 16))]
    regions = [[m] for m in masks] + [[]]
    assert M.au_spro(perfect, regions, _cfg(0.5, True)) == pytest.approx(1.0)
    # A constant map jumps from (0, 0) straight to (1, 1): sPRO(FPR) = FPR on the diagonal, so the
    # normalised area up to max_fpr is (max_fpr^2 / 2) / max_fpr = max_fpr / 2.
    constant = [np.full((16, 16), 0.3) for _ in range(4)]
    assert M.au_spro(constant, regions, _cfg(0.5, True), max_fpr=0.05) == pytest.approx(0.025)
    assert M.au_spro(constant, regions, _cfg(0.5, True), max_fpr=1.0) == pytest.approx(0.5)
    # An inverted map scores 0 up to any FPR < 1 (all defect-free pixels come first).
    inverted = [1.0 - p for p in perfect]
    assert M.au_spro(inverted, regions, _cfg(0.5, True)) == pytest.approx(0.0)


def test_overlapping_regions_count_separately():
    # Region A = row 0 (grey 255), region B = column 0 (grey 254); they overlap at (0, 0).
    # Without saturation each has area 4. Union = 7 pixels, defect-free = 9 pixels.
    #   map: (0,0)=1.0, rest of row 0 = 0.6, rest of column 0 = 0.4, (3,3) = 0.5, else 0.
    #   t=1.0: (0, 0)            t=0.6: A 1/4, B 1/4 -> (0, 0.25)
    #   t=0.5: A 4/4, B 1/4 -> (0, 0.625)     t=0.4: + (3,3) -> (1/9, 0.625)
    #   t=0.0: B 4/4 -> (1/9, 1)              -inf: (1, 1)
    #   area to 0.25 = 0.625 * 1/9 + 1 * (0.25 - 1/9) = 0.208333 -> / 0.25 = 0.833333
    m = np.zeros((4, 4))
    m[0, 1:] = 0.6
    m[1:, 0] = 0.4
    m[0, 0] = 1.0
    m[3, 3] = 0.5
    a = np.zeros((4, 4), np.uint8)
    a[0, :] = 255
    b = np.zeros((4, 4), np.uint8)
    b[:, 0] = 254
    fpr, spro, thr = M.spro_curve([m], [[a, b]], None)
    np.testing.assert_allclose(fpr, [0, 0, 0, 1 / 9, 1 / 9, 1])
    np.testing.assert_allclose(spro, [0, 0.25, 0.625, 0.625, 1, 1])
    np.testing.assert_allclose(thr, [1.0, 0.6, 0.5, 0.4, 0.0, -np.inf])
    assert M.au_spro([m], [[a, b]], None, max_fpr=0.25) == pytest.approx(0.625 / 9 / 0.25 + (0.25 - 1 / 9) / 0.25)
    # A (2, H, W) stack is accepted in place of the list.
    assert M.au_spro([m], [np.stack([a, b])], None, max_fpr=0.25) == pytest.approx(5 / 6)


def test_spro_matches_anomalib_reference_values():
    # Expected values from anomalib's sPRO unit test (tests/unit/metrics/test_spro.py at
    # b69f40a): an 8x5 map whose row r has value r/10 + 0.05, region 255 = rows 1,3,5,7 with an
    # absolute saturation of 10 px, region 254 = rows 0,6 with a relative saturation of 0.5.
    config = [
        {"defect_name": "a", "pixel_value": 255, "saturation_threshold": 10, "relative_saturation": False},
        {"defect_name": "b", "pixel_value": 254, "saturation_threshold": 0.5, "relative_saturation": True},
    ]
    rows = np.arange(8) / 10 + 0.05
    amap = np.repeat(rows[:, None], 5, axis=1)
    r255 = np.zeros((8, 5), np.uint8)
    r255[[1, 3, 5, 7]] = 255
    r254 = np.zeros((8, 5), np.uint8)
    r254[[0, 6]] = 254
    ts = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    spro, _ = M.spro_at_thresholds([amap], [[r255, r254]], config, ts)
    np.testing.assert_allclose(spro, [1.0, 1.0, 1.0, 0.75, 0.0, 0.0])
    spro, _ = M.spro_at_thresholds([amap], [[r255, r254]], None, ts)
    np.testing.assert_allclose(spro, [1.0, 0.625, 0.5, 0.375, 0.0, 0.0])


def _brute_force_curve(maps, regions, table, fpr_pixels="defect_free"):
    """The definition, literally: one pass over all pixels per threshold (tiny inputs only)."""
    values = np.unique(np.concatenate([m.ravel() for m in maps]))
    thresholds = np.r_[values[::-1], -np.inf]
    fprs, spros = [], []
    for t in thresholds:
        fp = neg = 0
        overlaps = []
        for m, regs in zip(maps, regions):
            pred = m > t
            union = np.zeros(m.shape, bool)
            for r in regs:
                inside = r != 0
                union |= inside
                area = inside.sum()
                entry = table[int(r[inside][0])] if table else None
                if entry is None:
                    sat = area
                elif entry["relative_saturation"]:
                    sat = int(entry["saturation_threshold"] * area)
                else:
                    sat = min(entry["saturation_threshold"], area)
                overlaps.append(min(1.0, (pred & inside).sum() / sat))
            if fpr_pixels == "defect_free" or not regs:
                fp += (pred & ~union).sum()
                neg += (~union).sum()
        fprs.append(fp / neg)
        spros.append(np.mean(overlaps))
    return np.array(fprs), np.array(spros), thresholds


@pytest.mark.parametrize("fpr_pixels", ["defect_free", "good_images"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_curve_matches_brute_force_definition(seed, fpr_pixels):
    rng = np.random.default_rng(seed)
    config = [
        {"defect_name": "a", "pixel_value": 255, "saturation_threshold": 7, "relative_saturation": False},
        {"defect_name": "b", "pixel_value": 250, "saturation_threshold": 0.4, "relative_saturation": True},
    ]
    table = M.parse_defects_config(config)
    maps, regions = [], []
    for i in range(5):
        maps.append(np.round(rng.random((9, 11)), 1))  # rounding -> many ties
        regs = []
        if i >= 2:
            for grey in (255, 250)[: 1 + i % 2]:
                regs.append(((rng.random((9, 11)) > 0.75) * grey).astype(np.uint8))
        regions.append(regs)
    fpr, spro, thr = M.spro_curve(maps, regions, config, fpr_pixels=fpr_pixels)
    bf_fpr, bf_spro, bf_thr = _brute_force_curve(maps, regions, table, fpr_pixels)
    # The brute force has a point at every distinct value; the exact curve may skip values whose
    # points coincide with a neighbour's. Evaluate both at the exact curve's thresholds.
    idx = np.searchsorted(-bf_thr, -thr)
    np.testing.assert_allclose(bf_thr[idx], thr)
    np.testing.assert_allclose(fpr, bf_fpr[idx], atol=1e-12)
    np.testing.assert_allclose(spro, bf_spro[idx], atol=1e-12)
    for max_fpr in (0.05, 0.3, 1.0):
        expected = M.area_under_curve(bf_fpr, bf_spro, max_fpr)
        assert M.au_spro(maps, regions, config, max_fpr=max_fpr, fpr_pixels=fpr_pixels) == pytest.approx(expected)


def test_quantile_thresholds_approximate_exact_curve():
    rng = np.random.default_rng(3)
    maps = [rng.random((40, 40)).astype(np.float32) for _ in range(6)]
    regions = [[], [], []] + [[(rng.random((40, 40)) > 0.9).astype(np.uint8) * 255] for _ in range(3)]
    for i in range(3, 6):  # make the regions score higher so the curve is not trivial
        maps[i] = maps[i] + 0.3 * (regions[i][0] > 0)
    exact = M.au_spro(maps, regions, _cfg(0.5, True), max_fpr=0.3)
    approx = M.au_spro(maps, regions, _cfg(0.5, True), max_fpr=0.3, num_thresholds=2000)
    assert approx == pytest.approx(exact, abs=2e-3)
    fpr, spro, thr = M.spro_curve(maps, regions, _cfg(0.5, True), num_thresholds=50)
    assert thr.size <= 50 and np.all(np.diff(thr) < 0) and np.isneginf(thr[-1])
    assert (fpr[0], spro[0], fpr[-1], spro[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(spro) >= -1e-12)
    # Quantile curve points lie exactly on the fixed-threshold evaluation.
    s2, f2 = M.spro_at_thresholds(maps, regions, _cfg(0.5, True), thr)
    np.testing.assert_allclose(s2, spro)
    np.testing.assert_allclose(f2, fpr)


def test_area_under_curve():
    x = np.array([0.0, 0.0, 0.1, 0.2, 1.0])
    y = np.array([0.0, 0.4, 0.4, 1.0, 1.0])
    assert M.area_under_curve(x, y, 0.1) == pytest.approx(0.4)  # x_max on a vertex
    # Up to 0.15: 0.04 + trapezoid from 0.1 (0.4) to 0.15 (0.7) = 0.04 + 0.0275 -> / 0.15
    assert M.area_under_curve(x, y, 0.15) == pytest.approx((0.04 + 0.0275) / 0.15)
    assert M.area_under_curve(x, y, 0.15, normalize=False) == pytest.approx(0.0675)
    assert M.area_under_curve(x, y) == pytest.approx(0.04 + 0.07 + 0.8)
    with pytest.raises(ValueError, match="non-decreasing"):
        M.area_under_curve([0.0, 0.5, 0.2], [0, 1, 1])


def test_loco_au_spro_and_config_from_path(tmp_path):
    path = tmp_path / "defects_config.json"
    path.write_text(json.dumps(_cfg(2, False)))
    good = np.zeros((4, 4))
    maps = [MAP, MAP, good]
    regions = [[REGION], [REGION], []]
    out = M.loco_au_spro(maps, regions, ["logical", "structural", "good"], str(path), max_fpr=0.25)
    # Each subset = one MAP image + one all-zero good image: 12 + 16 = 28 defect-free pixels, of
    # which only 0.8 and 0.6 ever exceed a threshold above 0. sPRO is 1/2 up to FPR 1/28, then 1.
    expected = (0.5 / 28 + 1.0 * (0.25 - 1 / 28)) / 0.25
    assert out["au_spro_logical"] == pytest.approx(expected)
    assert out["au_spro_structural"] == pytest.approx(expected)
    assert out["au_spro_mean"] == pytest.approx(expected)


@pytest.mark.parametrize(
    ("maps", "regions", "config", "match"),
    [
        ([MAP], [[REGION // 255 * 200]], _cfg(2, False), r"grey value 200.*known pixel values: \[255\]"),
        ([MAP], [[np.zeros((5, 4), np.uint8)]], _cfg(2, False), r"image 0: region mask 0 has shape \(5, 4\)"),
        ([MAP, MAP], [[], [np.zeros((3, 3), np.uint8)]], None, r"image 1: region mask 0 has shape"),
        ([MAP], [[REGION > 0]], _cfg(2, False), "boolean"),
        ([MAP], [[REGION - (REGION > 0) * np.eye(4, dtype=np.uint8)]], _cfg(2, False), "several non-zero"),
        ([MAP], [[]], _cfg(2, False), "no non-empty ground-truth region"),
        ([MAP], [[REGION], []], _cfg(2, False), "1 anomaly maps but 2"),
        ([MAP * np.nan], [[REGION]], _cfg(2, False), "anomaly map 0 contains NaN"),
        ([MAP], [[np.full((4, 4), 255, np.uint8)]], _cfg(2, False), "no pixel outside the regions"),
        ([MAP], [[REGION]], [{"pixel_value": 255, "saturation_threshold": 2}], "lacks"),
        ([MAP], [[REGION]], _cfg(1.5, True), "<= 1 when relative"),
    ],
)
def test_spro_errors(maps, regions, config, match):
    with pytest.raises(ValueError, match=match):
        M.au_spro(maps, regions, config)


def test_spro_invalid_options():
    with pytest.raises(ValueError, match="max_fpr"):
        M.au_spro([MAP], [[REGION]], None, max_fpr=0.0)
    with pytest.raises(ValueError, match="fpr_pixels"):
        M.au_spro([MAP], [[REGION]], None, fpr_pixels="everything")
    with pytest.raises(ValueError, match="no pixel in good images"):
        M.au_spro([MAP], [[REGION]], None, fpr_pixels="good_images")


def test_empty_region_is_skipped_with_warning():
    with pytest.warns(RuntimeWarning, match="empty region"):
        value = M.au_spro([MAP], [[REGION, np.zeros((4, 4), np.uint8)]], _cfg(2, False), max_fpr=0.25)
    assert value == pytest.approx(5 / 6)


# --------------------------------------------------------------------------------------------
# evaluate wrappers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluate_module():
    return pytest.importorskip("evaluate")


def test_evaluate_image_auroc_matches_core(evaluate_module):
    rng = np.random.default_rng(0)
    scores = rng.random(40)
    labels = (rng.random(40) > 0.5).astype(int)
    metric = evaluate_module.load(str(M.METRIC_MODULES_DIR / "image_auroc"))
    assert type(metric).__name__ == "ImageAUROC"
    out = metric.compute(predictions=scores.tolist(), references=labels.tolist())
    assert out["auroc"] == pytest.approx(M.image_auroc(scores, labels))
    with pytest.raises(ValueError, match="only one class"):
        metric.compute(predictions=[0.1, 0.2], references=[1, 1])


def test_evaluate_spro_matches_core(evaluate_module):
    rng = np.random.default_rng(1)
    config = _cfg(0.5, True) + _cfg(20, False, pixel_value=254, name="other")
    maps, regions = [], []
    for i in range(6):
        regs = []
        if i % 2:
            regs = [(rng.random((24, 20)) > 0.85).astype(np.uint8) * 255, (rng.random((24, 20)) > 0.9).astype(np.uint8) * 254]
        maps.append((rng.random((24, 20)) + 0.5 * sum(r > 0 for r in regs)).astype(np.float32))
        regions.append(regs)
    metric = M.load_metric("spro")
    assert type(metric).__name__ == "SPRO"
    out = metric.compute(predictions=maps, references=regions, defects_config=config, max_fpr=0.3)
    assert out["au_spro"] == pytest.approx(M.au_spro(maps, regions, config, max_fpr=0.3))


def test_load_metric_unknown_name():
    with pytest.raises(ValueError, match="available"):
        M.load_metric("nope")


def test_no_warnings_on_clean_inputs():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        M.au_spro([MAP], [[REGION]], _cfg(2, False))
        M.loco_image_aurocs([0.1, 0.5, 0.6], ["good", "logical", "structural"])


def test_per_defect_aurocs_by_hand():
    """Good images score 0, 1; 'a' images 2, 0.5; 'b' images 3 and the 'a,b' image 0.5."""
    from ladmim_hf.evaluation import per_defect_aurocs, per_defect_table

    fused = np.array([0.0, 1.0, 2.0, 0.5, 3.0, 0.5])
    types = ["good", "good", "logical", "logical", "structural", "logical"]
    defects = ["", "", "a", "a", "b", "a,b"]
    result = per_defect_aurocs({"fused": fused, "logical_branch": -fused, "structural_branch": fused}, types, defects)
    # 'a' = {2, 0.5, 0.5} vs good {0, 1}: pairs won 2 + 1 + 1 of 6 -> 4 / 6.
    assert result["a"]["fused"] == pytest.approx(4 / 6)
    assert result["a"]["logical_branch"] == pytest.approx(2 / 6)
    assert result["a"]["count"] == 3 and result["a"]["anomaly_type"] == "logical"
    # 'b' = {3, 0.5}: pairs won 2 + 1 of 4 -> 3 / 4; its first image is structural.
    assert result["b"]["fused"] == pytest.approx(3 / 4)
    assert result["b"]["anomaly_type"] == "structural"
    table = per_defect_table({"per_defect": {"widget": result}})
    assert "| widget | a | logical | 3 | 0.667 | 0.333 | 0.667 |" in table


def test_branch_ablation_section_lists_the_fusion_without_each_branch():
    from ladmim_hf.evaluation import branch_ablation_section

    def pair(logical, structural):
        return {"auroc_logical": logical, "auroc_structural": structural}

    metrics = {"categories": {"widget": {**pair(0.9, 0.8), "without": {"logical": pair(0.7, 0.85), "global": pair(0.88, 0.6)}}},
               "mean": pair(0.9, 0.8), "without_mean": {"logical": pair(0.7, 0.85), "global": pair(0.88, 0.6)}}
    lines = branch_ablation_section(metrics)
    assert lines[0] == "## What each fused branch adds"
    assert ("| category | fused (log/str) | without the logical branch (log/str) | without the global branch (log/str) |"
            in lines)
    assert "| widget | 0.900 / 0.800 | 0.700 / 0.850 | 0.880 / 0.600 |" in lines
    assert "| **mean** | 0.900 / 0.800 | 0.700 / 0.850 | 0.880 / 0.600 |" in lines
    assert branch_ablation_section({**metrics, "without_mean": {}}) == []  # one fused branch: nothing to leave out
