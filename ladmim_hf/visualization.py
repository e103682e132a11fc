"""Figures for reports and the demo app: heat-map overlays, ROC curves, score and code histograms.

Everything renders off-screen through matplotlib's object-oriented API
(``matplotlib.figure.Figure`` + the Agg canvas). ``matplotlib.pyplot`` is never imported, so no
GUI backend is selected, no window opens, and the global backend of an application that imports
this module is left untouched (no ``matplotlib.use`` call is needed).
"""

from __future__ import annotations

import functools
import io
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

__all__ = [
    "heatmap_grid",
    "heatmap_overlay",
    "heatmap_scale",
    "heatmap_with_colorbar",
    "plot_histogram_comparison",
    "plot_roc_curves",
    "plot_score_histograms",
]

# Colours of the three LOCO test subsets, used consistently across figures.
TYPE_COLORS = {"good": "tab:green", "logical": "tab:orange", "structural": "tab:red"}


def _new_figure(width: float, height: float, dpi: int = 100):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=fig.dpi)
    return path


def _to_pil(fig, path: str | os.PathLike | None = None) -> Image.Image:
    """Render once to PNG bytes; optionally write those bytes to ``path`` too."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
    buf.seek(0)
    image = Image.open(buf)
    image.load()
    return image.convert("RGB")


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _as_rgb_image(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = _to_numpy(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):  # CHW -> HWC
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise ValueError(f"image must be (H, W), (H, W, 3) or (3, H, W), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        if arr.size and arr.max() <= 1.0 and arr.min() >= 0.0:
            arr = arr * 255.0
        else:  # e.g. an ImageNet-normalised tensor: rescale its own range
            lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 1.0)
            arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


def _colorize(anomaly_map: np.ndarray, size: tuple[int, int], vmin, vmax, cmap: str) -> np.ndarray:
    """Resize a float map to ``size`` (W, H) bilinearly and map it to RGB uint8 with ``cmap``."""
    import matplotlib

    m = _to_numpy(anomaly_map).astype(np.float32)
    while m.ndim > 2 and 1 in m.shape:  # drop size-1 batch/channel axes, but a 1x1 or 1xW map stays 2-D
        m = np.squeeze(m, axis=m.shape.index(1))
    if m.ndim != 2:
        raise ValueError(f"anomaly_map must be 2-D (H, W), got shape {m.shape}")
    if not np.isfinite(m).all():
        m = np.nan_to_num(m, nan=float(np.nanmin(m)) if np.isfinite(m).any() else 0.0)
    lo = float(m.min()) if vmin is None else float(vmin)
    hi = float(m.max()) if vmax is None else float(vmax)
    resized = np.asarray(Image.fromarray(m, mode="F").resize(size, Image.BILINEAR), dtype=np.float32)
    norm = np.clip((resized - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(resized)
    rgba = matplotlib.colormaps[cmap](norm)
    return (rgba[..., :3] * 255.0 + 0.5).astype(np.uint8)


def heatmap_overlay(
    image: Image.Image | np.ndarray,
    anomaly_map: np.ndarray,
    alpha: float = 0.5,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "jet",
) -> Image.Image:
    """Blend a colour-mapped anomaly map over an image.

    Args:
        image: PIL image or array ``(H, W)``, ``(H, W, 3)`` or ``(3, H, W)`` (uint8, or floats in
            [0, 1]; other float ranges are rescaled to their own min/max).
        anomaly_map: ``(h, w)`` float map; resized bilinearly to the image size.
        alpha: weight of the heat map (0 = image only, 1 = heat map only).
        vmin, vmax: colour range; default the map's own min and max (pass fixed values to compare
            images on one scale). A constant map renders as the lowest colour.
        cmap: matplotlib colormap name (default ``"jet"``: blue = low, red = high).

    Returns:
        RGB ``PIL.Image`` of the image's size.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    base = _as_rgb_image(image)
    heat = Image.fromarray(_colorize(anomaly_map, base.size, vmin, vmax, cmap), mode="RGB")
    return Image.blend(base, heat, alpha)


FUSED_MAP_LABEL = "fused anomaly score (calibrated z units)"


def heatmap_scale(threshold: float) -> tuple[float, float]:
    """Fixed colour range ``(vmin, vmax)`` of a category's fused heat maps, from its calibrated threshold.

    The fused map is in calibrated z units (each branch map standardised with its pixels' mean and std on
    normal images, or its score's for models calibrated before those existed), so one scale per
    category makes a normal image look blue and a defective one red, instead of every map stretched
    to its own min-max. The range is centred on the threshold, so the verdict boundary sits at
    mid-colour, with half-width ``max(threshold, 1)``: for a threshold >= 1 that is
    ``[0, 2 * threshold]`` (blue = typical of normal images). A threshold below 1, zero or negative
    (a permissive or uncalibrated model) still spans 2 z units (one normal-image std either side)
    rather than a collapsed or inverted range that would paint noise as defects.
    """
    threshold = float(threshold)
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold}")
    half = max(threshold, 1.0)
    return threshold - half, threshold + half


@functools.lru_cache(maxsize=16)  # every heat map of a run shares one bar: rendered once, pasted (never changed)
def _colorbar_panel(height: int, vmin: float, vmax: float, threshold: float | None, label: str,
                    cmap: str) -> Image.Image:
    """A ``height``-pixel-tall RGB strip: a vertical colour bar over ``[vmin, vmax]`` (triangles =
    values clipped beyond either end), its ``label``, and ``threshold`` as a black line and tick."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    # 4 inches tall at whatever dpi fills `height`: the text keeps its proportions for any image size.
    fig = _new_figure(1.9, 4.0, dpi=height / 4.0)
    cax = fig.add_axes((0.1, 0.05, 0.14, 0.9))
    bar = fig.colorbar(ScalarMappable(Normalize(vmin, vmax), cmap=cmap), cax=cax, extend="both")
    ticks, labels = [vmin, vmax], [f"{vmin:.2f}", f"{vmax:.2f}"]
    if threshold is not None and vmin <= threshold <= vmax:
        cax.axhline(threshold, color="black", linewidth=2.5)
        ticks.insert(1, threshold)
        labels.insert(1, f"threshold\n{threshold:.2f}")
    elif threshold is not None:
        label = f"{label}\nthreshold {threshold:.2f} (off scale)"
    bar.set_ticks(ticks, labels=labels)
    cax.tick_params(labelsize=7)
    bar.set_label(label, fontsize=8)
    panel = _to_pil(fig)
    if panel.height != height:  # a fractional dpi can round the canvas one pixel off
        panel = panel.resize((panel.width, height), Image.BILINEAR)
    return panel


def heatmap_with_colorbar(
    image: Image.Image | np.ndarray,
    anomaly_map: np.ndarray,
    vmin: float,
    vmax: float,
    threshold: float | None = None,
    label: str = FUSED_MAP_LABEL,
    alpha: float = 0.5,
    cmap: str = "jet",
    min_height: int = 320,
) -> Image.Image:
    """The overlay of ``heatmap_overlay`` on a fixed scale, with a colour bar on its right.

    Args:
        image, anomaly_map, alpha, cmap: as in ``heatmap_overlay`` (map ``(h, w)``).
        vmin, vmax: the colour range (e.g. ``heatmap_scale(threshold)``); values outside it clip.
        threshold: marked on the colour bar (or named as off scale); None marks nothing.
        label: the colour bar's title, stating the units.
        min_height: small images are enlarged by a whole factor (nearest) to about this height, so
            the colour bar's text stays legible; image pixels stay whole blocks.

    Returns:
        RGB ``PIL.Image``: the overlay, ``k`` times the image size, at the top left; the bar fills
        the right; height ``max(k * H, min_height)``.
    """
    if not (np.isfinite(vmin) and np.isfinite(vmax) and vmax > vmin):
        raise ValueError(f"need finite vmin < vmax, got {vmin}, {vmax}")
    overlay = heatmap_overlay(image, anomaly_map, alpha=alpha, vmin=vmin, vmax=vmax, cmap=cmap)
    # Enlarge, but never past 4096 px wide (a 1-pixel-tall panorama would otherwise explode).
    factor = max(1, min(-(-min_height // overlay.height), 4096 // overlay.width))
    if factor > 1:
        overlay = overlay.resize((overlay.width * factor, overlay.height * factor), Image.NEAREST)
    panel = _colorbar_panel(max(overlay.height, min_height), vmin, vmax, threshold, label, cmap)
    canvas = Image.new("RGB", (overlay.width + panel.width, panel.height), "white")
    canvas.paste(overlay, (0, 0))
    canvas.paste(panel, (overlay.width, 0))
    return canvas


def plot_roc_curves(
    curves: Mapping[str, tuple[Any, Any, float]],
    path: str | os.PathLike,
    title: str = "ROC",
) -> Path:
    """Plot several ROC curves in one axes and save a PNG.

    Args:
        curves: ``{label: (fpr, tpr, auroc)}``; the legend shows ``label (AUROC 0.xxx)``.
        path: output PNG path (parent folders are created).
        title: figure title.

    Returns:
        The path written.
    """
    fig = _new_figure(5.0, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="chance")
    for label, (fpr, tpr, auroc) in curves.items():
        ax.plot(np.asarray(fpr), np.asarray(tpr), linewidth=1.8, label=f"{label} (AUROC {float(auroc):.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_score_histograms(
    scores: Any,
    anomaly_types: Sequence[str],
    path: str | os.PathLike,
    title: str = "Anomaly scores",
    bins: int = 30,
    thresholds: Mapping[str, float] | None = None,
) -> Path:
    """Overlaid histograms of image scores for good / logical / structural test images.

    Args:
        scores: ``(N,)`` image scores.
        anomaly_types: ``N`` labels, usually ``"good"``, ``"logical"``, ``"structural"`` (other
            labels get their own histogram too).
        path: output PNG path.
        title: figure title.
        bins: number of bins, shared by all groups.
        thresholds: optional ``{label: value}`` drawn as labelled vertical lines (e.g. the
            calibrated and the F1-best decision thresholds); non-finite values are skipped.

    Returns:
        The path written.
    """
    s = _to_numpy(scores).astype(np.float64).reshape(-1)
    types = np.asarray([str(t) for t in anomaly_types])
    if types.shape[0] != s.shape[0]:
        raise ValueError(f"scores and anomaly_types differ in length: {s.shape[0]} vs {types.shape[0]}")
    finite = np.isfinite(s)
    edges = np.histogram_bin_edges(s[finite], bins=bins) if finite.any() else np.linspace(0, 1, bins + 1)
    order = [t for t in TYPE_COLORS if t in set(types)] + sorted(set(types) - set(TYPE_COLORS))
    fig = _new_figure(6.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for kind in order:
        vals = s[(types == kind) & finite]
        ax.hist(vals, bins=edges, alpha=0.45, color=TYPE_COLORS.get(kind), label=f"{kind} (n={vals.size})")
    styles = (("k", "--"), ("tab:blue", ":"), ("tab:purple", "-."), ("0.4", "-"))
    for i, (label, value) in enumerate((k, float(v)) for k, v in (thresholds or {}).items()):
        color, linestyle = styles[i % len(styles)]
        if np.isfinite(value):  # axvline widens the x range to show a threshold outside the scores
            ax.axvline(value, color=color, linestyle=linestyle, linewidth=1.4, label=f"{label} ({value:.2f})")
    ax.set_xlabel("score")
    ax.set_ylabel("images")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, path)


def heatmap_grid(
    items: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    alpha: float = 0.5,
    shared_scale: bool = False,
    cell_size: float = 2.6,
) -> Path:
    """Grid PNG: one row per item, showing the image and then one overlay per map.

    Args:
        items: dicts ``{"image": PIL or array, "title": str, "maps": {name: (h, w) array}}``, e.g.
            ``maps={"structural": ..., "logical": ...}``. Columns are the map names in order of
            first appearance; a row without some map leaves that cell empty.
        path: output PNG path.
        alpha: overlay weight.
        shared_scale: colour range per column shared across rows (compare rows) instead of per map.
        cell_size: inches per cell.

    Returns:
        The path written.
    """
    if not items:
        raise ValueError("heatmap_grid needs at least one item")
    names: list[str] = []
    for item in items:
        for name in item.get("maps", {}) or {}:
            if name not in names:
                names.append(name)
    ranges: dict[str, tuple[float | None, float | None]] = {n: (None, None) for n in names}
    if shared_scale:
        for n in names:
            vals = [_to_numpy(it["maps"][n]) for it in items if n in (it.get("maps") or {})]
            ranges[n] = (min(float(np.min(v)) for v in vals), max(float(np.max(v)) for v in vals))
    rows, cols = len(items), 1 + len(names)
    fig = _new_figure(cell_size * cols, cell_size * rows + 0.2)
    for r, item in enumerate(items):
        image = _as_rgb_image(item["image"])
        ax = fig.add_subplot(rows, cols, r * cols + 1)
        ax.imshow(np.asarray(image))
        ax.set_title(str(item.get("title", "")), fontsize=8)
        ax.axis("off")
        maps = item.get("maps") or {}
        for c, name in enumerate(names, start=2):
            ax = fig.add_subplot(rows, cols, r * cols + c)
            ax.axis("off")
            if name not in maps:
                continue
            vmin, vmax = ranges[name]
            ax.imshow(np.asarray(heatmap_overlay(image, maps[name], alpha=alpha, vmin=vmin, vmax=vmax)))
            m = _to_numpy(maps[name])
            ax.set_title(f"{name} (max {float(np.max(m)):.3g})", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_histogram_comparison(
    predicted: Any,
    actual: Any,
    path: str | os.PathLike | None = None,
    title: str | None = None,
    level_names: Sequence[str] | None = None,
) -> Image.Image:
    """Predicted vs actual code histograms of one test mask, one panel per tokenizer level.

    Args:
        predicted: ``(levels, K)`` predicted code distributions (e.g. softmax outputs).
        actual: ``(levels, K)`` normalised histograms of the tokenizer codes at the masked positions.
        path: optional PNG path to save to as well.
        title: figure title; default shows the per-mask L1 distance (the LADMIM score, 0..2 per level).
        level_names: panel titles (default ``level 0`` ...).

    Returns:
        The figure as an RGB ``PIL.Image`` (what a Gradio ``Image`` output accepts).
    """
    p = _to_numpy(predicted).astype(np.float64)
    q = _to_numpy(actual).astype(np.float64)
    if p.ndim == 1:
        p, q = p[None], q.reshape(1, -1)
    if p.shape != q.shape or p.ndim != 2:
        raise ValueError(f"predicted and actual must both be (levels, K); got {p.shape} and {q.shape}")
    levels, k = p.shape
    names = list(level_names) if level_names is not None else [f"level {i}" for i in range(levels)]
    if len(names) != levels:
        raise ValueError(f"{len(names)} level_names for {levels} levels")
    l1 = np.abs(p - q).sum(axis=1)
    fig = _new_figure(7.0, 1.9 * levels + 0.6)
    x = np.arange(k)
    for i in range(levels):
        ax = fig.add_subplot(levels, 1, i + 1)
        if k <= 64:
            ax.bar(x - 0.2, q[i], width=0.4, color="tab:blue", label="actual")
            ax.bar(x + 0.2, p[i], width=0.4, color="tab:orange", label="predicted")
        else:
            ax.fill_between(x, q[i], step="mid", color="tab:blue", alpha=0.35, label="actual")
            ax.step(x, p[i], where="mid", color="tab:orange", linewidth=1.0, label="predicted")
        ax.set_xlim(-0.5, k - 0.5)
        ax.set_ylabel("share", fontsize=8)
        ax.set_title(f"{names[i]}: L1 = {l1[i]:.3f}", fontsize=9)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.legend(fontsize=7, loc="upper right")
    fig.axes[-1].set_xlabel("code index", fontsize=8)
    fig.suptitle(title if title is not None else f"predicted vs actual code histograms (sum L1 = {l1.sum():.3f})",
                 fontsize=10)
    fig.tight_layout()
    return _to_pil(fig, path)
