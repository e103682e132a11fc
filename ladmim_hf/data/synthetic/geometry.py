"""Shapes: JSON-able dicts with a signed distance function (negative inside, scene units).

Scene coordinates are those of a 256 x 256 image (:data:`SCENE_SIZE`), whatever the rendered size.
Shapes are plain dicts so that a scene description (and its anomaly regions) can be written to
``scenes.json`` and rendered again exactly.
"""

from __future__ import annotations

import math

import numpy as np

SCENE_SIZE = 256.0  # scene coordinates are in units of a 256 x 256 image
INF = 1.0e9


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
