"""AU-sPRO of MVTec LOCO AD (pixel level); the conventions are in the package docstring (`ladmim_hf.metrics`)."""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .image import _as_anomaly_types, _to_numpy

logger = logging.getLogger("ladmim_hf.metrics")

FPR_PIXEL_MODES = ("defect_free", "good_images")
# Above this many pixels (anomaly-map values entering the curve) au_spro/spro_curve switch from
# the exact curve to DEFAULT_NUM_THRESHOLDS quantile thresholds unless num_thresholds is given.
EXACT_MAX_PIXELS = 2**24
DEFAULT_NUM_THRESHOLDS = 10_000
# At most this many values are sampled to place quantile thresholds.
_MAX_QUANTILE_SAMPLES = 10_000_000




def parse_defects_config(
    defects_config: Sequence[Mapping[str, Any]] | str | os.PathLike | None,
) -> dict[int, dict[str, Any]] | None:
    """Validate a LOCO ``defects_config.json`` (list of dicts, or a path to it) -> ``{pixel_value: entry}``.

    ``None`` stays ``None`` (plain per-region overlap: saturation area = region area).
    """
    if defects_config is None:
        return None
    if isinstance(defects_config, (str, os.PathLike)):
        with open(defects_config, encoding="utf-8") as fh:
            defects_config = json.load(fh)
    if isinstance(defects_config, Mapping):
        raise ValueError(
            "defects_config must be a list of {defect_name, pixel_value, saturation_threshold, "
            "relative_saturation} entries (the content of defects_config.json), got a mapping"
        )
    table: dict[int, dict[str, Any]] = {}
    required = ("pixel_value", "saturation_threshold", "relative_saturation")
    for i, entry in enumerate(defects_config):
        missing = [k for k in required if k not in entry]
        if missing:
            raise ValueError(f"defects_config entry {i} ({dict(entry)}) lacks {missing}")
        pv = int(entry["pixel_value"])
        if not 1 <= pv <= 255:
            raise ValueError(f"defects_config entry {i}: pixel_value {pv} is outside 1..255")
        if pv in table:
            raise ValueError(f"defects_config: pixel_value {pv} is used by both {table[pv]['defect_name']!r} and "
                             f"{str(entry.get('defect_name', pv))!r}")
        thr = float(entry["saturation_threshold"])
        rel = bool(entry["relative_saturation"])
        if thr <= 0 or (rel and thr > 1):
            raise ValueError(
                f"defects_config entry {i}: saturation_threshold {thr} must be > 0"
                + (" and <= 1 when relative_saturation is true" if rel else "")
            )
        table[pv] = {
            "defect_name": str(entry.get("defect_name", pv)),
            "pixel_value": pv,
            "saturation_threshold": thr,
            "relative_saturation": rel,
        }
    if not table:
        raise ValueError("defects_config is empty")
    return table


def _saturation_area(area: int, entry: Mapping[str, Any] | None) -> float:
    if entry is None:
        return float(area)
    if entry["relative_saturation"]:
        # Floored like the official code (int(threshold * area)); at least one pixel.
        return float(max(1, int(entry["saturation_threshold"] * area)))
    return float(min(entry["saturation_threshold"], area))


class _SproInputs:
    """Validated sPRO inputs: per image the flat map, region index arrays and defect-free mask."""

    def __init__(self, anomaly_maps, gt_regions, defects_config, fpr_pixels):
        if fpr_pixels not in FPR_PIXEL_MODES:
            raise ValueError(f"fpr_pixels must be one of {FPR_PIXEL_MODES}, got {fpr_pixels!r}")
        anomaly_maps = list(anomaly_maps)
        gt_regions = list(gt_regions)
        if len(anomaly_maps) != len(gt_regions):
            raise ValueError(
                f"got {len(anomaly_maps)} anomaly maps but {len(gt_regions)} ground-truth entries; "
                "pass one (possibly empty) list of region masks per image"
            )
        if not anomaly_maps:
            raise ValueError("no images given")
        table = parse_defects_config(defects_config)
        self.neg_values: list[np.ndarray] = []  # values of the pixels counted for the FPR
        self.region_values: list[np.ndarray] = []  # one array per region
        self.region_saturation: list[float] = []
        self.region_names: list[str] = []
        self.skipped_regions: list[tuple[int, int]] = []
        for i, (amap, regions) in enumerate(zip(anomaly_maps, gt_regions)):
            m = np.asarray(_to_numpy(amap))
            if m.ndim == 3 and m.shape[0] == 1:
                m = m[0]
            if m.ndim != 2:
                raise ValueError(f"anomaly map {i} must be 2-D (H, W), got shape {m.shape}")
            if not np.issubdtype(m.dtype, np.floating):
                m = m.astype(np.float64)
            if not np.isfinite(m).all():
                raise ValueError(f"anomaly map {i} contains NaN or inf values")
            masks = self._region_list(regions, i)
            union = np.zeros(m.shape, dtype=bool)
            for j, mask in enumerate(masks):
                mask = np.asarray(_to_numpy(mask))
                if mask.ndim == 3 and mask.shape[0] == 1:
                    mask = mask[0]
                if mask.shape != m.shape:
                    raise ValueError(
                        f"image {i}: region mask {j} has shape {mask.shape} but the anomaly map has "
                        f"shape {m.shape}; resize maps and masks to the same size first"
                    )
                inside = mask != 0
                area = int(inside.sum())
                if area == 0:
                    self.skipped_regions.append((i, j))
                    continue
                entry = None
                if table is not None:
                    if mask.dtype == bool:
                        raise ValueError(
                            f"image {i}: region mask {j} is boolean, so its defect type cannot be "
                            "looked up; pass the grey-value mask (e.g. uint8 from the PNG) or use "
                            "defects_config=None"
                        )
                    values = np.unique(mask[inside])
                    if values.size != 1:
                        raise ValueError(
                            f"image {i}: region mask {j} has several non-zero grey values "
                            f"{values.tolist()[:10]}; each region mask must hold exactly one"
                        )
                    value = float(values[0])
                    if value != round(value) or int(round(value)) not in table:
                        shown = int(value) if value == round(value) else value
                        raise ValueError(
                            f"image {i}: region mask {j} has grey value {shown}, which is not "
                            f"in defects_config (known pixel values: {sorted(table)})"
                        )
                    entry = table[int(round(value))]
                union |= inside
                self.region_values.append(m[inside])
                self.region_saturation.append(_saturation_area(area, entry))
                self.region_names.append(entry["defect_name"] if entry else "region")
            if fpr_pixels == "defect_free":
                self.neg_values.append(m[~union] if masks else m.ravel())
            elif not masks:
                self.neg_values.append(m.ravel())
        if self.skipped_regions:
            warnings.warn(
                f"{len(self.skipped_regions)} empty region mask(s) skipped (image, region): "
                f"{self.skipped_regions[:5]}",
                RuntimeWarning,
                stacklevel=3,
            )
        if not self.region_values:
            raise ValueError("sPRO is undefined: no non-empty ground-truth region in any image")
        self.n_neg = int(sum(v.size for v in self.neg_values))
        if self.n_neg == 0:
            where = "in good images" if fpr_pixels == "good_images" else "outside the regions"
            raise ValueError(f"the FPR is undefined: no pixel {where} (fpr_pixels={fpr_pixels!r})")
        self.n_regions = len(self.region_values)
        self.n_pixels = self.n_neg + int(sum(v.size for v in self.region_values))

    @staticmethod
    def _region_list(regions, i):
        if regions is None:
            return []
        regions = _to_numpy(regions)
        if isinstance(regions, np.ndarray):
            if regions.ndim == 2:
                return [regions]
            if regions.ndim == 3:
                return list(regions)
            raise ValueError(f"image {i}: region masks must be 2-D arrays, got an array of shape {regions.shape}")
        return list(regions)

    def all_values_sample(self, rng: np.random.Generator) -> np.ndarray:
        parts = self.neg_values + self.region_values
        total = self.n_pixels
        if total <= _MAX_QUANTILE_SAMPLES:
            return np.concatenate(parts)
        frac = _MAX_QUANTILE_SAMPLES / total
        return np.concatenate([p[rng.random(p.size) < frac] for p in parts])


def _region_weights(values: np.ndarray, saturation: float, n_regions: int) -> tuple[np.ndarray, np.ndarray]:
    """Values of one region's pixels (descending) and the sPRO increment each pixel adds.

    With the pixels sorted by decreasing score, the i-th pixel (1-based) raises the region's
    overlap ``min(1, i / sat)`` by ``(min(i, sat) - min(i - 1, sat)) / sat``; pixels beyond
    ``ceil(sat)`` add nothing and are dropped. Tied values enter together, so their summed
    increments are right whatever order the tie is broken in.
    """
    v = np.sort(values)[::-1]
    k = min(v.size, int(math.ceil(saturation)))
    ranks = np.arange(1, k + 1, dtype=np.float64)
    w = (np.minimum(ranks, saturation) - np.minimum(ranks - 1, saturation)) / saturation / n_regions
    return v[:k], w


def _exact_curve(inp: _SproInputs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Curve with a vertex at every distinct map value, from sorted values and cumulative counts.

    One sort of the defect-free values (the bulk of the pixels); region pixels (at most
    ``ceil(saturation)`` per region matter) are merged in with ``searchsorted`` / ``bincount``.
    No argsort of all pixels and no loop over thresholds.
    """
    pos_vals, pos_w = zip(
        *(_region_weights(v, s, inp.n_regions) for v, s in zip(inp.region_values, inp.region_saturation))
    )
    neg = np.sort(np.concatenate(inp.neg_values))  # ascending
    pos = np.concatenate(pos_vals)
    w = np.concatenate(pos_w)
    order = np.argsort(pos, kind="stable")
    pos, w = pos[order], w[order]
    total_w = float(w.sum())

    # Distinct defect-free values and how many defect-free pixels are >= each of them.
    first = np.r_[True, neg[1:] != neg[:-1]]
    un = neg[first]
    fp_un = neg.size - np.flatnonzero(first)
    # sPRO at >= un[k]: region increments of values >= un[k]. A region pixel p counts for every
    # k < searchsorted(un, p, "right").
    h = np.bincount(np.searchsorted(un, pos, side="right"), weights=w, minlength=un.size + 1)
    spro_un = total_w - np.cumsum(h)[: un.size]

    # Distinct region values that are not defect-free values: computed directly, then inserted.
    up = pos[np.r_[True, pos[1:] != pos[:-1]]]
    j = np.searchsorted(un, up, side="left")
    new = ~((j < un.size) & (un[np.minimum(j, un.size - 1)] == up))
    up, j = up[new], j[new]
    suffix = np.r_[np.cumsum(w[::-1])[::-1], 0.0]
    spro_up = suffix[np.searchsorted(pos, up, side="left")]
    fp_up = neg.size - np.searchsorted(neg, up, side="left")

    values = np.insert(un.astype(np.float64), j, up)[::-1]  # distinct values, descending
    fp = np.insert(fp_un, j, fp_up)[::-1]
    spro = np.insert(spro_un, j, spro_up)[::-1]
    # Point k >= 1 predicts every pixel >= values[k-1], i.e. map > values[k] (the next lower
    # distinct value, -inf after the last); point 0 (nothing predicted) is map > max value.
    thresholds = np.r_[values, -np.inf]
    fpr = np.r_[0.0, fp / inp.n_neg]
    spro_curve_ = np.r_[0.0, spro]
    return fpr, np.clip(spro_curve_, 0.0, 1.0), thresholds


def _counts_above(values: np.ndarray, thresholds_asc: np.ndarray) -> np.ndarray:
    """For each threshold (ascending), how many ``values`` are strictly greater."""
    c = np.searchsorted(thresholds_asc, values, side="left")  # number of thresholds < value
    h = np.bincount(c, minlength=thresholds_asc.size + 1)
    return values.size - np.cumsum(h)[: thresholds_asc.size]


def _binned_curve(inp: _SproInputs, thresholds_desc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    asc = thresholds_desc[::-1]
    fp = np.zeros(asc.size, dtype=np.int64)
    for v in inp.neg_values:
        fp += _counts_above(v, asc)
    spro = np.zeros(asc.size, dtype=np.float64)
    for v, sat in zip(inp.region_values, inp.region_saturation):
        spro += np.minimum(1.0, _counts_above(v, asc) / sat)
    return (fp / inp.n_neg)[::-1], (spro / inp.n_regions)[::-1]


def _quantile_thresholds(inp: _SproInputs, num_thresholds: int, seed: int) -> np.ndarray:
    if num_thresholds < 3:
        raise ValueError(f"num_thresholds must be >= 3, got {num_thresholds}")
    sample = inp.all_values_sample(np.random.default_rng(seed))
    hi = max(float(np.max(v)) for v in inp.neg_values + inp.region_values)
    qs = np.quantile(sample, np.linspace(0.0, 1.0, num_thresholds - 1)[1:-1])
    t = np.unique(np.r_[qs, hi, -np.inf])
    return t[::-1]


def spro_curve(
    anomaly_maps: Sequence[Any],
    gt_regions: Sequence[Sequence[Any]],
    defects_config: Sequence[Mapping[str, Any]] | str | os.PathLike | None,
    num_thresholds: int | None = None,
    fpr_pixels: str = "defect_free",
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FPR-sPRO curve of the MVTec LOCO paper.

    Args:
        anomaly_maps: one float map ``(H, W)`` per test image (good and anomalous).
        gt_regions: per image, a list of region masks ``(H, W)`` whose non-zero grey value is the
            defect's ``pixel_value`` (empty list for good images). A ``(R, H, W)`` array or a single
            2-D mask per image is accepted too. Empty masks are skipped with a warning.
        defects_config: the category's ``defects_config.json`` content (list of
            ``{"defect_name", "pixel_value", "saturation_threshold", "relative_saturation"}``) or a
            path to it; ``None`` = no saturation (saturation area = region area, any grey value).
        num_thresholds: ``None`` = exact curve (all distinct map values) unless there are more
            than :data:`EXACT_MAX_PIXELS` pixels, then :data:`DEFAULT_NUM_THRESHOLDS`; an integer
            = that many thresholds at quantiles of the map values (seeded subsample if huge).
        fpr_pixels: ``"defect_free"`` (official code: pixels outside all regions, all images) or
            ``"good_images"`` (only images without regions).
        seed: seed of the subsample used to place quantile thresholds.

    Returns:
        ``(fpr, spro, thresholds)``, thresholds descending, a pixel is anomalous iff
        ``map > threshold``. The first point is (0, 0) at the largest map value, the last (1, 1) at
        ``-inf``. FPR is non-decreasing along the curve.
    """
    inp = _SproInputs(anomaly_maps, gt_regions, defects_config, fpr_pixels)
    if num_thresholds is None and inp.n_pixels <= EXACT_MAX_PIXELS:
        return _exact_curve(inp)
    if num_thresholds is None:
        num_thresholds = DEFAULT_NUM_THRESHOLDS
        logger.info(
            "sPRO: %d pixels > EXACT_MAX_PIXELS, using %d quantile thresholds", inp.n_pixels, num_thresholds
        )
    thresholds = _quantile_thresholds(inp, int(num_thresholds), seed)
    fpr, spro = _binned_curve(inp, thresholds)
    return fpr, spro, thresholds


def spro_at_thresholds(
    anomaly_maps: Sequence[Any],
    gt_regions: Sequence[Sequence[Any]],
    defects_config: Sequence[Mapping[str, Any]] | str | os.PathLike | None,
    thresholds: Iterable[float],
    fpr_pixels: str = "defect_free",
) -> tuple[np.ndarray, np.ndarray]:
    """Mean sPRO and FPR at given thresholds (anomalous iff ``map > t``), in the order given."""
    inp = _SproInputs(anomaly_maps, gt_regions, defects_config, fpr_pixels)
    t = np.asarray(list(thresholds), dtype=np.float64)
    order = np.argsort(-t, kind="stable")
    fpr_sorted, spro_sorted = _binned_curve(inp, t[order])
    fpr = np.empty_like(fpr_sorted)
    spro = np.empty_like(spro_sorted)
    fpr[order], spro[order] = fpr_sorted, spro_sorted
    return spro, fpr


def area_under_curve(x: Any, y: Any, x_max: float | None = None, normalize: bool = True) -> float:
    """Trapezoid area under ``y(x)`` from ``x[0]`` to ``x_max`` (official LOCO ``trapz``).

    ``x`` must be non-decreasing (repeated x values make vertical steps). If ``x_max`` falls
    between two points, ``y(x_max)`` is linearly interpolated. With ``normalize`` the area is
    divided by ``x_max`` (the LOCO "scale to one").
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size < 2:
        raise ValueError(f"x and y must be 1-D of equal length >= 2, got {x.shape} and {y.shape}")
    if np.any(np.diff(x) < 0):
        raise ValueError("x must be sorted in non-decreasing order")
    if x_max is None:
        x_max = float(x[-1])
    if x_max <= x[0]:
        return 0.0
    if x_max > x[-1]:
        raise ValueError(f"x_max={x_max} lies beyond the curve's last x value {x[-1]}")
    ins = int(np.searchsorted(x, x_max, side="right"))  # first index with x > x_max
    xs, ys = x[:ins], y[:ins]
    area = float(np.sum(0.5 * (ys[1:] + ys[:-1]) * np.diff(xs)))
    if ins < x.size and xs[-1] < x_max:
        y_at = ys[-1] + (y[ins] - ys[-1]) * (x_max - xs[-1]) / (x[ins] - xs[-1])
        area += 0.5 * (ys[-1] + y_at) * (x_max - xs[-1])
    return float(area / x_max) if normalize else float(area)


def au_spro(
    anomaly_maps: Sequence[Any],
    gt_regions: Sequence[Sequence[Any]],
    defects_config: Sequence[Mapping[str, Any]] | str | os.PathLike | None,
    max_fpr: float = 0.05,
    num_thresholds: int | None = None,
    fpr_pixels: str = "defect_free",
) -> float:
    """Area under the FPR-sPRO curve up to ``max_fpr``, divided by ``max_fpr`` (range 0..1).

    See :func:`spro_curve` for the arguments. A map that is constant everywhere scores
    ``max_fpr / 2`` (the diagonal); a map that separates all region pixels from all defect-free
    pixels scores 1.
    """
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    fpr, spro, _ = spro_curve(anomaly_maps, gt_regions, defects_config, num_thresholds, fpr_pixels)
    return area_under_curve(fpr, spro, x_max=max_fpr, normalize=True)


def loco_au_spro(
    anomaly_maps: Sequence[Any],
    gt_regions: Sequence[Sequence[Any]],
    anomaly_types: Sequence[str],
    defects_config: Sequence[Mapping[str, Any]] | str | os.PathLike | None,
    max_fpr: float = 0.05,
    num_thresholds: int | None = None,
    fpr_pixels: str = "defect_free",
) -> dict[str, float]:
    """AU-sPRO for good+logical and good+structural images and their mean (as the LOCO script).

    Returns ``{"au_spro_logical", "au_spro_structural", "au_spro_mean"}``; a missing subset gives
    NaN with a warning and is left out of the mean.
    """
    maps = list(anomaly_maps)
    regions = list(gt_regions)
    types = _as_anomaly_types(anomaly_types, len(maps))
    result: dict[str, float] = {}
    for kind in ("logical", "structural"):
        keep = np.flatnonzero((types == "good") | (types == kind))
        if not (types == kind).any():
            warnings.warn(f"no '{kind}' images: au_spro_{kind} is NaN", RuntimeWarning, stacklevel=2)
            result[f"au_spro_{kind}"] = float("nan")
            continue
        result[f"au_spro_{kind}"] = au_spro(
            [maps[i] for i in keep],
            [regions[i] for i in keep],
            defects_config,
            max_fpr=max_fpr,
            num_thresholds=num_thresholds,
            fpr_pixels=fpr_pixels,
        )
    available = [v for v in result.values() if not math.isnan(v)]
    result["au_spro_mean"] = float(np.mean(available)) if available else float("nan")
    return result
