"""Sampling helpers shared by the categories: random placement, random shapes, photo parameters."""

from __future__ import annotations

import math
from typing import Callable

from .geometry import blob


def uniform(rng, lo, hi) -> float:
    return float(rng.uniform(lo, hi))


def blob_harmonics(rng, n: int = 4, amp: float = 0.22):
    return [[k, float(rng.uniform(0.3, 1.0) * amp / k ** 0.5), float(rng.uniform(0, 2 * math.pi))] for k in range(2, 2 + n)]


def random_blob(rng, cx, cy, r, amp: float = 0.25):
    return blob(cx, cy, r, blob_harmonics(rng, 4, amp))


def add_dirt(p: dict, rng, x: float, y: float, radius: tuple[float, float], colors: list) -> object:
    """A dirt stain (a random blob, radius drawn from `radius`, one of `colors`) added to `p["damage"]`; its shape."""
    shape = random_blob(rng, x, y, uniform(rng, *radius), 0.35)
    p["damage"].append({"kind": "dirt", "shape": shape, "color": colors[int(rng.integers(len(colors)))]})
    return shape


def jagged_line(rng, x0, y0, length, angle, n=6, jitter=3.0):
    pts = []
    for i in range(n + 1):
        t = i / n
        off = uniform(rng, -jitter, jitter) if 0 < i < n else 0.0
        pts.append((x0 + t * length * math.cos(angle) - off * math.sin(angle),
                    y0 + t * length * math.sin(angle) + off * math.cos(angle)))
    return pts


def bezier(p0, p1, p2, p3, n=24):
    out = []
    for i in range(n + 1):
        t = i / n
        a, b, c, d = (1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t * t, t ** 3
        out.append((a * p0[0] + b * p1[0] + c * p2[0] + d * p3[0], a * p0[1] + b * p1[1] + c * p2[1] + d * p3[1]))
    return out


class Retry(Exception):
    """Raised when a random placement failed; the caller re-samples with the same generator."""


def place(rng, sampler: Callable[[], dict], ok: Callable[[dict], bool], tries: int = 300) -> dict:
    """The first of up to ``tries`` candidates from ``sampler`` that ``ok`` accepts (else :class:`Retry`)."""
    for _ in range(tries):
        candidate = sampler()
        if ok(candidate):
            return candidate
    raise Retry()


def no_overlap(circles_a, circles_b, gap=0.0) -> bool:
    for ax, ay, ar in circles_a:
        for bx, by, br in circles_b:
            if (ax - bx) ** 2 + (ay - by) ** 2 < (ar + br + gap) ** 2:
                return False
    return True


def sample_photo(rng, angle_deg=3.0, shift=6.0) -> dict:
    """Camera and lighting of one image (pose jitter, light, exposure, noise, render seed)."""
    la = uniform(rng, math.radians(200), math.radians(250))
    return {
        "angle": math.radians(uniform(rng, -angle_deg, angle_deg)),
        "scale": uniform(rng, 0.97, 1.03),
        "shift": [uniform(rng, -shift, shift), uniform(rng, -shift, shift)],
        "light": [0.6 * math.cos(la), 0.6 * math.sin(la), 0.7],
        "exposure": uniform(rng, 0.9, 1.08),
        "white_balance": [uniform(rng, 0.96, 1.04), 1.0, uniform(rng, 0.96, 1.04)],
        "gradient": uniform(rng, 0.0, 0.14),
        "gradient_angle": uniform(rng, 0, 2 * math.pi),
        "vignette": uniform(rng, 0.04, 0.16),
        "noise": uniform(rng, 1.0, 2.2),
        "tex_offset": [uniform(rng, 0, 512), uniform(rng, 0, 512)],
        "render_seed": int(rng.integers(0, 2**31 - 1)),
    }
