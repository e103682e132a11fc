"""Evaluation metrics for LADMIM on MVTec LOCO AD-style data (pure numpy / scikit-learn core).

Image level
    :func:`image_auroc`, :func:`roc_curve_points`, :func:`loco_image_aurocs` (good vs logical,
    good vs structural, and their mean, as reported for MVTec LOCO AD), two threshold helpers,
    :func:`threshold_at_fpr` and :func:`f1_optimal_threshold`, and :func:`operating_point` (confusion
    matrix, precision, recall, F1 and FPR at one threshold).

Pixel level
    AU-sPRO of the MVTec LOCO AD paper (Bergmann et al., IJCV 2022): :func:`spro_curve`,
    :func:`au_spro`, :func:`loco_au_spro`, and :func:`spro_at_thresholds` for fixed thresholds.

Conventions shared with the official MVTec LOCO evaluation code (``src/image.py``, ``src/metrics.py``
and ``src/util.py`` of the evaluation script that ships with the dataset):

* a pixel is predicted anomalous at threshold ``t`` iff ``anomaly_map > t`` (strict);
* each ground-truth *region* is one mask file (``ground_truth/<type>/<stem>/000.png``, ``001.png``,
  ...); regions of one image may overlap and every region counts separately;
* saturation area: ``int(saturation_threshold * region_area)`` (floored, as in the official code)
  when ``relative_saturation`` is true, else ``min(saturation_threshold, region_area)``;
* sPRO(t) = mean over all regions of ``min(1, |pred(t) & region| / saturation_area)``;
* FPR(t) = fraction of *defect-free* pixels predicted anomalous. The official code counts every
  pixel that lies outside all regions of its image, in good **and** anomalous images
  (``get_fp_areas_for_thresholds``); that is the default here (``fpr_pixels="defect_free"``).
  ``fpr_pixels="good_images"`` uses only the pixels of images without regions instead;
* the curve runs from (FPR 0, sPRO 0) to (FPR 1, sPRO 1); the area is taken with the trapezoid rule
  up to ``max_fpr`` (the sPRO value at exactly ``max_fpr`` is linearly interpolated) and divided
  by ``max_fpr``.

The official code refines thresholds adaptively until the curve is smooth. Here the curve is
*exact* by default: every distinct anomaly-map value is a threshold, computed with one sort and
cumulative counts (``O(P log P)`` for ``P`` pixels, no loop over thresholds). For very large inputs
(more than :data:`EXACT_MAX_PIXELS` pixels) or when ``num_thresholds`` is given, thresholds are
quantiles of the map values and counts come from per-image histograms (``np.searchsorted`` +
``np.bincount``), again without touching all pixels once per threshold.
"""

from pathlib import Path
from typing import Any

from .image import f1_optimal_threshold, image_auroc, loco_image_aurocs, operating_point, roc_curve_points, threshold_at_fpr
from .spro import (
    EXACT_MAX_PIXELS,
    area_under_curve,
    au_spro,
    loco_au_spro,
    parse_defects_config,
    spro_at_thresholds,
    spro_curve,
)

__all__ = [
    "EXACT_MAX_PIXELS",
    "METRIC_MODULES_DIR",
    "area_under_curve",
    "au_spro",
    "f1_optimal_threshold",
    "image_auroc",
    "load_metric",
    "loco_au_spro",
    "loco_image_aurocs",
    "operating_point",
    "parse_defects_config",
    "roc_curve_points",
    "spro_at_thresholds",
    "spro_curve",
    "threshold_at_fpr",
]

METRIC_MODULES_DIR = Path(__file__).resolve().parent.parent / "metrics_modules"


def load_metric(name: str, **kwargs: Any):
    """Load one of the bundled ``evaluate`` modules by name (``"image_auroc"`` or ``"spro"``).

    Calls ``evaluate.load(<ladmim_hf/metrics_modules/<name>>)`` -- a local path, so no network.
    Extra keyword arguments go to :func:`evaluate.load`.
    """
    import evaluate

    available = sorted(p.name for p in METRIC_MODULES_DIR.iterdir() if (p / f"{p.name}.py").is_file())
    if name not in available:
        raise ValueError(f"unknown metric {name!r}; available: {available}")
    return evaluate.load(str(METRIC_MODULES_DIR / name), **kwargs)
