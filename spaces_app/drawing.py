"""Self-contained drawing helpers of the Space: heat-map overlays, mask outlines, histogram charts.

The Space loads the model with ``trust_remote_code=True`` and does not install ``ladmim_hf``, so
it cannot import ``ladmim_hf.visualization``. The ~40 lines of overlay code below intentionally
duplicate ``ladmim_hf.visualization.heatmap_overlay`` (same jet colour map, bilinear resize, blend);
keep the two in step if either changes. Only numpy, PIL and matplotlib's object-oriented API are
used (no ``pyplot``: no GUI backend, safe in server threads).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageChops, ImageFilter

OUTLINE_COLOR = (255, 221, 0)  # bright yellow reads on light and dark scenes
ACTUAL_COLOR = "#1f77b4"
PREDICTED_COLOR = "#ff7f0e"


# --- heat maps (duplicated from ladmim_hf.visualization, see module docstring) ---------------------


def colorize(values: np.ndarray, size: tuple[int, int], vmin: float | None = None, vmax: float | None = None,
             cmap: str = "jet") -> Image.Image:
    """A float map ``(h, w)`` -> RGB image of ``size`` (W, H), bilinearly resized, colour-mapped."""
    import matplotlib

    m = np.nan_to_num(np.squeeze(np.asarray(values, dtype=np.float32)), nan=0.0, posinf=0.0, neginf=0.0)
    if m.ndim != 2:
        raise ValueError(f"a heat map must be 2-D, got shape {m.shape}")
    lo = float(m.min()) if vmin is None else float(vmin)
    hi = float(m.max()) if vmax is None else float(vmax)
    resized = np.asarray(Image.fromarray(m, mode="F").resize(size, Image.BILINEAR), dtype=np.float32)
    norm = np.clip((resized - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(resized)
    rgba = matplotlib.colormaps[cmap](norm)
    return Image.fromarray((rgba[..., :3] * 255.0 + 0.5).astype(np.uint8), mode="RGB")


def heatmap_overlay(image: Image.Image, values: np.ndarray, alpha: float = 0.5, vmin: float | None = None,
                    vmax: float | None = None, cmap: str = "jet") -> Image.Image:
    """Blend a colour-mapped map over an RGB image (blue = low, red = high)."""
    base = image.convert("RGB")
    return Image.blend(base, colorize(values, base.size, vmin, vmax, cmap), alpha)


# --- masks ---------------------------------------------------------------------------------------


def mask_outline(image: Image.Image, cells: np.ndarray, grid_size: int, dim: float = 0.45,
                 color: tuple[int, int, int] = OUTLINE_COLOR, offset: tuple[int, int] = (0, 0)) -> Image.Image:
    """Show one test mask on the image: the hidden region keeps its colours and gets an outline,
    everything else is dimmed.

    Args:
        image: RGB image (any size; the mask grid is stretched over it like the model's resize).
        cells: ``(grid_size * grid_size,)`` or ``(grid_size, grid_size)`` bool, True = hidden cell.
        grid_size: side of the model's token grid.
        dim: brightness kept outside the mask (0 = black, 1 = unchanged).
        offset: ``(right, down)`` pixels of ``image`` to move the hidden region by: a mask scored on the
            image moved by ``(dx, dy)`` covers the image's own pixels moved by ``(-dx, -dy)``.
    """
    base = image.convert("RGB")
    grid = np.asarray(cells, dtype=bool).reshape(grid_size, grid_size)
    region = Image.fromarray(grid.astype(np.uint8) * 255, mode="L").resize(base.size, Image.NEAREST)
    if offset != (0, 0):
        moved = Image.new("L", base.size, 0)
        moved.paste(region, (int(offset[0]), int(offset[1])))
        region = moved
    darker = Image.eval(base, lambda v: int(v * dim))
    shown = Image.composite(base, darker, region)
    width = max(3, round(min(base.size) / 110)) | 1  # odd kernel sizes for the rank filters
    edge = ImageChops.subtract(region.filter(ImageFilter.MaxFilter(width)), region.filter(ImageFilter.MinFilter(width)))
    return Image.composite(Image.new("RGB", base.size, color), shown, edge)


# --- predicted vs actual code histograms ------------------------------------------------------------


def _figure(width: float, height: float, dpi: int = 100):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _to_image(fig) -> Image.Image:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=fig.dpi, facecolor="white")
    buffer.seek(0)
    image = Image.open(buffer)
    image.load()
    return image.convert("RGB")


def histogram_chart(predicted: np.ndarray, actual: np.ndarray, title: str = "", top_codes: int = 10) -> Image.Image:
    """Small bar chart of the predicted vs actual code histograms of one mask, one panel per level.

    Args:
        predicted, actual: ``(levels, K)`` shares (each row sums to 1).
        title: figure title.
        top_codes: codes shown per level: the ones with the largest predicted or actual share (all
            codes when ``K`` is smaller); the panel title gives the level's full L1 distance.
    """
    p = np.asarray(predicted, dtype=np.float64)
    q = np.asarray(actual, dtype=np.float64)
    if p.ndim == 1:
        p, q = p[None], q.reshape(1, -1)
    if p.shape != q.shape or p.ndim != 2:
        raise ValueError(f"predicted and actual must both be (levels, K); got {p.shape} and {q.shape}")
    levels, k = p.shape
    shown = min(top_codes, k)
    panel, head, foot = 0.95, (0.55 if title else 0.3), 0.38  # inches
    height = head + panel * levels + foot
    fig = _figure(4.6, height)
    # fixed margins instead of tight_layout (which costs most of the drawing time)
    fig.subplots_adjust(left=0.12, right=0.98, top=1 - head / height, bottom=foot / height, hspace=0.42)
    for level in range(levels):
        ax = fig.add_subplot(levels, 1, level + 1)
        order = np.argsort(-np.maximum(p[level], q[level]), kind="stable")[:shown]
        x = np.arange(shown)
        ax.bar(x - 0.2, q[level, order], width=0.4, color=ACTUAL_COLOR, label="actual")
        ax.bar(x + 0.2, p[level, order], width=0.4, color=PREDICTED_COLOR, label="predicted")
        ax.set_xticks(x)
        ax.set_xticklabels([str(int(c)) for c in order], fontsize=6)
        ax.tick_params(axis="y", labelsize=6, length=2)
        ax.tick_params(axis="x", length=0, pad=1)
        top = float(max(p[level, order].max(initial=0.0), q[level, order].max(initial=0.0)))
        ax.set_ylim(0, max(top * 1.25, 0.05))
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        l1 = float(np.abs(p[level] - q[level]).sum())
        ax.text(0.99, 0.97, f"level {level}: L1 = {l1:.2f}", transform=ax.transAxes, ha="right", va="top",
                fontsize=7)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=2, fontsize=7, frameon=False,
               bbox_to_anchor=(0.5, 1 - (0.25 if title else 0.0) / height))
    fig.axes[-1].set_xlabel(f"code (the {shown} most used of {k})", fontsize=7, labelpad=1)
    if title:
        fig.suptitle(title, fontsize=8.5, y=1 - 0.05 / height, va="top")
    return _to_image(fig)
