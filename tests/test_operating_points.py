"""Operating points: confusion matrix and rates at a threshold (metrics.operating_point), the F1-best
threshold, their assembly and report section in evaluation, and the thresholds on the score histogram."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ladmim_hf import evaluation as E
from ladmim_hf import metrics as M
from ladmim_hf import visualization as V

# Six images; the rule is "anomalous iff score > threshold".
SCORES = [0.1, 0.4, 0.5, 0.5, 0.7, 0.9]
TYPES = ["good", "good", "logical", "good", "structural", "logical"]
LABELS = [t != "good" for t in TYPES]


def test_operating_point_hand_computed_with_ties_at_the_threshold():
    # t = 0.5: the two 0.5 scores (one logical, one good) are ties and stay good -> flagged 0.7 and 0.9.
    point = M.operating_point(SCORES, LABELS, 0.5, TYPES)
    assert point == pytest.approx({"threshold": 0.5, "tp": 2, "fp": 0, "tn": 3, "fn": 1, "precision": 1.0,
                                   "recall": 2 / 3, "f1": 4 / 5, "fpr": 0.0, "recall_logical": 0.5,
                                   "recall_structural": 1.0})
    assert all(isinstance(point[k], int) for k in ("tp", "fp", "tn", "fn"))
    # t = 0.45: both ties flagged -> TP 3, FP 1 (the good 0.5), TN 2, FN 0.
    point = M.operating_point(SCORES, LABELS, 0.45, TYPES)
    assert (point["tp"], point["fp"], point["tn"], point["fn"]) == (3, 1, 2, 0)
    assert point["precision"] == pytest.approx(0.75) and point["recall"] == 1.0
    assert point["f1"] == pytest.approx(6 / 7) and point["fpr"] == pytest.approx(1 / 3)
    assert point["recall_logical"] == 1.0 and point["recall_structural"] == 1.0
    assert "recall_logical" not in M.operating_point(SCORES, LABELS, 0.45)  # no types given


def test_operating_point_without_anomalies_and_when_all_predicted_good():
    point = M.operating_point([0.1, 0.2, 0.3], [0, 0, 0], 0.15, ["good"] * 3)
    assert (point["tp"], point["fp"], point["tn"], point["fn"]) == (0, 2, 1, 0)
    assert point["precision"] == 0.0 and point["fpr"] == pytest.approx(2 / 3)
    for key in ("recall", "f1", "recall_logical", "recall_structural"):
        assert math.isnan(point[key]), key
    # Threshold above every score: nothing flagged -> precision undefined, recall and F1 zero.
    point = M.operating_point(SCORES, LABELS, 0.9, TYPES)
    assert (point["tp"], point["fp"], point["tn"], point["fn"]) == (0, 0, 3, 3)
    assert math.isnan(point["precision"]) and point["recall"] == 0.0 and point["f1"] == 0.0 and point["fpr"] == 0.0
    # Only anomalies: the FPR is undefined.
    assert math.isnan(M.operating_point([1.0, 2.0], [1, 1], 1.5)["fpr"])


def test_operating_point_per_sample_thresholds_sum_the_confusion_matrices():
    other_scores, other_types = [2.0, 3.0, 5.0], ["good", "structural", "logical"]
    a = M.operating_point(SCORES, LABELS, 0.45, TYPES)
    b = M.operating_point(other_scores, [t != "good" for t in other_types], 4.0, other_types)
    pooled = M.operating_point(SCORES + other_scores, LABELS + [t != "good" for t in other_types],
                               [0.45] * 6 + [4.0] * 3, TYPES + other_types)
    for key in ("tp", "fp", "tn", "fn"):
        assert pooled[key] == a[key] + b[key], key
    assert math.isnan(pooled["threshold"])
    assert pooled["recall_structural"] == pytest.approx(1 / 2) and pooled["recall_logical"] == pytest.approx(3 / 3)


def test_operating_point_refuses_bad_input():
    with pytest.raises(ValueError, match="disagree"):
        M.operating_point(SCORES, [0] * 6, 0.5, TYPES)
    with pytest.raises(ValueError, match="NaN"):
        M.operating_point(SCORES, LABELS, float("nan"))
    with pytest.raises(ValueError, match="one per score"):
        M.operating_point(SCORES, LABELS, [0.5, 0.5])


@pytest.mark.parametrize("seed", range(20))
def test_f1_optimal_threshold_gives_its_f1_with_the_strict_rule(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 40))
    scores = np.round(rng.normal(size=n), 1)  # rounding makes ties
    labels = rng.random(n) < 0.4
    labels[:2] = [True, False]
    threshold, f1 = M.f1_optimal_threshold(scores, labels)
    assert M.operating_point(scores, labels, threshold)["f1"] == pytest.approx(f1)
    # Brute force: every distinct cut is "score > u" for a distinct score u, or everything.
    best = max(M.operating_point(scores, labels, u)["f1"] for u in [-np.inf, *np.unique(scores)])
    assert f1 == pytest.approx(best)


def test_f1_optimal_threshold_adjacent_floats_and_huge_scores():
    # No float lies between 1 + 2^-52 and 1 + 2^-51: the midpoint rounded onto the anomaly's score,
    # which `>` then missed (F1 0 while 1 was reported). The threshold is now the lower score.
    a, b = 1 + 2**-52, 1 + 2**-51
    threshold, f1 = M.f1_optimal_threshold([a, b], [0, 1])
    assert f1 == 1.0 and threshold == a
    assert M.operating_point([a, b], [0, 1], threshold)["f1"] == 1.0
    # (cut + lower) / 2 overflowed to inf near the float maximum.
    threshold, f1 = M.f1_optimal_threshold([1.6e308, 1.7e308], [0, 1])
    assert math.isfinite(threshold) and 1.6e308 <= threshold < 1.7e308
    assert M.operating_point([1.6e308, 1.7e308], [0, 1], threshold)["f1"] == 1.0
    # Everything flagged is best: the threshold sits just below the lowest score.
    threshold, f1 = M.f1_optimal_threshold([0.2, 0.5, 0.1], [1, 1, 0])
    assert f1 == pytest.approx(1.0) and 0.1 < threshold < 0.2


def test_category_and_total_operating_points_and_report_section():
    other_scores, other_types = [2.0, 3.0, 5.0], ["good", "structural", "logical"]
    per_category = {"a": E.category_operating_points(np.array(SCORES), TYPES, 0.45, 12),
                    "b": E.category_operating_points(np.array(other_scores), other_types, 4.0, None)}
    a = per_category["a"]
    assert a["calibrated"]["num_validation_images"] == 12 and a["calibrated"]["tp"] == 3
    assert a["best_f1"]["f1"] == pytest.approx(M.f1_optimal_threshold(SCORES, LABELS)[1])
    assert a["best_f1"]["f1"] >= a["calibrated"]["f1"]
    assert E.category_operating_points(np.array([0.1, 0.2]), ["good", "good"], 0.0)["best_f1"] is None
    rows = [{"category": c, "pred_score": s, "anomaly_type": t}
            for c, scores, types in (("a", SCORES, TYPES), ("b", other_scores, other_types)) for s, t in zip(scores, types)]
    total = E.total_operating_points(rows, per_category)
    for name in ("calibrated", "best_f1"):
        for key in ("tp", "fp", "tn", "fn"):
            assert total[name][key] == per_category["a"][name][key] + per_category["b"][name][key], (name, key)
        assert total[name]["num_categories"] == 2
    lines = E.operating_points_section({"operating_points": per_category, "operating_points_total": total})
    text = "\n".join(lines)
    assert lines[0] == "## Operating points" and "### a" in text and "### b" in text and "### total" in text
    assert "Calibrated on 12 normal validation images." in text and "default threshold applies" in text
    assert "optimistic upper bound" in text and "sum of the categories' matrices" in text
    assert "| calibrated | 0.450 | 0.750 | 1.000 / 1.000 / 1.000 | 0.857 | 0.333 | 3 | 1 | 2 | 0 |" in text
    assert E.operating_points_section({"categories": {}}) == []
    assert E._histogram_thresholds({"operating_points": per_category}, "a") == {
        "calibrated": 0.45, "best F1 (test labels)": a["best_f1"]["threshold"]}


def test_score_histogram_draws_labelled_threshold_lines(tmp_path, monkeypatch):
    figures = []
    save = V._save
    monkeypatch.setattr(V, "_save", lambda fig, path: (figures.append(fig), save(fig, path))[1])
    path = V.plot_score_histograms(SCORES, TYPES, tmp_path / "hist.png",
                                   thresholds={"calibrated": 2.5, "best F1": 0.45, "none": float("nan")})
    assert path.is_file() and path.stat().st_size > 1000
    ax = figures[0].axes[0]
    lines = {line.get_label(): line for line in ax.lines}
    assert set(lines) == {"calibrated (2.50)", "best F1 (0.45)"}  # NaN skipped
    assert list(lines["calibrated (2.50)"].get_xdata()) == [2.5, 2.5]
    assert ax.get_xlim()[1] >= 2.5  # a threshold beyond every score is still in view
    assert {"calibrated (2.50)", "best F1 (0.45)"} <= {t.get_text() for t in ax.get_legend().get_texts()}
    V.plot_score_histograms(SCORES, TYPES, tmp_path / "plain.png")  # no thresholds: no lines
    assert not figures[1].axes[0].lines
