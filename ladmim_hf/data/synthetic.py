"""``synthloco``: a generated logical-anomaly benchmark in the MVTec LOCO AD folder layout.

Five categories modelled on LOCO's rules (``breakfast_box``, ``juice_bottle``, ``pushpins``,
``screw_bag``, ``splicing_connectors``). Each image is first sampled as a *scene description*
(plain JSON data: objects, their kinds, positions and colours), the anomaly is applied to that
description, a rule checker confirms that exactly the intended rule is broken (logical) or that no
rule is broken (good, structural), and only then the scene is rendered. The description is the
source of truth: ``render_scene(scene)`` re-creates the image, ``check_scene_rules(scene)`` lists
the broken rules, and every category writes ``scenes.json`` next to its images.

Normal images vary as photographs do (scene jitter and rotation, lighting gradients and
vignetting, white balance, sensor noise, CC0 textures from scikit-image) and, more importantly,
the *normal* variation is designed so that logical anomalies create no locally new patch: items
lie anywhere inside their compartments, so an empty spot or two close items occur in normal
images too; counts are global; colour pairings couple distant parts. Structural anomalies are
local (stains, cuts, scratches, bends, wrong colours).

Run ``python -m ladmim_hf.data.synthetic --out data/synthloco --seed 0 [--small]``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

CATEGORIES = ("breakfast_box", "juice_bottle", "pushpins", "screw_bag", "splicing_connectors")
SCENE_SIZE = 256.0  # scene coordinates are in units of a 256 x 256 image
DEFAULT_COUNTS = {"train": 150, "validation": 30, "good": 40, "logical": 40, "structural": 40}
SMALL_COUNTS = {"train": 8, "validation": 4, "good": 3, "logical": 3, "structural": 3}
# (count key, folder relative to the category, split id used in the per-image seed)
_SPLIT_FOLDERS = (
    ("train", "train/good", 0),
    ("validation", "validation/good", 1),
    ("good", "test/good", 2),
    ("logical", "test/logical_anomalies", 3),
    ("structural", "test/structural_anomalies", 4),
)
PNG_OPTIONS = {"format": "PNG", "compress_level": 1, "optimize": False}  # fixed: byte-identical output
MARKER_FILE = "synthloco.json"
INF = 1.0e9

# --------------------------------------------------------------------------------------------
# Defect types: name, kind, grey value of the mask, sPRO saturation (absolute areas are given in
# pixels of a 256 x 256 image and scaled with the image size when written).
# --------------------------------------------------------------------------------------------
_DEFECTS: dict[str, list[tuple[str, str, int, float, bool]]] = {
    "breakfast_box": [
        ("missing_fruit", "logical", 255, 1000, False),
        ("extra_fruit", "logical", 254, 1.0, True),
        ("wrong_fruit_kind", "logical", 253, 1.0, True),
        ("wrong_ratio", "logical", 252, 1500, False),
        ("missing_ingredient", "logical", 251, 3000, False),
        ("damaged_fruit", "structural", 245, 1.0, True),
        ("contamination", "structural", 244, 1.0, True),
        ("box_damage", "structural", 243, 1.0, True),
    ],
    "juice_bottle": [
        ("wrong_fruit_icon", "logical", 255, 800, False),
        ("wrong_fill_level", "logical", 254, 1500, False),
        ("missing_label", "logical", 253, 2500, False),
        ("misplaced_label", "logical", 252, 1.0, True),
        ("missing_bottom_label", "logical", 251, 800, False),
        ("contamination", "structural", 245, 1.0, True),
        ("damaged_label", "structural", 244, 1.0, True),
        ("scratch", "structural", 243, 1.0, True),
        ("damaged_cap", "structural", 242, 1.0, True),
    ],
    "pushpins": [
        ("missing_pushpin", "logical", 255, 1200, False),
        ("additional_pushpin", "logical", 254, 1.0, True),
        ("missing_separator", "logical", 253, 1.0, True),
        ("broken_pushpin", "structural", 245, 1.0, True),
        ("color", "structural", 244, 1.0, True),
        ("contamination", "structural", 243, 1.0, True),
    ],
    "screw_bag": [
        ("missing_part", "logical", 255, 600, False),
        ("additional_part", "logical", 254, 1.0, True),
        ("wrong_screw_length", "logical", 253, 1.0, True),
        ("broken_screw", "structural", 245, 1.0, True),
        ("bag_broken", "structural", 244, 1.0, True),
        ("color", "structural", 243, 1.0, True),
        ("contamination", "structural", 242, 1.0, True),
    ],
    "splicing_connectors": [
        ("wrong_cable_color", "logical", 255, 1500, False),
        ("unequal_slot_count", "logical", 254, 1.0, True),
        ("missing_cable", "logical", 253, 1500, False),
        ("wrong_cable_slot", "logical", 252, 1.0, True),
        ("extra_cable", "logical", 251, 1.0, True),
        ("broken_cable", "structural", 245, 1.0, True),
        ("broken_connector", "structural", 244, 1.0, True),
        ("color", "structural", 243, 1.0, True),
        ("contamination", "structural", 242, 1.0, True),
    ],
}


def defect_types(category: str, kind: str | None = None) -> list[str]:
    """Names of a category's defect types, optionally only ``"logical"`` or ``"structural"`` ones."""
    _check_category(category)
    return [name for name, k, *_ in _DEFECTS[category] if kind is None or k == kind]


def defects_config(category: str, image_size: int = 256) -> list[dict]:
    """The ``defects_config.json`` content of a category (LOCO's field names)."""
    _check_category(category)
    area_scale = (image_size / SCENE_SIZE) ** 2
    out = []
    for name, _, value, saturation, relative in _DEFECTS[category]:
        threshold = float(saturation) if relative else int(round(saturation * area_scale))
        out.append({"defect_name": name, "pixel_value": value, "saturation_threshold": threshold,
                    "relative_saturation": relative})
    return out


def _pixel_value(category: str, name: str) -> int:
    for defect, _, value, *_ in _DEFECTS[category]:
        if defect == name:
            return value
    raise KeyError(f"unknown defect type {name!r} for category {category!r}")


def _check_category(category: str) -> None:
    if category not in _DEFECTS:
        raise ValueError(f"unknown synthloco category {category!r}; choose from {', '.join(CATEGORIES)}")


# --------------------------------------------------------------------------------------------
# Shapes: JSON-able specs with a signed distance function (negative inside, scene units).
# --------------------------------------------------------------------------------------------

def circle(cx, cy, r):
    return {"type": "circle", "cx": float(cx), "cy": float(cy), "r": float(r)}


def ellipse(cx, cy, a, b, angle=0.0):
    return {"type": "ellipse", "cx": float(cx), "cy": float(cy), "a": float(a), "b": float(b), "angle": float(angle)}


def rbox(cx, cy, w, h, angle=0.0, r=0.0):
    return {"type": "rbox", "cx": float(cx), "cy": float(cy), "w": float(w), "h": float(h),
            "angle": float(angle), "r": float(min(r, w / 2, h / 2))}


def hexagon(cx, cy, R, angle=0.0):
    return {"type": "hexagon", "cx": float(cx), "cy": float(cy), "R": float(R), "angle": float(angle)}


def capsule(points, r):
    return {"type": "capsule", "points": [[float(x), float(y)] for x, y in points], "r": float(r)}


def ring(cx, cy, ro, ri):
    return {"type": "ring", "cx": float(cx), "cy": float(cy), "ro": float(ro), "ri": float(ri)}


def blob(cx, cy, r, harmonics):
    return {"type": "blob", "cx": float(cx), "cy": float(cy), "r": float(r),
            "harmonics": [[int(k), float(a), float(p)] for k, a, p in harmonics]}


def union(*shapes):
    return {"type": "union", "shapes": list(shapes)}


def inter(*shapes):
    return {"type": "inter", "shapes": list(shapes)}


def diff(a, b):
    return {"type": "diff", "a": a, "b": b}


def dilate(shape, amount):
    return {"type": "dilate", "shape": shape, "amount": float(amount)}


def wave(y0, amp, period, phase, below=True):
    """Region below (``below=True``, larger y) or above a sine boundary ``y0 + amp sin(...)``."""
    return {"type": "wave", "y0": float(y0), "amp": float(amp), "period": float(period),
            "phase": float(phase), "side": 1.0 if below else -1.0}


def _rotate(x, y, cx, cy, angle):
    dx, dy = x - cx, y - cy
    if angle == 0.0:
        return dx, dy
    c, s = math.cos(angle), math.sin(angle)
    return c * dx + s * dy, -s * dx + c * dy


def sdf(spec: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed distance (scene units, negative inside) of a shape spec at points ``(x, y)``."""
    kind = spec["type"]
    if kind == "circle":
        return np.hypot(x - spec["cx"], y - spec["cy"]) - spec["r"]
    if kind == "ellipse":
        px, py = _rotate(x, y, spec["cx"], spec["cy"], spec["angle"])
        a, b = spec["a"], spec["b"]
        return (np.hypot(px / a, py / b) - 1.0) * min(a, b)
    if kind == "rbox":
        px, py = _rotate(x, y, spec["cx"], spec["cy"], spec["angle"])
        r = spec["r"]
        qx = np.abs(px) - (spec["w"] / 2 - r)
        qy = np.abs(py) - (spec["h"] / 2 - r)
        outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
        return outside + np.minimum(np.maximum(qx, qy), 0) - r
    if kind == "hexagon":
        px, py = _rotate(x, y, spec["cx"], spec["cy"], spec["angle"])
        inradius = spec["R"] * 0.8660254
        kx, ky, kz = -0.8660254, 0.5, 0.57735027
        px, py = np.abs(px), np.abs(py)
        dot = np.minimum(kx * px + ky * py, 0.0)
        px = px - 2 * dot * kx
        py = py - 2 * dot * ky
        px = px - np.clip(px, -kz * inradius, kz * inradius)
        py = py - inradius
        return np.hypot(px, py) * np.sign(py)
    if kind == "capsule":
        pts = spec["points"]
        best = None
        for (ax, ay), (bx, by) in zip(pts[:-1], pts[1:]):
            dx, dy = bx - ax, by - ay
            length2 = dx * dx + dy * dy or 1e-9
            t = np.clip(((x - ax) * dx + (y - ay) * dy) / length2, 0.0, 1.0)
            dist = np.hypot(x - ax - t * dx, y - ay - t * dy)
            best = dist if best is None else np.minimum(best, dist)
        if best is None:  # a single point
            best = np.hypot(x - pts[0][0], y - pts[0][1])
        return best - spec["r"]
    if kind == "ring":
        mid = (spec["ro"] + spec["ri"]) / 2
        return np.abs(np.hypot(x - spec["cx"], y - spec["cy"]) - mid) - (spec["ro"] - spec["ri"]) / 2
    if kind == "blob":
        dx, dy = x - spec["cx"], y - spec["cy"]
        theta = np.arctan2(dy, dx)
        radius = np.ones_like(theta)
        for k, a, p in spec["harmonics"]:
            radius = radius + a * np.cos(k * theta + p)
        return (np.hypot(dx, dy) - spec["r"] * radius) * 0.85
    if kind == "union":
        return np.minimum.reduce([sdf(s, x, y) for s in spec["shapes"]])
    if kind == "inter":
        return np.maximum.reduce([sdf(s, x, y) for s in spec["shapes"]])
    if kind == "diff":
        return np.maximum(sdf(spec["a"], x, y), -sdf(spec["b"], x, y))
    if kind == "dilate":
        return sdf(spec["shape"], x, y) - spec["amount"]
    if kind == "wave":
        boundary = spec["y0"] + spec["amp"] * np.sin(2 * math.pi * x / spec["period"] + spec["phase"])
        return (boundary - y) * spec["side"]
    raise ValueError(f"unknown shape type {kind!r}")


def bbox(spec: dict) -> tuple[float, float, float, float]:
    """Axis-aligned bounding box ``(x0, y0, x1, y1)`` in scene units (may be infinite)."""
    kind = spec["type"]
    if kind in ("circle",):
        cx, cy, r = spec["cx"], spec["cy"], spec["r"]
        return cx - r, cy - r, cx + r, cy + r
    if kind == "ellipse":
        r = max(spec["a"], spec["b"])
        return spec["cx"] - r, spec["cy"] - r, spec["cx"] + r, spec["cy"] + r
    if kind == "rbox":
        c, s = abs(math.cos(spec["angle"])), abs(math.sin(spec["angle"]))
        hw = (spec["w"] * c + spec["h"] * s) / 2
        hh = (spec["w"] * s + spec["h"] * c) / 2
        return spec["cx"] - hw, spec["cy"] - hh, spec["cx"] + hw, spec["cy"] + hh
    if kind == "hexagon":
        r = spec["R"]
        return spec["cx"] - r, spec["cy"] - r, spec["cx"] + r, spec["cy"] + r
    if kind == "capsule":
        pts = np.asarray(spec["points"])
        r = spec["r"]
        return pts[:, 0].min() - r, pts[:, 1].min() - r, pts[:, 0].max() + r, pts[:, 1].max() + r
    if kind == "ring":
        r = spec["ro"]
        return spec["cx"] - r, spec["cy"] - r, spec["cx"] + r, spec["cy"] + r
    if kind == "blob":
        r = spec["r"] * (1 + sum(abs(a) for _, a, _ in spec["harmonics"]))
        return spec["cx"] - r, spec["cy"] - r, spec["cx"] + r, spec["cy"] + r
    if kind == "union":
        boxes = [bbox(s) for s in spec["shapes"]]
        return min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)
    if kind == "inter":
        boxes = [bbox(s) for s in spec["shapes"]]
        return max(b[0] for b in boxes), max(b[1] for b in boxes), min(b[2] for b in boxes), min(b[3] for b in boxes)
    if kind == "diff":
        return bbox(spec["a"])
    if kind == "dilate":
        x0, y0, x1, y1 = bbox(spec["shape"])
        a = spec["amount"]
        return x0 - a, y0 - a, x1 + a, y1 + a
    if kind == "wave":
        return -INF, -INF, INF, INF
    raise ValueError(f"unknown shape type {kind!r}")


# --------------------------------------------------------------------------------------------
# Textures (CC0, shipped with scikit-image) and the canvas
# --------------------------------------------------------------------------------------------
_TEXTURES: dict[str, np.ndarray] = {}


def _textures() -> dict[str, np.ndarray]:
    if not _TEXTURES:
        from scipy.ndimage import gaussian_filter
        from skimage import data as skdata

        for name in ("brick", "grass", "gravel"):
            t = getattr(skdata, name)().astype(np.float32)
            t = (t - t.mean()) / (t.std() + 1e-6)
            _TEXTURES[name] = t
            smooth = gaussian_filter(t, 6.0, mode="wrap")
            _TEXTURES[name + "_smooth"] = (smooth - smooth.mean()) / (smooth.std() + 1e-6)
    return _TEXTURES


class Canvas:
    """An RGB float image plus the scene-to-pixel transform (rotation, scale, shift)."""

    def __init__(self, size: int, angle: float = 0.0, scale: float = 1.0, shift=(0.0, 0.0),
                 light=(-0.45, -0.6, 0.66)):
        self.size = int(size)
        k = self.size / SCENE_SIZE
        self.ppu = float(scale * k)  # pixels per scene unit
        self.angle = float(angle)
        self.shift = (float(shift[0]) * k, float(shift[1]) * k)
        c, s = math.cos(self.angle), math.sin(self.angle)
        self._cos, self._sin = c, s
        u = np.arange(self.size, dtype=np.float32) + 0.5
        uu, vv = np.meshgrid(u, u)
        du = (uu - self.size / 2 - self.shift[0]) / self.ppu
        dv = (vv - self.size / 2 - self.shift[1]) / self.ppu
        self.X = (SCENE_SIZE / 2 + c * du + s * dv).astype(np.float32)
        self.Y = (SCENE_SIZE / 2 - s * du + c * dv).astype(np.float32)
        self.img = np.zeros((self.size, self.size, 3), dtype=np.float32)
        self._tex_index: dict = {}
        self.full = (slice(0, self.size), slice(0, self.size))
        lx, ly, lz = light
        n = math.sqrt(lx * lx + ly * ly + lz * lz)
        self.light = (lx / n, ly / n, lz / n)

    def to_pixel(self, x, y):
        c, s = self._cos, self._sin
        dx, dy = x - SCENE_SIZE / 2, y - SCENE_SIZE / 2
        u = self.size / 2 + self.shift[0] + self.ppu * (c * dx - s * dy)
        v = self.size / 2 + self.shift[1] + self.ppu * (s * dx + c * dy)
        return u, v

    def window(self, box, pad: float = 2.0):
        x0, y0, x1, y1 = box
        if x0 <= -INF / 2 or y0 <= -INF / 2 or x1 >= INF / 2 or y1 >= INF / 2:
            return self.full
        us, vs = [], []
        for x, y in ((x0, y0), (x1, y0), (x0, y1), (x1, y1)):
            u, v = self.to_pixel(x, y)
            us.append(u)
            vs.append(v)
        pad_px = pad * self.ppu + 2
        c0 = max(int(math.floor(min(us) - pad_px)), 0)
        c1 = min(int(math.ceil(max(us) + pad_px)), self.size)
        r0 = max(int(math.floor(min(vs) - pad_px)), 0)
        r1 = min(int(math.ceil(max(vs) + pad_px)), self.size)
        if c1 - c0 < 2 or r1 - r0 < 2:
            return None
        return (slice(r0, r1), slice(c0, c1))

    def coverage(self, spec: dict, offset=(0.0, 0.0), soft: float = 0.0, pad: float = 2.0):
        """``(window, alpha, distance)``: anti-aliased coverage of a shape (``soft`` blurs the edge)."""
        box = bbox(spec)
        box = (box[0] + offset[0], box[1] + offset[1], box[2] + offset[0], box[3] + offset[1])
        win = self.window(box, pad + soft)
        if win is None:
            return None, None, None
        d = sdf(spec, self.X[win] - offset[0], self.Y[win] - offset[1])
        if soft > 0:
            alpha = np.clip(0.5 - d / soft, 0.0, 1.0)
        else:
            alpha = np.clip(0.5 - d * self.ppu, 0.0, 1.0)
        return win, alpha, d

    def background(self, color) -> None:
        """Fill the whole canvas (``color`` as in :meth:`fill`)."""
        win = self.full
        d = np.full((self.size, self.size), -INF, dtype=np.float32)
        col = color(self, win, d) if callable(color) else np.asarray(color, dtype=np.float32)
        self.img[...] = col

    def fill(self, spec: dict, color, opacity: float = 1.0, soft: float = 0.0):
        win, alpha, d = self.coverage(spec, soft=soft)
        if win is None:
            return
        col = color(self, win, d) if callable(color) else np.asarray(color, dtype=np.float32)
        a = (alpha * opacity)[..., None]
        region = self.img[win]
        region += (col - region) * a

    def shadow(self, spec: dict, offset=(3.0, 4.0), blur: float = 4.0, strength: float = 0.35):
        win, alpha, _ = self.coverage(spec, offset=offset, soft=blur)
        if win is None:
            return
        self.img[win] *= (1.0 - strength * alpha)[..., None]

    def mask(self, spec: dict) -> np.ndarray:
        out = np.zeros((self.size, self.size), dtype=bool)
        win, alpha, _ = self.coverage(spec)
        if win is not None:
            out[win] = alpha >= 0.5
        return out

    def texture(self, name: str, win, scale: float = 1.0, offset=(0.0, 0.0)) -> np.ndarray:
        """Texture values (zero mean, unit std) sampled at the scene coordinates of a window."""
        tex = _textures()[name]
        h, w = tex.shape  # all textures are 512 x 512 (powers of two: & instead of %)
        rows, cols = win
        full = (rows.stop - rows.start) * (cols.stop - cols.start) == self.size * self.size
        key = (float(scale), float(offset[0]), float(offset[1]))
        index = self._tex_index.get(key) if full else None
        if index is None:
            # + 16 * 512 keeps the values positive, so truncation is floor
            ix = (self.X[win] * scale + (offset[0] + 16 * w)).astype(np.int32) & (w - 1)
            iy = (self.Y[win] * scale + (offset[1] + 16 * h)).astype(np.int32) & (h - 1)
            index = iy * w + ix
            if full:
                self._tex_index[key] = index
        return tex.ravel().take(index)

    def local(self, win):
        return self.X[win], self.Y[win]


# ---- colour functions -------------------------------------------------------------------------

def _rgb(color) -> np.ndarray:
    return np.asarray(color, dtype=np.float32)


def flat(base, tex: str | None = None, tex_amp: float = 0.0, tex_scale: float = 1.0, tex_offset=(0, 0),
         bevel: float = 0.0, bevel_amp: float = 0.25, inner_shadow: float = 0.0, inner_width: float = 6.0):
    """Flat surface: optional texture, bevel lighting at the edges and ambient occlusion inside."""
    base = _rgb(base)

    def color(cv: Canvas, win, d):
        shade = np.ones(d.shape, dtype=np.float32)
        if tex:
            shade = shade * (1.0 + tex_amp * cv.texture(tex, win, tex_scale, tex_offset))
        if bevel > 0 and min(d.shape) >= 2:
            gy, gx = np.gradient(d)
            norm = np.hypot(gx, gy) + 1e-6
            edge = np.clip(1.0 + d / bevel, 0.0, 1.0)
            facing = -(gx * cv.light[0] + gy * cv.light[1]) / norm
            shade = shade * (1.0 + bevel_amp * edge * facing)
        if inner_shadow > 0:
            shade = shade * (1.0 - inner_shadow * np.clip(1.0 + d / inner_width, 0.0, 1.0))
        return base[None, None, :] * shade[..., None]

    return color


def sphere(base, cx, cy, r, spec: float = 0.35, tex: str | None = None, tex_amp: float = 0.0,
           tex_scale: float = 1.0, tex_offset=(0, 0), blend=None, gloss: float = 25.0, ambient: float = 0.42):
    """Lambert + specular shading of a sphere-like item; ``blend=(color2, angle, sharpness)`` mixes a blush."""
    base = _rgb(base)

    def color(cv: Canvas, win, d):
        x, y = cv.local(win)
        nx = (x - cx) / r
        ny = (y - cy) / r
        nz = np.sqrt(np.clip(1.0 - nx * nx - ny * ny, 0.0, 1.0))
        lam = np.clip(-(nx * cv.light[0] + ny * cv.light[1]) + nz * cv.light[2], 0.0, 1.0)
        col = np.broadcast_to(base, nx.shape + (3,)).copy()
        if blend is not None:
            color2, angle, sharp = blend
            w = np.clip(0.5 + sharp * (nx * math.cos(angle) + ny * math.sin(angle)), 0.0, 1.0)
            col = col * (1 - w[..., None]) + _rgb(color2) * w[..., None]
        shade = ambient + (1.0 - ambient) * 1.1 * lam
        if tex:
            shade = shade * (1.0 + tex_amp * cv.texture(tex, win, tex_scale, tex_offset))
        col = col * shade[..., None] + 255.0 * spec * (lam ** gloss)[..., None]
        return col

    return color


def tube(base, r, spec: float = 0.3, stripes: tuple | None = None):
    """Cylinder profile across a capsule; ``stripes=(ax, ay, ux, uy, period, amp)`` adds threads."""
    base = _rgb(base)

    def color(cv: Canvas, win, d):
        t = np.clip(-d / r, 0.0, 1.0)
        prof = np.sqrt(np.clip(1.0 - (1.0 - t) ** 2, 0.0, 1.0))
        shade = 0.5 + 0.55 * prof
        if stripes is not None:
            ax, ay, ux, uy, period, amp = stripes
            x, y = cv.local(win)
            s = (x - ax) * ux + (y - ay) * uy
            shade = shade * (1.0 - amp * (0.5 + 0.5 * np.sin(2 * math.pi * s / period)))
        return base[None, None, :] * shade[..., None] + 255.0 * spec * (prof ** 14)[..., None]

    return color


_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _finish(cv: Canvas, rng: np.random.Generator, photo: dict) -> np.ndarray:
    """Lighting gradient, vignetting, exposure, white balance and sensor noise -> uint8."""
    s = cv.size
    if s not in _GRIDS:
        u = np.linspace(-1.0, 1.0, s, dtype=np.float32)
        _GRIDS[s] = np.meshgrid(u, u)
    uu, vv = _GRIDS[s]
    ga = photo["gradient_angle"]
    gain = 1.0 + photo["gradient"] * (math.cos(ga) * uu + math.sin(ga) * vv) - photo["vignette"] * (uu * uu + vv * vv) / 2
    img = cv.img * (photo["exposure"] * gain)[..., None] * _rgb(photo["white_balance"])[None, None, :]
    img += rng.standard_normal(img.shape, dtype=np.float32) * photo["noise"]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Sampling helpers
# --------------------------------------------------------------------------------------------

def _u(rng, lo, hi) -> float:
    return float(rng.uniform(lo, hi))


def _blob_harmonics(rng, n: int = 4, amp: float = 0.22):
    return [[k, float(rng.uniform(0.3, 1.0) * amp / k ** 0.5), float(rng.uniform(0, 2 * math.pi))] for k in range(2, 2 + n)]


def _random_blob(rng, cx, cy, r, amp: float = 0.25):
    return blob(cx, cy, r, _blob_harmonics(rng, 4, amp))


def _jagged_line(rng, x0, y0, length, angle, n=6, jitter=3.0):
    pts = []
    for i in range(n + 1):
        t = i / n
        off = _u(rng, -jitter, jitter) if 0 < i < n else 0.0
        pts.append((x0 + t * length * math.cos(angle) - off * math.sin(angle),
                    y0 + t * length * math.sin(angle) + off * math.cos(angle)))
    return pts


def _bezier(p0, p1, p2, p3, n=24):
    out = []
    for i in range(n + 1):
        t = i / n
        a, b, c, d = (1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t * t, t ** 3
        out.append((a * p0[0] + b * p1[0] + c * p2[0] + d * p3[0], a * p0[1] + b * p1[1] + c * p2[1] + d * p3[1]))
    return out


class _Retry(Exception):
    """Raised when a random placement failed; the caller re-samples with the same generator."""


def _place(rng, sampler: Callable[[], dict], ok: Callable[[dict], bool], tries: int = 300) -> dict:
    for _ in range(tries):
        candidate = sampler()
        if ok(candidate):
            return candidate
    raise _Retry()


def _no_overlap(circles_a, circles_b, gap=0.0) -> bool:
    for ax, ay, ar in circles_a:
        for bx, by, br in circles_b:
            if (ax - bx) ** 2 + (ay - by) ** 2 < (ar + br + gap) ** 2:
                return False
    return True


def _photo(rng, angle_deg=3.0, shift=6.0) -> dict:
    la = _u(rng, math.radians(200), math.radians(250))
    return {
        "angle": math.radians(_u(rng, -angle_deg, angle_deg)),
        "scale": _u(rng, 0.97, 1.03),
        "shift": [_u(rng, -shift, shift), _u(rng, -shift, shift)],
        "light": [0.6 * math.cos(la), 0.6 * math.sin(la), 0.7],
        "exposure": _u(rng, 0.9, 1.08),
        "white_balance": [_u(rng, 0.96, 1.04), 1.0, _u(rng, 0.96, 1.04)],
        "gradient": _u(rng, 0.0, 0.14),
        "gradient_angle": _u(rng, 0, 2 * math.pi),
        "vignette": _u(rng, 0.04, 0.16),
        "noise": _u(rng, 1.0, 2.2),
        "tex_offset": [_u(rng, 0, 512), _u(rng, 0, 512)],
        "render_seed": int(rng.integers(0, 2**31 - 1)),
    }


# ============================================================================================
# breakfast_box: 2 tangerines + 1 nectarine on the left; cereal and toppings (banana chips +
# almonds) in a 1:1 ratio on the right (which of the two lies on top varies).
# ============================================================================================
_BB_LEFT = {"cx": 67.0, "cy": 128.0, "w": 100.0, "h": 176.0}
_BB_RIGHT = {"cx": 181.0, "cy": 128.0, "w": 112.0, "h": 176.0}
_BB_FRUIT_R = {"tangerine": (19.0, 21.5), "nectarine": (22.5, 25.0)}
_BB_RULE_COUNTS = {"tangerine": 2, "nectarine": 1}
_BB_RATIO = (0.42, 0.58)  # allowed cereal fraction of the right compartment


def _bb_fruit(rng, kind, fruits, comp=_BB_LEFT, centre=None):
    lo, hi = _BB_FRUIT_R[kind]
    r = _u(rng, lo, hi)

    def sample():
        if centre is not None:
            cx, cy = centre
        else:
            cx = _u(rng, comp["cx"] - comp["w"] / 2 + r + 3, comp["cx"] + comp["w"] / 2 - r - 3)
            cy = _u(rng, comp["cy"] - comp["h"] / 2 + r + 3, comp["cy"] + comp["h"] / 2 - r - 3)
        return {"kind": kind, "cx": cx, "cy": cy, "r": r, "stem_angle": _u(rng, 0, 2 * math.pi),
                "blush_angle": _u(rng, 0, 2 * math.pi)}

    others = [(f["cx"], f["cy"], f["r"]) for f in fruits]
    return _place(rng, sample, lambda f: _no_overlap([(f["cx"], f["cy"], f["r"])], others, gap=-2.0))


def _bb_sample(rng) -> dict:
    fruits: list[dict] = []
    for kind in ("tangerine", "tangerine", "nectarine"):
        fruits.append(_bb_fruit(rng, kind, fruits))
    rng.shuffle(fruits)
    comp = _BB_RIGHT
    toppings = []
    for _ in range(46):
        x = _u(rng, comp["cx"] - comp["w"] / 2 + 5, comp["cx"] + comp["w"] / 2 - 5)
        y = _u(rng, comp["cy"] - comp["h"] / 2 + 5, comp["cy"] + comp["h"] / 2 - 5)
        if rng.uniform() < 0.7:
            toppings.append({"kind": "chip", "cx": x, "cy": y, "r": _u(rng, 7.5, 9.5), "angle": _u(rng, 0, 6.3)})
        else:
            toppings.append({"kind": "almond", "cx": x, "cy": y, "r": _u(rng, 7.5, 9.0), "angle": _u(rng, 0, 6.3)})
    fraction = _u(rng, 0.46, 0.54)
    return {
        "fruits": fruits,
        "cereal_on_top": bool(rng.uniform() < 0.5),
        "cereal_fraction": fraction,
        "nominal_fraction": fraction,
        "wave": {"amp": _u(rng, 2.0, 5.0), "period": _u(rng, 40, 80), "phase": _u(rng, 0, 6.3)},
        "toppings": toppings,
        "tray_color": [_u(rng, 222, 234), _u(rng, 216, 226), _u(rng, 198, 212)],
        "damage": [],
    }


def _bb_regions(p: dict, fraction: float):
    """(cereal region, toppings region) of the right compartment for a cereal fraction."""
    comp = _BB_RIGHT
    box = rbox(comp["cx"], comp["cy"], comp["w"], comp["h"], r=9)
    top = comp["cy"] - comp["h"] / 2
    wv = p["wave"]
    f_top = fraction if p["cereal_on_top"] else 1.0 - fraction
    y0 = top + f_top * comp["h"]
    upper = inter(box, wave(y0, wv["amp"], wv["period"], wv["phase"], below=False))
    lower = inter(box, wave(y0, wv["amp"], wv["period"], wv["phase"], below=True))
    if fraction <= 0.0:
        upper, lower = (None, box) if p["cereal_on_top"] else (box, None)
    elif fraction >= 1.0:
        upper, lower = (box, None) if p["cereal_on_top"] else (None, box)
    return (upper, lower) if p["cereal_on_top"] else (lower, upper)


def _bb_rules(p: dict) -> list[str]:
    broken = []
    counts = Counter(f["kind"] for f in p["fruits"])
    if sum(counts.values()) < 3:
        broken.append("missing_fruit")
    elif sum(counts.values()) > 3:
        broken.append("extra_fruit")
    elif dict(counts) != _BB_RULE_COUNTS:
        broken.append("wrong_fruit_kind")
    f = p["cereal_fraction"]
    if f <= 0.0 or f >= 1.0:
        broken.append("missing_ingredient")
    elif not (_BB_RATIO[0] <= f <= _BB_RATIO[1]):
        broken.append("wrong_ratio")
    return broken


def _bb_logical(p: dict, name: str, rng) -> list[dict]:
    fruits = p["fruits"]
    if name == "missing_fruit":
        gone = fruits.pop(int(rng.integers(len(fruits))))
        return [circle(gone["cx"], gone["cy"], gone["r"])]
    if name == "extra_fruit":
        kind = "tangerine" if rng.uniform() < 0.6 else "nectarine"
        new = _bb_fruit(rng, kind, fruits)
        fruits.insert(int(rng.integers(len(fruits) + 1)), new)
        return [circle(new["cx"], new["cy"], new["r"])]
    if name == "wrong_fruit_kind":
        i = int(rng.integers(len(fruits)))
        old = fruits.pop(i)
        kind = "nectarine" if old["kind"] == "tangerine" else "tangerine"
        try:
            new = _bb_fruit(rng, kind, fruits, centre=(old["cx"], old["cy"]), )
        except _Retry:
            new = _bb_fruit(rng, kind, fruits)
        fruits.insert(i, new)
        return [circle(new["cx"], new["cy"], new["r"])]
    nominal = p["nominal_fraction"]
    if name == "wrong_ratio":
        f = _u(rng, 0.16, 0.28) if rng.uniform() < 0.5 else _u(rng, 0.72, 0.84)
        p["cereal_fraction"] = f
        # the band between the nominal and the actual boundary
        cereal_now, _ = _bb_regions(p, f)
        cereal_nom, top_nom = _bb_regions(p, nominal)
        if f > nominal:
            return [inter(cereal_now, top_nom)]
        return [inter(cereal_nom, _bb_regions(p, f)[1])]
    if name == "missing_ingredient":
        cereal_nom, top_nom = _bb_regions(p, nominal)
        if rng.uniform() < 0.5:
            p["cereal_fraction"] = 1.0
            return [top_nom]
        p["cereal_fraction"] = 0.0
        return [cereal_nom]
    raise KeyError(name)


def _bb_structural(p: dict, name: str, rng) -> list[dict]:
    if name == "damaged_fruit":
        f = p["fruits"][int(rng.integers(len(p["fruits"])))]
        a, dist = _u(rng, 0, 2 * math.pi), _u(rng, 0.0, 0.4) * f["r"]
        b = _random_blob(rng, f["cx"] + dist * math.cos(a), f["cy"] + dist * math.sin(a), _u(rng, 0.5, 0.62) * f["r"], 0.3)
        region = inter(b, circle(f["cx"], f["cy"], f["r"] - 0.5))
        p["damage"].append({"kind": "bruise", "shape": region, "color": [_u(rng, 60, 80), _u(rng, 38, 48), _u(rng, 18, 26)]})
        return [region]
    if name == "contamination":
        comp = _BB_LEFT if rng.uniform() < 0.5 else _BB_RIGHT
        cx = _u(rng, comp["cx"] - comp["w"] / 2 + 14, comp["cx"] + comp["w"] / 2 - 14)
        cy = _u(rng, comp["cy"] - comp["h"] / 2 + 14, comp["cy"] + comp["h"] / 2 - 14)
        if rng.uniform() < 0.65:
            shape = _random_blob(rng, cx, cy, _u(rng, 9.5, 13), 0.35)
            color = [[40, 95, 210], [50, 50, 56], [70, 160, 70]][int(rng.integers(3))]
            p["damage"].append({"kind": "plastic", "shape": shape, "color": color})
        else:
            pts = _bezier((cx - 26, cy + _u(rng, -8, 8)), (cx - 8, cy + _u(rng, -28, 28)),
                          (cx + 8, cy + _u(rng, -28, 28)), (cx + 26, cy + _u(rng, -8, 8)), 14)
            shape = capsule(pts, 2.0)
            p["damage"].append({"kind": "hair", "shape": shape, "color": [30, 24, 20]})
            shape = dilate(shape, 1.5)
        return [shape]
    if name == "box_damage":
        # a crack running from a chipped hole at a compartment wall into the floor
        comp = _BB_LEFT if rng.uniform() < 0.6 else _BB_RIGHT
        side = int(rng.integers(4))
        if side < 2:
            x0 = comp["cx"] + (comp["w"] / 2 if side == 0 else -comp["w"] / 2)
            y0 = _u(rng, comp["cy"] - comp["h"] / 2 + 20, comp["cy"] + comp["h"] / 2 - 20)
            angle = (math.pi if side == 0 else 0.0) + _u(rng, -0.6, 0.6)
        else:
            x0 = _u(rng, comp["cx"] - comp["w"] / 2 + 20, comp["cx"] + comp["w"] / 2 - 20)
            y0 = comp["cy"] + (comp["h"] / 2 if side == 2 else -comp["h"] / 2)
            angle = (-math.pi / 2 if side == 2 else math.pi / 2) + _u(rng, -0.6, 0.6)
        pts = _jagged_line(rng, x0, y0, _u(rng, 36, 50), angle, 7, 3.5)
        crack = capsule(pts, 1.6)
        chip = _random_blob(rng, pts[0][0], pts[0][1], _u(rng, 8, 10.5), 0.3)
        p["damage"].append({"kind": "crack", "shape": crack, "chip": chip, "color": [62, 52, 44]})
        return [union(dilate(crack, 1.5), chip)]
    raise KeyError(name)


def _bb_render(p: dict, cv: Canvas, rng, photo: dict):
    to = photo["tex_offset"]
    cv.background(flat((96, 78, 62), tex="brick_smooth", tex_amp=0.08, tex_scale=0.5, tex_offset=to))
    cv.img += (cv.texture("grass", cv.full, 1.0, to) * 5.0)[..., None]
    tray = rbox(124, 128, 240, 196, r=14)
    cv.shadow(tray, (4, 6), 7, 0.5)
    tray_col = p["tray_color"]
    cv.fill(tray, flat(tray_col, tex="gravel_smooth", tex_amp=0.02, bevel=5, bevel_amp=0.3))
    floor_col = [c * 0.9 for c in tray_col]
    for comp in (_BB_LEFT, _BB_RIGHT):
        cv.fill(rbox(comp["cx"], comp["cy"], comp["w"], comp["h"], r=9),
                flat(floor_col, tex="gravel_smooth", tex_amp=0.03, inner_shadow=0.25, inner_width=9))
    # right compartment: cereal and toppings
    cereal, tops = _bb_regions(p, p["cereal_fraction"])
    if cereal is not None:
        cv.fill(cereal, flat((165, 115, 60), tex="gravel", tex_amp=0.32, tex_scale=1.6, tex_offset=to, inner_shadow=0.3, inner_width=8))
        cv.fill(cereal, flat((200, 150, 90), tex="gravel", tex_amp=0.5, tex_scale=2.2, tex_offset=(to[1], to[0])), opacity=0.35)
    if tops is not None:
        cv.fill(tops, flat((214, 188, 135), tex="grass", tex_amp=0.12, tex_offset=to, inner_shadow=0.3, inner_width=8))
        win, alpha, _ = cv.coverage(tops)
        clip = np.zeros((cv.size, cv.size), dtype=np.float32)
        if win is not None:
            clip[win] = alpha
        base = cv.img.copy()
        inside = sdf(tops, np.float32([t["cx"] for t in p["toppings"]]), np.float32([t["cy"] for t in p["toppings"]]))
        for t, dist in zip(p["toppings"], inside):
            if dist > 3.0:  # only the toppings inside their region (plus a little spill-over)
                continue
            if t["kind"] == "chip":
                shape = circle(t["cx"], t["cy"], t["r"])
                cv.shadow(shape, (1.5, 2), 2, 0.3)
                cv.fill(shape, sphere((236, 218, 160), t["cx"], t["cy"], t["r"] * 1.6, spec=0.1, ambient=0.6))
            else:
                shape = ellipse(t["cx"], t["cy"], t["r"], t["r"] * 0.58, t["angle"])
                cv.shadow(shape, (1.5, 2), 2, 0.3)
                cv.fill(shape, sphere((150, 92, 52), t["cx"], t["cy"], t["r"] * 0.8, spec=0.15))
        cv.img = base + (cv.img - base) * clip[..., None]
    # left compartment: fruits
    for f in p["fruits"]:
        shape = circle(f["cx"], f["cy"], f["r"])
        cv.shadow(shape, (3, 4), 5, 0.45)
        if f["kind"] == "tangerine":
            col = sphere((242, 128, 22), f["cx"], f["cy"], f["r"], spec=0.3, tex="gravel", tex_amp=0.06, tex_scale=3.0, tex_offset=to)
        else:
            col = sphere((236, 170, 62), f["cx"], f["cy"], f["r"], spec=0.25, tex="grass_smooth", tex_amp=0.06,
                         blend=((178, 32, 38), f["blush_angle"], 0.9))
        cv.fill(shape, col)
        sx = f["cx"] + 0.35 * f["r"] * math.cos(f["stem_angle"])
        sy = f["cy"] + 0.35 * f["r"] * math.sin(f["stem_angle"])
        cv.fill(circle(sx, sy, 2.3), (85, 72, 35) if f["kind"] == "tangerine" else (95, 60, 30))
    _render_damage(p, cv, to)


def _render_damage(p: dict, cv: Canvas, to):
    """Damage overlays shared by several categories."""
    for dmg in p.get("damage", []):
        kind = dmg["kind"]
        if kind == "bruise":
            cv.fill(dmg["shape"], flat(dmg["color"], tex="gravel", tex_amp=0.25, tex_scale=3.0, tex_offset=to), opacity=0.92)
        elif kind in ("plastic", "dirt"):
            cv.shadow(dmg["shape"], (1.5, 2), 2.5, 0.4)
            cv.fill(dmg["shape"], flat(dmg["color"], tex="gravel", tex_amp=0.12, tex_scale=2.0, bevel=2.5, bevel_amp=0.4))
        elif kind == "hair":
            cv.fill(dmg["shape"], dmg["color"])
        elif kind == "crack":
            cv.fill(dmg["chip"], flat(dmg["color"], tex="gravel", tex_amp=0.3, tex_scale=2.0, bevel=2, bevel_amp=-0.5))
            cv.fill(dmg["shape"], dmg["color"])
        elif kind == "scratch":
            cv.fill(dmg["shape"], dmg["color"], opacity=dmg.get("opacity", 0.85))
        elif kind == "stain":
            cv.fill(dmg["shape"], flat(dmg["color"], tex="grass", tex_amp=0.2, tex_scale=2.0, tex_offset=to), opacity=dmg.get("opacity", 0.85), soft=1.0)


# ============================================================================================
# juice_bottle: one bottle, fixed fill level, main label centred with a fruit icon matching the
# juice colour, small label at the bottom.
# ============================================================================================
_JB_JUICES = {
    "orange": (238, 128, 24),
    "cherry": (128, 16, 38),
    "banana": (236, 214, 140),
}
_JB_FILL = 84.0                                  # nominal fill line (for a bottle centred at y = 128)
_JB_LABEL = {"dy": 50.0, "w": 66.0, "h": 58.0}   # label centre = bottle centre + dy
_JB_BOTTOM = {"dy": 98.0, "w": 66.0, "h": 14.0}


def _jb_sample(rng) -> dict:
    cx = 128 + _u(rng, -4, 4)
    cy = 128 + _u(rng, -2, 2)
    juice = ("orange", "cherry", "banana")[int(rng.integers(3))]
    return {
        "bottle": {"cx": cx, "cy": cy},
        "juice": juice,
        "fill_y": _JB_FILL + _u(rng, -2, 2) + (cy - 128),
        "label": {"cx": cx + _u(rng, -1.5, 1.5), "cy": cy + _JB_LABEL["dy"] + _u(rng, -2, 2),
                  "angle": math.radians(_u(rng, -1.5, 1.5)), "icon": juice, "icon_angle": math.radians(_u(rng, -8, 8))},
        "bottom_label": {"cx": cx + _u(rng, -1.5, 1.5), "cy": cy + _JB_BOTTOM["dy"] + _u(rng, -1.5, 1.5),
                         "angle": math.radians(_u(rng, -1.5, 1.5))},
        "cap_color": [_u(rng, 185, 210)] * 3,
        "juice_tint": [_u(rng, 0.9, 1.08), _u(rng, 0.9, 1.08), _u(rng, 0.9, 1.08)],
        "paper": _u(rng, 226, 246),
        "glass": _u(rng, 0.45, 0.65),
        "highlight": _u(rng, -6, 6),
        "damage": [],
    }


def _jb_bottle_shape(b, inset=0.0):
    cx, cy = b["cx"], b["cy"]
    return union(
        rbox(cx, cy - 88, 40 - 2 * inset, 44 - 2 * inset, r=6),
        rbox(cx, cy - 62, 88 - 2 * inset, 30 - 2 * inset, r=14),
        rbox(cx, cy + 24, 110 - 2 * inset, 180 - 2 * inset, r=18),
    )


def _jb_liquid(p, fill_y):
    b = p["bottle"]
    return inter(_jb_bottle_shape(b, 3.0), wave(fill_y, 0.0, 100.0, 0.0, below=True))


def _jb_label_shape(lab):
    return rbox(lab["cx"], lab["cy"], _JB_LABEL["w"], _JB_LABEL["h"], lab["angle"], r=4)


def _jb_bottom_shape(lab):
    return rbox(lab["cx"], lab["cy"], _JB_BOTTOM["w"], _JB_BOTTOM["h"], lab["angle"], r=3)


def _jb_icon_parts(lab) -> list[tuple[dict, object]]:
    cx, cy, a, icon = lab["cx"], lab["cy"], lab["icon_angle"] + lab["angle"], lab["icon"]
    c, s = math.cos(a), math.sin(a)

    def at(dx, dy):
        return cx + c * dx - s * dy, cy + s * dx + c * dy

    parts = []
    if icon == "orange":
        x, y = at(0, 2)
        parts.append((circle(x, y, 15), sphere((246, 142, 26), x, y, 15, spec=0.2, ambient=0.7)))
        for k in range(6):
            ang = a + k * math.pi / 3
            parts.append((capsule([(x, y), (x + 11 * math.cos(ang), y + 11 * math.sin(ang))], 0.7), (255, 205, 130)))
        lx, ly = at(7, -14)
        parts.append((ellipse(lx, ly, 6.5, 3.2, a - 0.5), (70, 150, 45)))
    elif icon == "cherry":
        x1, y1 = at(-8, 7)
        x2, y2 = at(8, 5)
        tx, ty = at(3, -15)
        parts.append((capsule([(x1, y1), at(-3, -5), (tx, ty)], 1.1), (90, 105, 35)))
        parts.append((capsule([(x2, y2), at(5, -5), (tx, ty)], 1.1), (90, 105, 35)))
        parts.append((circle(x1, y1, 8.5), sphere((185, 22, 42), x1, y1, 8.5, spec=0.35, ambient=0.6)))
        parts.append((circle(x2, y2, 8.5), sphere((185, 22, 42), x2, y2, 8.5, spec=0.35, ambient=0.6)))
        lx, ly = at(9, -14)
        parts.append((ellipse(lx, ly, 6.0, 3.0, a + 0.4), (70, 150, 45)))
    else:  # banana
        x, y = at(-2, 3)
        x2, y2 = at(4, -4)
        parts.append((diff(circle(x, y, 16), circle(x2, y2, 15.5)), flat((242, 212, 58), bevel=2.0, bevel_amp=0.3)))
        tx, ty = at(-14, -9)
        parts.append((circle(tx, ty, 2.2), (110, 80, 30)))
    return parts


def _jb_icon_region(lab):
    return dilate(union(*[s for s, _ in _jb_icon_parts(lab)]), 1.5)


def _jb_rules(p: dict) -> list[str]:
    broken = []
    b, lab = p["bottle"], p["label"]
    if lab is not None and lab["icon"] != p["juice"]:
        broken.append("wrong_fruit_icon")
    if abs(p["fill_y"] - (_JB_FILL + b["cy"] - 128)) > 6.0:
        broken.append("wrong_fill_level")
    if lab is None:
        broken.append("missing_label")
    elif (abs(lab["cx"] - b["cx"]) > 5 or abs(lab["cy"] - b["cy"] - _JB_LABEL["dy"]) > 6
          or abs(lab["angle"]) > math.radians(6)):
        broken.append("misplaced_label")
    if p["bottom_label"] is None:
        broken.append("missing_bottom_label")
    return broken


def _jb_logical(p: dict, name: str, rng) -> list[dict]:
    lab = p["label"]
    if name == "wrong_fruit_icon":
        lab["icon"] = [j for j in _JB_JUICES if j != p["juice"]][int(rng.integers(2))]
        return [_jb_icon_region(lab), diff(_jb_liquid(p, p["fill_y"]), dilate(_jb_label_shape(lab), 1.0))]
    if name == "wrong_fill_level":
        nominal = p["fill_y"]
        if rng.uniform() < 0.6:
            p["fill_y"] = nominal + _u(rng, 22, 40)   # too little juice
        else:
            p["fill_y"] = nominal - _u(rng, 16, 26)   # too much juice (up into the shoulder)
        lo, hi = sorted((nominal, p["fill_y"]))
        band = inter(_jb_bottle_shape(p["bottle"], 3.0), wave(lo, 0, 100, 0, True), wave(hi, 0, 100, 0, False))
        return [diff(band, _jb_label_shape(lab))]
    if name == "missing_label":
        p["label"] = None
        return [_jb_label_shape(lab)]
    if name == "misplaced_label":
        mode = int(rng.integers(3))
        if mode == 0:  # sideways, still on the bottle
            lab["cx"] += (1 if rng.uniform() < 0.5 else -1) * _u(rng, 11, 15)
        elif mode == 1:  # too high
            lab["cy"] -= _u(rng, 20, 34)
        else:  # tilted
            lab["angle"] += (1 if rng.uniform() < 0.5 else -1) * math.radians(_u(rng, 12, 18))
        return [_jb_label_shape(lab)]
    if name == "missing_bottom_label":
        gone = p["bottom_label"]
        p["bottom_label"] = None
        return [_jb_bottom_shape(gone)]
    raise KeyError(name)


def _jb_structural(p: dict, name: str, rng) -> list[dict]:
    b, lab = p["bottle"], p["label"]
    if name == "contamination":
        labels = union(_jb_label_shape(lab), _jb_bottom_shape(p["bottom_label"]))
        liquid = _jb_liquid(p, p["fill_y"])

        def sample():
            return {"x": _u(rng, b["cx"] - 42, b["cx"] + 42), "y": _u(rng, p["fill_y"] + 10, b["cy"] + 105)}

        def ok(c):
            x, y = np.float32([c["x"]]), np.float32([c["y"]])
            return sdf(labels, x, y)[0] > 14 and sdf(liquid, x, y)[0] < -12

        c = _place(rng, sample, ok)
        shape = _random_blob(rng, c["x"], c["y"], _u(rng, 8, 11), 0.35)
        color = [[40, 34, 28], [235, 235, 225], [60, 130, 60]][int(rng.integers(3))]
        p["damage"].append({"kind": "dirt", "shape": shape, "color": color})
        return [shape]
    if name == "damaged_label":
        # tear off a piece at the label's edge
        side = int(rng.integers(4))
        w, h = _JB_LABEL["w"] / 2, _JB_LABEL["h"] / 2
        if side < 2:
            dx, dy = (w if side == 0 else -w), _u(rng, -h + 6, h - 6)
        else:
            dx, dy = _u(rng, -w + 6, w - 6), (h if side == 2 else -h)
        c, s = math.cos(lab["angle"]), math.sin(lab["angle"])
        cut = _random_blob(rng, lab["cx"] + c * dx - s * dy, lab["cy"] + s * dx + c * dy, _u(rng, 11, 15), 0.35)
        lab["cut"] = cut
        region = inter(cut, _jb_label_shape(lab))
        p["damage"].append({"kind": "scratch", "shape": capsule(_jb_tear_edge(lab, cut), 0.9), "color": [120, 110, 100], "opacity": 0.6})
        return [region]
    if name == "scratch":
        x0 = _u(rng, b["cx"] - 40, b["cx"] + 10)
        y0 = _u(rng, b["cy"] - 30, b["cy"] + 70)
        ang = _u(rng, -0.9, 0.9)
        pts = _jagged_line(rng, x0, y0, _u(rng, 50, 70), ang, 6, 2.0)
        pts2 = [(x - 4 * math.sin(ang), y + 4 * math.cos(ang)) for x, y in pts[1:-2]]
        shape = union(capsule(pts, 1.4), capsule(pts2, 0.9))
        p["damage"].append({"kind": "scratch", "shape": shape, "color": [245, 245, 240], "opacity": 0.95})
        return [inter(dilate(shape, 2.0), _jb_bottle_shape(b))]
    if name == "damaged_cap":
        cap = rbox(b["cx"], b["cy"] - 112, 48, 18, r=4)
        cut = _random_blob(rng, b["cx"] + _u(rng, -18, 18), b["cy"] - 112 + (-9 if rng.uniform() < 0.5 else 9), _u(rng, 8, 10), 0.3)
        p["cap_cut"] = cut
        p["damage"].append({"kind": "stain", "shape": inter(dilate(cut, 3.0), cap), "color": [70, 60, 55], "opacity": 0.7})
        return [inter(dilate(cut, 3.0), cap)]
    raise KeyError(name)


def _jb_tear_edge(lab, cut):
    # points along the cut boundary inside the label: sample angles of the blob and keep inner points
    pts = []
    label = _jb_label_shape(lab)
    for k in range(24):
        t = 2 * math.pi * k / 24
        radius = cut["r"] * (1 + sum(a * math.cos(kk * t + ph) for kk, a, ph in cut["harmonics"]))
        x, y = cut["cx"] + radius * math.cos(t), cut["cy"] + radius * math.sin(t)
        if sdf(label, np.float32([x]), np.float32([y]))[0] < -0.5:
            pts.append((x, y))
    return pts if len(pts) >= 2 else [(cut["cx"], cut["cy"]), (cut["cx"] + 0.1, cut["cy"])]


def _jb_render(p: dict, cv: Canvas, rng, photo: dict):
    to = photo["tex_offset"]
    b = p["bottle"]
    cv.background(flat((30, 30, 34), tex="brick_smooth", tex_amp=0.25, tex_scale=0.6, tex_offset=to))
    cv.img += (cv.texture("gravel", cv.full, 1.0, to) * 3.0)[..., None]
    bottle = _jb_bottle_shape(b)
    cv.shadow(bottle, (6, 3), 8, 0.4)
    cv.fill(bottle, flat((70, 78, 78), bevel=4, bevel_amp=0.5), opacity=p["glass"])
    juice = _rgb(_JB_JUICES[p["juice"]]) * _rgb(p["juice_tint"])
    cx = b["cx"]

    def liquid_color(cv_, win, d):
        x, _ = cv_.local(win)
        t = np.clip((x - cx) / 54.0, -1, 1)
        prof = np.sqrt(1 - t * t)
        shade = 0.62 + 0.42 * prof + 0.05 * cv_.texture("grass_smooth", win, 1.0, to)
        return juice[None, None, :] * shade[..., None]

    cv.fill(_jb_liquid(p, p["fill_y"]), liquid_color)
    half = 52.0 if p["fill_y"] > b["cy"] - 64 else (41.0 if p["fill_y"] > b["cy"] - 75 else 17.0)
    cv.fill(capsule([(cx - half + 2, p["fill_y"] + 1), (cx + half - 2, p["fill_y"] + 1)], 1.0), (255, 255, 255), opacity=0.35)
    # glass highlights
    hx = p["highlight"]
    cv.fill(rbox(cx - 38 + hx, b["cy"] + 14, 7, 150, r=3.5), (255, 255, 255), opacity=0.22, soft=2.0)
    cv.fill(rbox(cx + 44 + hx / 3, b["cy"] + 14, 3, 150, r=1.5), (255, 255, 255), opacity=0.15, soft=1.5)
    # cap
    cap = rbox(cx, b["cy"] - 112, 48, 18, r=4)
    if p.get("cap_cut"):
        cap = diff(cap, p["cap_cut"])
    cap_base = flat(p["cap_color"], bevel=3, bevel_amp=0.4)

    def cap_color(cv_, win, d):
        ridges = 1 - 0.18 * (0.5 + 0.5 * np.sin(2 * math.pi * (cv_.local(win)[0] - cx) / 3.2))
        return cap_base(cv_, win, d) * ridges[..., None]

    cv.fill(cap, cap_color)
    lab = p["label"]
    if lab is not None:
        shape = _jb_label_shape(lab)
        if lab.get("cut"):
            shape = diff(shape, lab["cut"])
        cv.shadow(shape, (1.5, 1.5), 2.0, 0.3)
        paper = p["paper"]
        cv.fill(shape, flat((paper, paper - 2, paper - 9), tex="grass_smooth", tex_amp=0.03, bevel=2.0, bevel_amp=0.15))
        for part, col in _jb_icon_parts(lab):
            if lab.get("cut"):
                part = diff(part, lab["cut"])
            cv.fill(part, col)
    bl = p["bottom_label"]
    if bl is not None:
        paper = p["paper"]
        cv.fill(_jb_bottom_shape(bl), flat((paper, paper, paper - 6), bevel=1.5, bevel_amp=0.15))
        c, s = math.cos(bl["angle"]), math.sin(bl["angle"])
        for dx, length in ((-17, 15), (2, 17), (21, 10)):
            x, y = bl["cx"] + c * dx, bl["cy"] + s * dx
            cv.fill(rbox(x, y, length, 4.5, bl["angle"], r=1), (60, 60, 70))
    _render_damage(p, cv, to)


# ============================================================================================
# pushpins: a 4 x 3 tray, exactly one pin per compartment, pins anywhere inside it.
# ============================================================================================
_PP_COLS, _PP_ROWS, _PP_WALL = 4, 3, 5.0
_PP_TRAY = {"cx": 128.0, "cy": 128.0, "w": 240.0, "h": 184.0}
_PP_HEAD, _PP_COLLAR = 12.5, 14.5  # pins seen from above: a domed head on a wider collar
_PP_COLOR = (236, 196, 34)


def _pp_compartments() -> list[dict]:
    t = _PP_TRAY
    cw = (t["w"] - (_PP_COLS + 1) * _PP_WALL) / _PP_COLS
    ch = (t["h"] - (_PP_ROWS + 1) * _PP_WALL) / _PP_ROWS
    comps = []
    for r in range(_PP_ROWS):
        for c in range(_PP_COLS):
            x = t["cx"] - t["w"] / 2 + _PP_WALL + c * (cw + _PP_WALL) + cw / 2
            y = t["cy"] - t["h"] / 2 + _PP_WALL + r * (ch + _PP_WALL) + ch / 2
            comps.append({"cx": x, "cy": y, "w": cw, "h": ch, "row": r, "col": c})
    return comps


def _pp_separators() -> list[dict]:
    """Internal walls, each between two compartments (ids ``a``, ``b``)."""
    comps = _pp_compartments()
    seps = []
    for r in range(_PP_ROWS):
        for c in range(_PP_COLS - 1):
            a, b = r * _PP_COLS + c, r * _PP_COLS + c + 1
            seps.append({"a": a, "b": b, "cx": (comps[a]["cx"] + comps[b]["cx"]) / 2, "cy": comps[a]["cy"],
                         "w": _PP_WALL + 2, "h": comps[a]["h"]})
    for r in range(_PP_ROWS - 1):
        for c in range(_PP_COLS):
            a, b = r * _PP_COLS + c, (r + 1) * _PP_COLS + c
            seps.append({"a": a, "b": b, "cx": comps[a]["cx"], "cy": (comps[a]["cy"] + comps[b]["cy"]) / 2,
                         "w": comps[a]["w"], "h": _PP_WALL + 2})
    return seps


def _pp_pin(rng, comp, others=(), color=_PP_COLOR, gap=1.0):
    margin = _PP_COLLAR + 1.5

    def sample():
        cx = _u(rng, comp["cx"] - comp["w"] / 2 + margin, comp["cx"] + comp["w"] / 2 - margin)
        cy = _u(rng, comp["cy"] - comp["h"] / 2 + margin, comp["cy"] + comp["h"] / 2 - margin)
        return {"cx": cx, "cy": cy, "angle": _u(rng, 0, 2 * math.pi), "color": [float(v) for v in color],
                "needle": 0.0, "cut": None}

    def ok(pin):
        tx = pin["cx"] + pin["needle"] * math.cos(pin["angle"])
        ty = pin["cy"] + pin["needle"] * math.sin(pin["angle"])
        inside = abs(tx - comp["cx"]) < comp["w"] / 2 - 2.5 and abs(ty - comp["cy"]) < comp["h"] / 2 - 2.5
        return inside and _no_overlap([(pin["cx"], pin["cy"], _PP_COLLAR)], [(o["cx"], o["cy"], _PP_COLLAR) for o in others], gap)

    return _place(rng, sample, ok, tries=500)


def _pp_footprint(pin):
    tip = (pin["cx"] + pin["needle"] * math.cos(pin["angle"]), pin["cy"] + pin["needle"] * math.sin(pin["angle"]))
    return union(circle(pin["cx"], pin["cy"], _PP_COLLAR + 0.5), capsule([(pin["cx"], pin["cy"]), tip], 2.0))


def _pp_sample(rng) -> dict:
    comps = _pp_compartments()
    pins = [_pp_pin(rng, comp) for comp in comps]
    tint = _u(rng, -6, 6)
    return {
        "pins": pins,
        "missing_separators": [],
        "tray_color": [200 + tint, 205 + tint, 212 + tint],
        "damage": [],
    }


def _pp_comp_of(x, y) -> int | None:
    for i, comp in enumerate(_pp_compartments()):
        if abs(x - comp["cx"]) <= comp["w"] / 2 and abs(y - comp["cy"]) <= comp["h"] / 2:
            return i
    return None


def _pp_rules(p: dict) -> list[str]:
    broken = []
    counts = Counter(_pp_comp_of(pin["cx"], pin["cy"]) for pin in p["pins"])
    n = len(_pp_compartments())
    if any(counts.get(i, 0) == 0 for i in range(n)):
        broken.append("missing_pushpin")
    if any(counts.get(i, 0) > 1 for i in range(n)) or None in counts:
        broken.append("additional_pushpin")
    if p["missing_separators"]:
        broken.append("missing_separator")
    return broken


def _pp_logical(p: dict, name: str, rng) -> list[dict]:
    comps = _pp_compartments()
    if name == "missing_pushpin":
        i = int(rng.integers(len(p["pins"])))
        gone = p["pins"].pop(i)
        comp = comps[_pp_comp_of(gone["cx"], gone["cy"])]
        return [rbox(comp["cx"], comp["cy"], comp["w"] - 2, comp["h"] - 2, r=4)]
    if name == "additional_pushpin":
        i = int(rng.integers(len(comps)))
        comp = comps[i]
        others = [pin for pin in p["pins"] if _pp_comp_of(pin["cx"], pin["cy"]) == i]
        new = _pp_pin(rng, comp, others, gap=-6.0)  # two pins in one compartment may touch
        p["pins"].append(new)
        return [_pp_footprint(new)]
    if name == "missing_separator":
        seps = _pp_separators()
        j = int(rng.integers(len(seps)))
        p["missing_separators"].append(j)
        s = seps[j]
        return [rbox(s["cx"], s["cy"], s["w"], s["h"])]
    raise KeyError(name)


def _pp_structural(p: dict, name: str, rng) -> list[dict]:
    if name == "broken_pushpin":
        pin = p["pins"][int(rng.integers(len(p["pins"])))]
        a = _u(rng, 0, 2 * math.pi)
        pin["cut"] = _random_blob(rng, pin["cx"] + 9 * math.cos(a), pin["cy"] + 9 * math.sin(a), _u(rng, 11, 13), 0.3)
        pin["angle"] = a  # the needle is bared where the head broke off
        pin["needle"] = _u(rng, 20, 26)
        b = a + math.pi + _u(rng, -1.0, 1.0)
        shard = _random_blob(rng, pin["cx"] + 21 * math.cos(b), pin["cy"] + 21 * math.sin(b), _u(rng, 5.5, 7), 0.35)
        p["damage"].append({"kind": "plastic", "shape": shard, "color": [c * 0.9 for c in pin["color"]]})
        return [union(_pp_footprint(pin), dilate(shard, 1.0))]
    if name == "color":
        pin = p["pins"][int(rng.integers(len(p["pins"])))]
        pin["color"] = [[50, 100, 230], [210, 50, 160], [50, 170, 70], [215, 40, 40]][int(rng.integers(4))]
        return [_pp_footprint(pin)]
    if name == "contamination":
        comp = _pp_compartments()[int(rng.integers(len(p["pins"])))]
        pins = [(q["cx"], q["cy"], _PP_COLLAR) for q in p["pins"]]

        def sample():
            return {"x": _u(rng, comp["cx"] - comp["w"] / 2 + 11, comp["cx"] + comp["w"] / 2 - 11),
                    "y": _u(rng, comp["cy"] - comp["h"] / 2 + 11, comp["cy"] + comp["h"] / 2 - 11)}

        try:
            c = _place(rng, sample, lambda c: _no_overlap([(c["x"], c["y"], 8)], pins), tries=200)
        except _Retry:
            c = sample()
        if rng.uniform() < 0.6:
            shape = _random_blob(rng, c["x"], c["y"], _u(rng, 8, 10.5), 0.35)
            p["damage"].append({"kind": "dirt", "shape": shape, "color": [[70, 52, 40], [40, 40, 44], [150, 60, 40]][int(rng.integers(3))]})
        else:
            pts = _bezier((c["x"] - 16, c["y"] + _u(rng, -6, 6)), (c["x"] - 5, c["y"] + _u(rng, -20, 20)),
                          (c["x"] + 5, c["y"] + _u(rng, -20, 20)), (c["x"] + 16, c["y"] + _u(rng, -6, 6)), 10)
            shape = capsule(pts, 2.0)
            p["damage"].append({"kind": "hair", "shape": shape, "color": [40, 50, 120]})
            shape = dilate(shape, 1.5)
        return [shape]
    raise KeyError(name)


def _pp_render(p: dict, cv: Canvas, rng, photo: dict):
    to = photo["tex_offset"]
    cv.background(flat((58, 58, 62), tex="gravel", tex_amp=0.18, tex_scale=0.8, tex_offset=to))
    t = _PP_TRAY
    tray = rbox(t["cx"], t["cy"], t["w"], t["h"], r=8)
    cv.shadow(tray, (4, 5), 6, 0.5)
    tc = p["tray_color"]
    cv.fill(tray, flat(tc, tex="brick_smooth", tex_amp=0.03, tex_offset=to, bevel=4, bevel_amp=0.35))
    comps = _pp_compartments()
    seps = _pp_separators()
    # union-find of compartments joined by missing separators
    parent = list(range(len(comps)))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for j in p["missing_separators"]:
        parent[find(seps[j]["a"])] = find(seps[j]["b"])
    floors: dict[int, list[dict]] = {}
    for i, comp in enumerate(comps):
        floors.setdefault(find(i), []).append(rbox(comp["cx"], comp["cy"], comp["w"], comp["h"], r=4))
    for j in p["missing_separators"]:
        s = seps[j]
        floors[find(s["a"])].append(rbox(s["cx"], s["cy"], s["w"] + 2, s["h"]))
    floor_col = [c * 0.86 for c in tc]
    for members in floors.values():
        cv.fill(union(*members), flat(floor_col, tex="grass_smooth", tex_amp=0.04, tex_offset=to, inner_shadow=0.32, inner_width=7))
    for pin in p["pins"]:
        foot = circle(pin["cx"], pin["cy"], _PP_COLLAR)
        tip = (pin["cx"] + pin["needle"] * math.cos(pin["angle"]), pin["cy"] + pin["needle"] * math.sin(pin["angle"]))
        needle = capsule([(pin["cx"], pin["cy"]), tip], 1.5)
        cv.shadow(union(foot, needle), (2.5, 3.0), 3.5, 0.45)
        if pin["needle"] > 0.5:
            cv.fill(needle, tube((200, 200, 206), 1.5, spec=0.4))
        col = pin["color"]
        collar, head = foot, circle(pin["cx"], pin["cy"], _PP_HEAD)
        if pin["cut"]:
            collar, head = diff(collar, pin["cut"]), diff(head, pin["cut"])
        cv.fill(collar, flat([c * 0.78 for c in col], bevel=2.0, bevel_amp=0.4))
        cv.fill(head, sphere(col, pin["cx"], pin["cy"], _PP_HEAD * 1.15, spec=0.45, ambient=0.5))
        if pin["cut"]:
            cv.fill(inter(dilate(pin["cut"], 1.2), diff(foot, pin["cut"])), [c * 0.45 for c in col])
    _render_damage(p, cv, to)


# ============================================================================================
# screw_bag: 2 washers, 2 nuts, 1 long and 2 short screws at random places in a clear bag.
# ============================================================================================
_SB_COUNTS = {"washer": 2, "nut": 2, "long_screw": 1, "short_screw": 2}
_SB_LENGTH = {"long_screw": 104.0, "short_screw": 62.0}
_SB_AREA = (34.0, 66.0, 222.0, 224.0)  # where part centres may lie


def _sb_circles(part) -> list[tuple[float, float, float]]:
    kind = part["kind"]
    if kind in ("washer", "nut"):
        return [(part["cx"], part["cy"], 16.0)]
    length = _SB_LENGTH[kind]
    ux, uy = math.cos(part["angle"]), math.sin(part["angle"])
    out = []
    n = int(length // 10) + 1
    for i in range(n + 1):
        s = -length / 2 + length * i / n
        out.append((part["cx"] + s * ux, part["cy"] + s * uy, 10.0 if i == 0 else 6.0))
    return out


def _sb_geometry(part):
    """Shapes of a part: list of (shape, role)."""
    kind = part["kind"]
    cx, cy, a = part["cx"], part["cy"], part["angle"]
    if kind == "washer":
        return [(ring(cx, cy, 15.5, 6.5), "washer")]
    if kind == "nut":
        return [(diff(hexagon(cx, cy, 15.0, a), circle(cx, cy, 6.2)), "nut")]
    length = _SB_LENGTH[kind]
    ux, uy = math.cos(a), math.sin(a)
    hx, hy = cx - length / 2 * ux, cy - length / 2 * uy
    bend = part.get("bend", 0.0)
    mid = length * 0.55
    p1 = (hx + 10 * ux, hy + 10 * uy)
    if bend:
        p2 = (hx + mid * ux, hy + mid * uy)
        b2 = a + bend
        p3 = (p2[0] + (length - mid) * math.cos(b2), p2[1] + (length - mid) * math.sin(b2))
        shaft = capsule([p1, p2, p3], 4.6)
    else:
        shaft = capsule([p1, (cx + length / 2 * ux, cy + length / 2 * uy)], 4.6)
    head = rbox(hx + 4 * ux, hy + 4 * uy, 10, 21, a, r=3)
    return [(shaft, "shaft"), (head, "head")]


def _sb_footprint(part):
    return dilate(union(*[s for s, _ in _sb_geometry(part)]), 1.0)


def _sb_part(rng, kind, parts, centre=None):
    others = [c for q in parts for c in _sb_circles(q)]

    def sample():
        if centre is None:
            cx, cy = _u(rng, _SB_AREA[0], _SB_AREA[2]), _u(rng, _SB_AREA[1], _SB_AREA[3])
        else:
            cx, cy = centre
        return {"kind": kind, "cx": cx, "cy": cy, "angle": _u(rng, 0, 2 * math.pi), "rust": False}

    def ok(part):
        circles = _sb_circles(part)
        inside = all(14 <= x <= 242 and 56 <= y <= 236 for x, y, _ in circles)
        return inside and _no_overlap(circles, others, 1.0)

    return _place(rng, sample, ok, tries=600)


def _sb_sample(rng) -> dict:
    parts: list[dict] = []
    for kind in ("long_screw", "short_screw", "short_screw", "nut", "nut", "washer", "washer"):
        parts.append(_sb_part(rng, kind, parts))
    order = rng.permutation(len(parts))
    return {
        "parts": [parts[i] for i in order],
        "bag": {"cx": 128 + _u(rng, -3, 3), "cy": 140 + _u(rng, -3, 3), "angle": math.radians(_u(rng, -2, 2))},
        "holes": [],
        "damage": [],
    }


def _sb_rules(p: dict) -> list[str]:
    counts = Counter(part["kind"] for part in p["parts"])
    total, expected = sum(counts.values()), sum(_SB_COUNTS.values())
    if total < expected:
        return ["missing_part"]
    if total > expected:
        return ["additional_part"]
    if dict(counts) != _SB_COUNTS:
        if counts["long_screw"] + counts["short_screw"] == 3 and counts["washer"] == 2 and counts["nut"] == 2:
            return ["wrong_screw_length"]
        return ["wrong_part_mix"]
    return []


def _sb_logical(p: dict, name: str, rng) -> list[dict]:
    parts = p["parts"]
    if name == "missing_part":
        gone = parts.pop(int(rng.integers(len(parts))))
        return [_sb_footprint(gone)]
    if name == "additional_part":
        kind = ("washer", "nut", "short_screw", "long_screw")[int(rng.integers(4))]
        new = _sb_part(rng, kind, parts)
        parts.insert(int(rng.integers(len(parts) + 1)), new)
        return [_sb_footprint(new)]
    if name == "wrong_screw_length":
        screws = [i for i, q in enumerate(parts) if q["kind"].endswith("screw")]
        i = screws[int(rng.integers(len(screws)))]
        old = parts.pop(i)
        kind = "short_screw" if old["kind"] == "long_screw" else "long_screw"
        try:
            new = _sb_part(rng, kind, parts, centre=(old["cx"], old["cy"]))
        except _Retry:
            new = _sb_part(rng, kind, parts)
        parts.insert(i, new)
        return [_sb_footprint(new)]
    raise KeyError(name)


def _sb_structural(p: dict, name: str, rng) -> list[dict]:
    parts = p["parts"]
    if name == "broken_screw":
        screws = [q for q in parts if q["kind"].endswith("screw")]
        part = screws[int(rng.integers(len(screws)))]
        part["bend"] = (1 if rng.uniform() < 0.5 else -1) * math.radians(_u(rng, 35, 55))
        return [_sb_footprint(part)]
    if name == "color":
        part = parts[int(rng.integers(len(parts)))]
        part["rust"] = True
        return [_sb_footprint(part)]
    occupied = [c for q in parts for c in _sb_circles(q)]

    def sample():
        return {"x": _u(rng, 30, 226), "y": _u(rng, 64, 226)}

    try:
        c = _place(rng, sample, lambda c: _no_overlap([(c["x"], c["y"], 14)], occupied), tries=300)
    except _Retry:
        c = sample()
    if name == "bag_broken":
        hole = _random_blob(rng, c["x"], c["y"], _u(rng, 10, 14), 0.35)
        p["holes"].append(hole)
        return [hole]
    if name == "contamination":
        shape = _random_blob(rng, c["x"], c["y"], _u(rng, 6.5, 9.5), 0.35)
        p["damage"].append({"kind": "dirt", "shape": shape, "color": [[70, 52, 40], [35, 35, 40], [40, 100, 190]][int(rng.integers(3))]})
        return [shape]
    raise KeyError(name)


def _sb_render(p: dict, cv: Canvas, rng, photo: dict):
    to = photo["tex_offset"]
    cv.background(flat((196, 196, 192), tex="gravel_smooth", tex_amp=0.04, tex_offset=to))
    cv.img += (cv.texture("grass", cv.full, 0.7, to) * 2.5)[..., None]
    b = p["bag"]
    bag = rbox(b["cx"], b["cy"], 238, 212, b["angle"], r=14)
    cv.shadow(bag, (3, 4), 6, 0.25)
    inner_bag = bag
    for hole in p["holes"]:
        inner_bag = diff(inner_bag, hole)
    cv.fill(inner_bag, flat((218, 222, 226), tex="grass_smooth", tex_amp=0.06, tex_scale=0.6, tex_offset=to, bevel=5, bevel_amp=0.5))
    for hole in p["holes"]:
        cv.fill(hole, flat((150, 150, 150), tex="gravel_smooth", tex_amp=0.05, inner_shadow=0.3, inner_width=4))
        cv.fill(diff(dilate(hole, 2.2), hole), (250, 250, 250), opacity=0.9)
    c, s = math.cos(b["angle"]), math.sin(b["angle"])
    seal_y = -106 + 9
    seal = rbox(b["cx"] - s * seal_y, b["cy"] + c * seal_y, 236, 16, b["angle"], r=3)
    cv.fill(seal, lambda cv_, win, d: (np.float32([205, 208, 212])[None, None, :]
                                       * (0.85 + 0.15 * np.sin(2 * math.pi * cv_.local(win)[0] / 3.0))[..., None]))
    metal = {"washer": (182, 185, 190), "nut": (150, 152, 160), "long_screw": (168, 168, 174), "short_screw": (168, 168, 174)}
    for part in p["parts"]:
        base = metal[part["kind"]]
        geometry = _sb_geometry(part)
        cv.shadow(union(*[g for g, _ in geometry]), (2.5, 3.5), 3.5, 0.4)
        for shape, role in geometry:
            if role == "shaft":
                a = part["angle"]
                pts = shape["points"]
                color = tube(base, 4.6, spec=0.35, stripes=(pts[0][0], pts[0][1], math.cos(a), math.sin(a), 3.4, 0.35))
            elif role == "washer":
                color = flat(base, tex="gravel", tex_amp=0.05, tex_scale=2.5, bevel=3.5, bevel_amp=0.6)
            else:
                color = flat(base, tex="gravel", tex_amp=0.05, tex_scale=2.5, bevel=3.0, bevel_amp=0.55)
            cv.fill(shape, color)
            if part.get("rust"):
                def rust(cv_, win, d, _base=base):
                    n = cv_.texture("grass_smooth", win, 2.0, to)
                    return _rgb((150, 78, 36))[None, None, :] * (0.8 + 0.2 * n[..., None])
                cv.fill(shape, rust, opacity=0.8)
    # the film on top of the parts
    cv.fill(inner_bag, flat((235, 238, 242), tex="grass_smooth", tex_amp=0.2, tex_scale=0.5, tex_offset=(to[1], to[0])), opacity=0.12)
    _render_damage(p, cv, to)


# ============================================================================================
# splicing_connectors: two connectors with equal slot counts, one cable between the same slot on
# both sides; cable colour bound to the slot count (2 yellow, 3 blue, 5 red).
# ============================================================================================
_SC_COLORS = {"yellow": (236, 200, 40), "blue": (40, 92, 205), "red": (205, 42, 40)}
_SC_COLOR_OF = {2: "yellow", 3: "blue", 5: "red"}
_SC_SLOT = 20.0
_SC_WIDTH = 40.0


def _sc_connector(side: str, rng, n: int) -> dict:
    cx = (44.0 if side == "left" else 212.0) + _u(rng, -5, 5)
    return {"cx": cx, "cy": 128 + _u(rng, -12, 12), "angle": math.radians(_u(rng, -6, 6)), "n": n, "side": side,
            "lever_colors": [list(_SC_LEVER) for _ in range(n)], "cut": None}


_SC_LEVER = (232, 122, 32)


def _sc_local(conn, lx, ly):
    c, s = math.cos(conn["angle"]), math.sin(conn["angle"])
    return conn["cx"] + c * lx - s * ly, conn["cy"] + s * lx + c * ly


def _sc_body(conn):
    return rbox(conn["cx"], conn["cy"], _SC_WIDTH, conn["n"] * _SC_SLOT + 10, conn["angle"], r=5)


def _sc_slot_y(conn, i):
    return -(conn["n"] * _SC_SLOT) / 2 + _SC_SLOT * (i + 0.5)


def _sc_hole(conn, i):
    inner = 10.0 if conn["side"] == "left" else -10.0
    return _sc_local(conn, inner, _sc_slot_y(conn, i))


def _sc_lever(conn, i):
    outer = -7.0 if conn["side"] == "left" else 7.0
    x, y = _sc_local(conn, outer, _sc_slot_y(conn, i))
    return rbox(x, y, 20, 13, conn["angle"], r=3)


def _sc_cable(rng, left, right, k_left, k_right, color) -> dict:
    p0, p3 = _sc_hole(left, k_left), _sc_hole(right, k_right)
    for _ in range(200):
        d1, d2 = _u(rng, -60, 60), _u(rng, -60, 60)
        pts = _bezier(p0, (p0[0] + _u(rng, 40, 70), p0[1] + d1), (p3[0] - _u(rng, 40, 70), p3[1] + d2), p3, 28)
        if all(14 <= y <= 242 for _, y in pts):
            return {"slot_left": k_left, "slot_right": k_right, "color": color, "points": [list(q) for q in pts],
                    "gap": None}
    raise _Retry()


def _sc_cable_shape(cable):
    return capsule(cable["points"], 4.6)


def _sc_sample(rng) -> dict:
    n = (2, 3, 5)[int(rng.integers(3))]
    left, right = _sc_connector("left", rng, n), _sc_connector("right", rng, n)
    k = int(rng.integers(n))
    return {"left": left, "right": right, "cables": [_sc_cable(rng, left, right, k, k, _SC_COLOR_OF[n])], "damage": []}


def _sc_rules(p: dict) -> list[str]:
    broken = []
    left, right = p["left"], p["right"]
    if left["n"] != right["n"]:
        broken.append("unequal_slot_count")
    if not p["cables"]:
        broken.append("missing_cable")
    elif len(p["cables"]) > 1:
        broken.append("extra_cable")
    for cable in p["cables"][:1]:
        if left["n"] == right["n"] and cable["color"] != _SC_COLOR_OF[left["n"]]:
            broken.append("wrong_cable_color")
        if cable["slot_left"] != cable["slot_right"]:
            broken.append("wrong_cable_slot")
    return broken


def _sc_logical(p: dict, name: str, rng) -> list[dict]:
    left, right = p["left"], p["right"]
    cable = p["cables"][0]
    if name == "wrong_cable_color":
        cable["color"] = [c for c in _SC_COLORS if c != cable["color"]][int(rng.integers(2))]
        return [_sc_cable_shape(cable), _sc_body(left), _sc_body(right)]
    if name == "unequal_slot_count":
        conn = left if rng.uniform() < 0.5 else right
        conn["n"] = [m for m in (2, 3, 5) if m != conn["n"]][int(rng.integers(2))]
        conn["lever_colors"] = [list(_SC_LEVER) for _ in range(conn["n"])]
        k = min(cable["slot_left"], min(left["n"], right["n"]) - 1)
        p["cables"] = [_sc_cable(rng, left, right, k, k, cable["color"])]
        return [_sc_body(conn)]
    if name == "missing_cable":
        p["cables"] = []
        return [_sc_cable_shape(cable)]
    if name == "wrong_cable_slot":
        n = left["n"]
        k2 = [m for m in range(n) if m != cable["slot_left"]][int(rng.integers(n - 1))]
        if rng.uniform() < 0.5:
            new = _sc_cable(rng, left, right, cable["slot_left"], k2, cable["color"])
        else:
            new = _sc_cable(rng, left, right, k2, cable["slot_left"], cable["color"])
        p["cables"] = [new]
        return [_sc_cable_shape(new)]
    if name == "extra_cable":
        n = left["n"]
        k2 = [m for m in range(n) if m != cable["slot_left"]][int(rng.integers(n - 1))]
        new = _sc_cable(rng, left, right, k2, k2, cable["color"])
        p["cables"].append(new)
        return [_sc_cable_shape(new)]
    raise KeyError(name)


def _sc_structural(p: dict, name: str, rng) -> list[dict]:
    left, right = p["left"], p["right"]
    if name == "broken_cable":
        cable = p["cables"][0]
        n = len(cable["points"])
        i = int(rng.integers(int(n * 0.3), int(n * 0.7)))
        cable["gap"] = [i, i + 2]
        a, b = cable["points"][i], cable["points"][i + 2]
        strands = []
        for _ in range(4):
            o1, o2 = _u(rng, -3, 3), _u(rng, -3, 3)
            mid = ((a[0] + b[0]) / 2 + _u(rng, -3, 3), (a[1] + b[1]) / 2 + _u(rng, -3, 3))
            strands.append([[a[0] + o1, a[1] + o2], list(mid), [b[0] + o2, b[1] + o1]])
        p["damage"].append({"kind": "strands", "strands": strands, "color": [205, 125, 62]})
        return [dilate(capsule([a, b], 4.6), 3.0)]
    if name == "broken_connector":
        conn = left if rng.uniform() < 0.5 else right
        h = conn["n"] * _SC_SLOT / 2 + 5
        lx = _u(rng, -20, 20)
        ly = (-h if rng.uniform() < 0.5 else h) if abs(lx) < 14 else _u(rng, -h + 6, h - 6)
        if abs(lx) >= 14:
            lx = 20.0 if lx > 0 else -20.0
        x, y = _sc_local(conn, lx, ly)
        conn["cut"] = _random_blob(rng, x, y, _u(rng, 11, 14), 0.3)
        ang = math.atan2(conn["cy"] - y, conn["cx"] - x) + _u(rng, -0.5, 0.5)
        crack = capsule(_jagged_line(rng, x, y, _u(rng, 22, 30), ang, 5, 2.5), 1.2)
        p["damage"].append({"kind": "scratch", "shape": inter(crack, _sc_body(conn)), "color": [70, 66, 62], "opacity": 0.9})
        return [inter(union(dilate(conn["cut"], 1.0), dilate(crack, 1.5)), _sc_body(conn))]
    if name == "color":
        conn = left if rng.uniform() < 0.5 else right
        i = int(rng.integers(conn["n"]))
        conn["lever_colors"][i] = [[60, 165, 75], [150, 60, 175], [70, 70, 80]][int(rng.integers(3))]
        return [dilate(_sc_lever(conn, i), 1.0)]
    if name == "contamination":
        x, y = _u(rng, 80, 176), _u(rng, 30, 226)
        shape = _random_blob(rng, x, y, _u(rng, 6.5, 9.5), 0.35)
        p["damage"].append({"kind": "dirt", "shape": shape, "color": [[70, 52, 40], [35, 35, 40], [120, 160, 60]][int(rng.integers(3))]})
        return [shape]
    raise KeyError(name)


def _sc_render(p: dict, cv: Canvas, rng, photo: dict):
    to = photo["tex_offset"]
    cv.background(flat((212, 214, 208), tex="grass_smooth", tex_amp=0.03, tex_offset=to))
    cv.img += (cv.texture("gravel", cv.full, 0.8, to) * 3.0)[..., None]
    for conn in (p["left"], p["right"]):
        body = _sc_body(conn)
        cv.shadow(body, (3, 4), 5, 0.45)
        shape = diff(body, conn["cut"]) if conn["cut"] else body
        cv.fill(shape, flat((226, 226, 222), tex="gravel_smooth", tex_amp=0.02, bevel=4, bevel_amp=0.35))
        for i in range(conn["n"]):
            lever = _sc_lever(conn, i)
            if conn["cut"]:
                lever = diff(lever, conn["cut"])
            cv.fill(lever, flat(conn["lever_colors"][i], bevel=2.5, bevel_amp=0.45))
            hx, hy = _sc_hole(conn, i)
            hole = circle(hx, hy, 4.5)
            if conn["cut"]:
                hole = diff(hole, conn["cut"])
            cv.fill(hole, (45, 45, 48))
            if i > 0:
                gy = -(conn["n"] * _SC_SLOT) / 2 + _SC_SLOT * i
                groove = capsule([_sc_local(conn, -18, gy), _sc_local(conn, 18, gy)], 0.6)
                if conn["cut"]:
                    groove = diff(groove, conn["cut"])
                cv.fill(groove, (170, 170, 168))
        if conn["cut"]:  # the broken-off part leaves a dark cavity with a light, jagged rim
            cv.fill(inter(conn["cut"], dilate(body, -3.0)), flat((62, 60, 58), tex="gravel", tex_amp=0.25, tex_scale=2.0))
            cv.fill(inter(dilate(conn["cut"], 1.5), diff(body, conn["cut"])), (150, 148, 144))
    for cable in p["cables"]:
        pts = cable["points"]
        pieces = [pts] if not cable["gap"] else [pts[: cable["gap"][0] + 1], pts[cable["gap"][1]:]]
        base = _SC_COLORS[cable["color"]]
        for piece in pieces:
            shape = capsule(piece, 4.6)
            cv.shadow(shape, (2.5, 3.5), 3.5, 0.4)
            cv.fill(shape, tube(base, 4.6, spec=0.3))
    for dmg in p["damage"]:
        if dmg["kind"] == "strands":
            for strand in dmg["strands"]:
                cv.fill(capsule(strand, 0.8), tube(dmg["color"], 0.8, spec=0.5))
    _render_damage({"damage": [d for d in p["damage"] if d["kind"] != "strands"]}, cv, to)


# --------------------------------------------------------------------------------------------
# Category registry, scenes, rendering
# --------------------------------------------------------------------------------------------
_CATEGORY_FUNCS = {
    "breakfast_box": (_bb_sample, _bb_logical, _bb_structural, _bb_rules, _bb_render),
    "juice_bottle": (_jb_sample, _jb_logical, _jb_structural, _jb_rules, _jb_render),
    "pushpins": (_pp_sample, _pp_logical, _pp_structural, _pp_rules, _pp_render),
    "screw_bag": (_sb_sample, _sb_logical, _sb_structural, _sb_rules, _sb_render),
    "splicing_connectors": (_sc_sample, _sc_logical, _sc_structural, _sc_rules, _sc_render),
}


def check_scene_rules(scene: dict) -> list[str]:
    """Names of the logical rules a scene description breaks (empty for good and structural scenes)."""
    return _CATEGORY_FUNCS[scene["category"]][3](scene["params"])


def image_seed(seed: int, category: str, split: str, index: int) -> np.random.SeedSequence:
    """The seed sequence of one image: ``(seed, category, split, index)``."""
    split_id = {key: sid for key, _, sid in _SPLIT_FOLDERS}[split]
    return np.random.SeedSequence([int(seed), CATEGORIES.index(category), split_id, int(index)])


def make_scene(category: str, split: str, index: int, seed: int = 0, defect: str | None = None) -> dict:
    """Sample the scene description of one image.

    ``split`` is one of ``train``, ``validation``, ``good``, ``logical``, ``structural``; for the
    two anomalous splits ``defect`` picks the defect type (default: cycles through the types).
    """
    _check_category(category)
    sample, logical, structural, rules, _ = _CATEGORY_FUNCS[category]
    rng = np.random.default_rng(image_seed(seed, category, split, index))
    kind = "logical" if split == "logical" else "structural" if split == "structural" else "good"
    if kind != "good" and defect is None:
        names = defect_types(category, kind)
        defect = names[index % len(names)]
    for _attempt in range(50):
        try:
            params = sample(rng)
            regions: list[dict] = []
            if kind == "logical":
                regions = logical(params, defect, rng)
            elif kind == "structural":
                regions = structural(params, defect, rng)
        except _Retry:
            continue
        broken = rules(params)
        expected = [defect] if kind == "logical" else []
        if broken != expected:  # the description is the source of truth: re-sample if it disagrees
            continue
        break
    else:  # pragma: no cover - would be a generator bug
        raise RuntimeError(f"could not sample a valid {category}/{split}/{index} scene")
    photo = _photo(rng, angle_deg=6.0 if category == "screw_bag" else 3.0)
    return {
        "category": category,
        "split": split,
        "index": int(index),
        "anomaly_type": kind,
        "defect": defect,
        "regions": regions,
        "params": params,
        "photo": photo,
    }


def render_scene(scene: dict, image_size: int = 256) -> tuple[np.ndarray, list[np.ndarray]]:
    """Render a scene description: ``(image uint8 (S, S, 3), [bool masks (S, S), one per region])``."""
    photo = scene["photo"]
    cv = Canvas(image_size, photo["angle"], photo["scale"], photo["shift"], photo["light"])
    rng = np.random.default_rng(photo["render_seed"])
    _CATEGORY_FUNCS[scene["category"]][4](scene["params"], cv, rng, photo)
    image = _finish(cv, rng, photo)
    masks = [cv.mask(region) for region in scene["regions"]]
    return image, masks


# --------------------------------------------------------------------------------------------
# Writing the benchmark
# --------------------------------------------------------------------------------------------

def _plain(obj):
    """JSON-ready copy (full float precision, so ``render_scene`` reproduces the image exactly)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, **PNG_OPTIONS)


def _task(args) -> tuple[str, dict]:
    out_dir, category, split, folder, index, seed, image_size = args
    scene = make_scene(category, split, index, seed)
    image, masks = render_scene(scene, image_size)
    stem = f"{index:03d}"
    cat_dir = Path(out_dir) / category
    _save_png(image, cat_dir / folder / f"{stem}.png")
    mask_files = []
    if scene["anomaly_type"] != "good":
        value = _pixel_value(category, scene["defect"])
        gt_dir = cat_dir / "ground_truth" / folder.split("/")[-1] / stem
        gt_dir.mkdir(parents=True, exist_ok=True)
        kept = [m for m in masks if m.any()]
        if not kept:  # pragma: no cover - guarded by construction
            raise RuntimeError(f"empty ground truth for {category}/{folder}/{stem}")
        for j, m in enumerate(kept):
            _save_png((m.astype(np.uint8) * value), gt_dir / f"{j:03d}.png")
            mask_files.append(f"ground_truth/{folder.split('/')[-1]}/{stem}/{j:03d}.png")
    rel = f"{folder}/{stem}.png"
    record = {"scene": _plain(scene), "masks": mask_files}
    return f"{category}/{rel}", record


def _prepare_category_dir(cat_dir: Path) -> None:
    if cat_dir.exists():
        if not (cat_dir / MARKER_FILE).exists() and any(cat_dir.iterdir()):
            raise FileExistsError(f"{cat_dir} exists and was not written by synthloco; refusing to overwrite it")
        shutil.rmtree(cat_dir)
    for _, folder, _ in _SPLIT_FOLDERS:
        (cat_dir / folder).mkdir(parents=True, exist_ok=True)
    (cat_dir / "ground_truth" / "logical_anomalies").mkdir(parents=True, exist_ok=True)
    (cat_dir / "ground_truth" / "structural_anomalies").mkdir(parents=True, exist_ok=True)


_README = """synthloco: a generated benchmark in the MVTec LOCO AD layout (ladmim_hf.data.synthetic).

Categories: {categories}. Each category folder holds train/good, validation/good, test/good,
test/logical_anomalies, test/structural_anomalies, ground_truth/<type>/<image>/000.png (single-channel
masks whose grey value encodes the defect type, see defects_config.json) and scenes.json (the scene
description each image was rendered from).

Generated with seed={seed}, image_size={image_size}, counts={counts}.
Textures: scikit-image's brick, grass and gravel images (CC0). Everything else is procedural.
"""


def generate_synthloco(out_dir, seed: int = 0, small: bool = False, categories: Sequence[str] | None = None,
                       image_size: int = 256, counts: dict | None = None, workers: int | None = None,
                       progress: bool = False) -> Path:
    """Write the synthloco benchmark to ``out_dir`` and return the path.

    Args:
        out_dir: dataset root; one folder per category is (re)created in it. A category folder that
            exists but was not written by synthloco is never deleted (``FileExistsError``).
        seed: global seed; each image gets its own generator from ``(seed, category, split, index)``,
            so the output is byte-identical for a seed whatever the number of workers.
        small: tiny sizes for tests (8 train, 4 validation, 3 per test type).
        categories: subset of :data:`CATEGORIES` (default: all five).
        image_size: side of the square images and masks in pixels.
        counts: override the number of images per split (keys ``train``, ``validation``, ``good``,
            ``logical``, ``structural``).
        workers: processes to use (default: CPU count, at most 8; 1 = in-process).
        progress: show a tqdm progress bar.
    """
    out = Path(out_dir)
    categories = list(CATEGORIES if categories in (None, "all", ["all"]) else categories)
    for category in categories:
        _check_category(category)
    sizes = dict(SMALL_COUNTS if small else DEFAULT_COUNTS)
    if counts:
        unknown = set(counts) - set(sizes)
        if unknown:
            raise ValueError(f"unknown split names in counts: {sorted(unknown)}; use {sorted(sizes)}")
        sizes.update({k: int(v) for k, v in counts.items()})
    image_size = int(image_size)
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    out.mkdir(parents=True, exist_ok=True)
    tasks = []
    for category in categories:
        _prepare_category_dir(out / category)
        for key, folder, _ in _SPLIT_FOLDERS:
            for index in range(sizes[key]):
                tasks.append((str(out), category, key, folder, index, int(seed), image_size))
    if workers is None:
        workers = min(os.cpu_count() or 1, 8)
    workers = max(1, min(int(workers), len(tasks) // 16 + 1))
    records: dict[str, dict] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tasks), desc="synthloco", unit="img")
    if workers == 1:
        results: Iterable = map(_task, tasks)
        pool = None
    else:
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
        if ctx.get_start_method() == "fork":
            _textures()  # loaded once here, inherited by the forked workers
        pool = ctx.Pool(workers, initializer=_textures)
        results = pool.imap_unordered(_task, tasks, chunksize=4)
    try:
        for key, record in results:
            records[key] = record
            if bar is not None:
                bar.update(1)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        if bar is not None:
            bar.close()
    for category in categories:
        cat_dir = out / category
        with open(cat_dir / "defects_config.json", "w") as handle:
            json.dump(defects_config(category, image_size), handle, indent=2)
            handle.write("\n")
        scenes = {k[len(category) + 1:]: v for k, v in sorted(records.items()) if k.startswith(category + "/")}
        with open(cat_dir / "scenes.json", "w") as handle:
            json.dump(scenes, handle, sort_keys=True, separators=(",", ":"))
        with open(cat_dir / MARKER_FILE, "w") as handle:
            json.dump({"generator": "ladmim_hf.data.synthetic", "seed": int(seed), "image_size": image_size,
                       "counts": sizes, "rules_version": 1}, handle, indent=2, sort_keys=True)
            handle.write("\n")
    with open(out / "readme.txt", "w") as handle:
        handle.write(_README.format(categories=", ".join(categories), seed=seed, image_size=image_size, counts=sizes))
    return out


def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    """The generator's options, shared by `python -m ladmim_hf.data.synthetic` and `ladmim synth`."""
    parser.add_argument("--out", default="data/synthloco", help="output root (default: data/synthloco)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="tiny sizes for tests (8/4/3+3+3 per category)")
    parser.add_argument("--categories", nargs="+", default=None, help=f"subset of {' '.join(CATEGORIES)} (default: all)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPU count, max 8)")
    parser.add_argument("--no-progress", action="store_true")


def run_from_args(args: argparse.Namespace) -> int:
    categories = args.categories
    if categories:
        categories = [c for item in categories for c in item.split(",") if c]
        if categories == ["all"]:
            categories = None
    start = time.perf_counter()
    try:
        out = generate_synthloco(args.out, seed=args.seed, small=args.small, categories=categories,
                                 image_size=args.image_size, workers=args.workers, progress=not args.no_progress)
    except (ValueError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the synthloco benchmark (MVTec LOCO AD layout).")
    add_synth_arguments(parser)
    return run_from_args(parser.parse_args(argv))

if __name__ == "__main__":
    raise SystemExit(main())
