"""Image-level metrics: AUROC, ROC points, LOCO's per-type AUROCs, thresholds and operating points."""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np

ANOMALY_TYPES = ("good", "logical", "structural")


def _to_numpy(x: Any) -> Any:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor, without importing torch
        return x.detach().cpu().numpy()
    return x


def _as_scores(scores: Any, name: str = "scores") -> np.ndarray:
    arr = np.asarray(_to_numpy(scores), dtype=np.float64)
    if arr.ndim == 2 and 1 in arr.shape:  # (N, 1) or (1, N)
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    bad = ~np.isfinite(arr)
    if bad.any():
        idx = np.flatnonzero(bad)
        kinds = "NaN" if np.isnan(arr[idx]).all() else "NaN/inf"
        raise ValueError(
            f"{name} contain {idx.size} {kinds} value(s) (first at indices {idx[:5].tolist()}); "
            "AUROC needs finite scores"
        )
    return arr


def _as_binary_labels(labels: Any, n: int) -> np.ndarray:
    arr = np.asarray(_to_numpy(labels))
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.shape[0] != n:
        raise ValueError(f"scores and labels differ in length: {n} scores vs {arr.shape[0]} labels")
    if arr.dtype == bool:
        return arr.astype(np.int64)
    try:
        as_float = arr.astype(np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"labels must be 0/1 or booleans, got dtype {arr.dtype}") from err
    values = np.unique(as_float[~np.isnan(as_float)]) if as_float.size else as_float
    if np.isnan(as_float).any() or not np.isin(values, (0.0, 1.0)).all():
        raise ValueError(
            f"labels must be 0 (normal) or 1 (anomalous); found values {np.unique(arr).tolist()[:10]}"
        )
    return as_float.astype(np.int64)


def _check_both_classes(labels: np.ndarray) -> None:
    n_pos = int(labels.sum())
    n_neg = int(labels.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        present = "normal (0)" if n_pos == 0 else "anomalous (1)"
        raise ValueError(
            f"AUROC is undefined: only one class is present ({labels.size} samples, all {present}); "
            "it needs both normal (0) and anomalous (1) samples"
        )


def image_auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve of image scores (higher = more anomalous).

    Args:
        scores: ``(N,)`` finite anomaly scores (list, numpy array or torch tensor).
        labels: ``(N,)`` ground truth, 0/False = normal, 1/True = anomalous.

    Returns:
        The AUROC as a float. Values below 0.5 are returned as they are (never flipped).

    Raises:
        ValueError: NaN/inf scores, labels other than 0/1, mismatched lengths, or only one class.
    """
    from sklearn.metrics import roc_auc_score

    s = _as_scores(scores)
    y = _as_binary_labels(labels, s.shape[0])
    _check_both_classes(y)
    return float(roc_auc_score(y, s))


def roc_curve_points(
    scores: Any, labels: Any, drop_intermediate: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve of image scores: ``(fpr, tpr, thresholds)`` as from :func:`sklearn.metrics.roc_curve`.

    A sample is predicted anomalous iff ``score >= threshold`` (scikit-learn's convention); the
    first threshold is ``inf`` (nothing predicted). Same input checks as :func:`image_auroc`.
    """
    from sklearn.metrics import roc_curve

    s = _as_scores(scores)
    y = _as_binary_labels(labels, s.shape[0])
    _check_both_classes(y)
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=drop_intermediate)
    return fpr, tpr, thresholds


def _as_anomaly_types(anomaly_types: Any, n: int) -> np.ndarray:
    types = np.asarray([str(t) for t in anomaly_types], dtype=object)
    if types.shape[0] != n:
        raise ValueError(f"scores and anomaly_types differ in length: {n} vs {types.shape[0]}")
    unknown = sorted(set(types.tolist()) - set(ANOMALY_TYPES))
    if unknown:
        raise ValueError(f"unknown anomaly type(s) {unknown}; expected one of {list(ANOMALY_TYPES)}")
    return types


def loco_image_aurocs(scores: Any, anomaly_types: Sequence[str]) -> dict[str, float]:
    """MVTec LOCO image-level AUROCs: good vs logical, good vs structural, and their mean.

    Args:
        scores: ``(N,)`` image anomaly scores.
        anomaly_types: ``N`` strings in ``{"good", "logical", "structural"}``.

    Returns:
        ``{"auroc_logical", "auroc_structural", "auroc_mean"}``. When a subset is missing (no
        logical or no structural images, or no good images at all) its AUROC is NaN, a warning is
        issued, and ``auroc_mean`` is the mean over the AUROCs that exist (NaN if none).
    """
    s = _as_scores(scores)
    types = _as_anomaly_types(anomaly_types, s.shape[0])
    good = types == "good"
    result: dict[str, float] = {}
    for kind in ("logical", "structural"):
        anomalous = types == kind
        if not good.any() or not anomalous.any():
            missing = "good" if not good.any() else kind
            warnings.warn(
                f"no '{missing}' images: auroc_{kind} is NaN and left out of auroc_mean",
                RuntimeWarning,
                stacklevel=2,
            )
            result[f"auroc_{kind}"] = float("nan")
            continue
        keep = good | anomalous
        result[f"auroc_{kind}"] = image_auroc(s[keep], anomalous[keep].astype(np.int64))
    available = [v for v in result.values() if not math.isnan(v)]
    result["auroc_mean"] = float(np.mean(available)) if available else float("nan")
    return result


def threshold_at_fpr(normal_scores: Any, fpr: float = 0.01) -> float:
    """Smallest threshold whose false-positive rate on ``normal_scores`` is at most ``fpr``.

    Decision rule: anomalous iff ``score > threshold``. The returned value lies strictly between
    two distinct normal scores (or just above the largest), so ``>`` and ``>=`` classify the given
    normal scores identically and ``mean(normal_scores > t) <= fpr``.
    """
    s = np.sort(_as_scores(normal_scores, "normal_scores"))
    if s.size == 0:
        raise ValueError("normal_scores is empty")
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be in [0, 1], got {fpr}")
    n = s.size
    # Keep at most floor(n * fpr) scores above the threshold -> threshold >= the k-th smallest
    # score with k = n - floor(n * fpr) (1-based).  The small tolerance absorbs 0.1 * 30 = 3.0000001.
    allowed = int(math.floor(n * fpr + 1e-9))
    if allowed >= n:
        return float(np.nextafter(s[0], -np.inf))
    t = s[n - allowed - 1]
    higher = s[s > t]
    return float((t + higher[0]) / 2.0) if higher.size else float(np.nextafter(t, np.inf))


def f1_optimal_threshold(scores: Any, labels: Any) -> tuple[float, float]:
    """Threshold maximising the F1 score of "anomalous" (label 1) predictions.

    Returns:
        ``(threshold, f1)``; :func:`operating_point` at that threshold (rule ``score > threshold``)
        gives that F1. The threshold lies midway between the chosen score and the next lower distinct
        score, so ``>`` and ``>=`` agree on ``scores``; where no float lies strictly between the two
        (adjacent floats), it is the lower score itself and only ``>`` holds.
    """
    s = _as_scores(scores)
    y = _as_binary_labels(labels, s.shape[0])
    _check_both_classes(y)
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    tp = np.cumsum(y_sorted)
    fp = np.cumsum(1 - y_sorted)
    # Only the last index of each run of equal scores is a valid cut.
    last = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), s_sorted.size - 1]
    tp, fp = tp[last], fp[last]
    fn = y.sum() - tp
    f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    best = int(np.argmax(f1))
    cut = s_sorted[last[best]]
    if last[best] + 1 == s_sorted.size:  # every sample predicted anomalous
        return float(np.nextafter(cut, -np.inf)), float(f1[best])
    lower = s_sorted[last[best] + 1]
    with np.errstate(over="ignore"):
        threshold = lower + (cut - lower) / 2.0  # not (cut + lower) / 2, which overflows near the float max
    if not lower <= threshold < cut:  # adjacent floats round the midpoint onto `cut`; overflow gives inf
        threshold = lower
    return float(threshold), float(f1[best])


def _ratio(numerator: int, denominator: int) -> float:
    return float(numerator / denominator) if denominator else float("nan")


def operating_point(scores: Any, labels: Any, threshold: Any, anomaly_types: Sequence[str] | None = None) -> dict[str, Any]:
    """Confusion matrix and rates of the rule "anomalous iff ``score > threshold``" (the model's ``pred_label``).

    Args:
        scores: ``(N,)`` finite scores; labels: ``(N,)`` 0 = normal, 1 = anomalous.
        threshold: one number, or ``(N,)`` thresholds, one per sample (e.g. each image's category
            threshold: pooled categories then give the sum of their confusion matrices).
        anomaly_types: optional ``N`` strings in ``{"good", "logical", "structural"}`` matching
            ``labels``; adds ``recall_logical`` and ``recall_structural``.

    Returns:
        ``{"threshold", "tp", "fp", "tn", "fn", "precision", "recall", "f1", "fpr"}`` (+ per-type
        recalls); counts are ints. Undefined values are NaN: precision when nothing is predicted
        anomalous, recall and F1 without anomalies, FPR without normal samples, a type's recall
        without samples of it, ``threshold`` when per-sample thresholds are given. F1 is
        ``2 tp / (2 tp + fp + fn)`` (0 when anomalies exist but none is found).
    """
    s = _as_scores(scores)
    y = _as_binary_labels(labels, s.shape[0]).astype(bool)
    t = np.asarray(_to_numpy(threshold), dtype=np.float64)
    if t.ndim and t.shape != s.shape:
        raise ValueError(f"threshold must be one number or one per score ({s.shape[0]}), got shape {t.shape}")
    if np.isnan(t).any():
        raise ValueError("threshold is NaN")
    pred = s > t
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    fn, tn = int(y.sum()) - tp, int((~y).sum()) - fp
    point: dict[str, Any] = {
        "threshold": float(t) if t.ndim == 0 else float("nan"),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn) if tp + fn else float("nan"),
        "fpr": _ratio(fp, fp + tn),
    }
    if anomaly_types is not None:
        types = _as_anomaly_types(anomaly_types, s.shape[0])
        if not np.array_equal(types != "good", y):
            raise ValueError("anomaly_types disagree with labels (label 1 iff the type is not 'good')")
        for kind in ("logical", "structural"):
            point[f"recall_{kind}"] = _ratio(int(pred[types == kind].sum()), int((types == kind).sum()))
    return point
