"""screw_bag: 2 washers, 2 nuts, 1 long and 2 short screws at random places in a clear bag.

The module is one category's plug-in for ``scene.py``: ``sample(rng) -> params`` draws a normal
scene, ``logical`` / ``structural(params, name, rng) -> [region shapes]`` apply a defect to
``params`` in place, ``rules(params) -> [broken rule names]`` checks it, and
``render(params, canvas, rng, photo)`` draws it.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from .canvas import Canvas, flat, render_damage, rgb, tube
from .geometry import capsule, circle, diff, dilate, hexagon, rbox, ring, union
from .sampling import Retry, add_dirt, no_overlap, place, random_blob, uniform

_COUNTS = {"washer": 2, "nut": 2, "long_screw": 1, "short_screw": 2}
_LENGTH = {"long_screw": 104.0, "short_screw": 62.0}
_AREA = (34.0, 66.0, 222.0, 224.0)  # where part centres may lie


def _circles(part) -> list[tuple[float, float, float]]:
    kind = part["kind"]
    if kind in ("washer", "nut"):
        return [(part["cx"], part["cy"], 16.0)]
    length = _LENGTH[kind]
    ux, uy = math.cos(part["angle"]), math.sin(part["angle"])
    out = []
    n = int(length // 10) + 1
    for i in range(n + 1):
        s = -length / 2 + length * i / n
        out.append((part["cx"] + s * ux, part["cy"] + s * uy, 10.0 if i == 0 else 6.0))
    return out


def _geometry(part):
    """Shapes of a part: list of (shape, role)."""
    kind = part["kind"]
    cx, cy, a = part["cx"], part["cy"], part["angle"]
    if kind == "washer":
        return [(ring(cx, cy, 15.5, 6.5), "washer")]
    if kind == "nut":
        return [(diff(hexagon(cx, cy, 15.0, a), circle(cx, cy, 6.2)), "nut")]
    length = _LENGTH[kind]
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


def _footprint(part):
    return dilate(union(*[s for s, _ in _geometry(part)]), 1.0)


def _new_part(rng, kind, parts, centre=None):
    others = [c for q in parts for c in _circles(q)]

    def candidate():
        if centre is None:
            cx, cy = uniform(rng, _AREA[0], _AREA[2]), uniform(rng, _AREA[1], _AREA[3])
        else:
            cx, cy = centre
        return {"kind": kind, "cx": cx, "cy": cy, "angle": uniform(rng, 0, 2 * math.pi), "rust": False}

    def ok(part):
        circles = _circles(part)
        inside = all(14 <= x <= 242 and 56 <= y <= 236 for x, y, _ in circles)
        return inside and no_overlap(circles, others, 1.0)

    return place(rng, candidate, ok, tries=600)


def sample(rng) -> dict:
    parts: list[dict] = []
    for kind in ("long_screw", "short_screw", "short_screw", "nut", "nut", "washer", "washer"):
        parts.append(_new_part(rng, kind, parts))
    order = rng.permutation(len(parts))
    return {
        "parts": [parts[i] for i in order],
        "bag": {"cx": 128 + uniform(rng, -3, 3), "cy": 140 + uniform(rng, -3, 3), "angle": math.radians(uniform(rng, -2, 2))},
        "holes": [],
        "damage": [],
    }


def rules(p: dict) -> list[str]:
    counts = Counter(part["kind"] for part in p["parts"])
    total, expected = sum(counts.values()), sum(_COUNTS.values())
    if total < expected:
        return ["missing_part"]
    if total > expected:
        return ["additional_part"]
    if dict(counts) != _COUNTS:
        if counts["long_screw"] + counts["short_screw"] == 3 and counts["washer"] == 2 and counts["nut"] == 2:
            return ["wrong_screw_length"]
        return ["wrong_part_mix"]
    return []


def logical(p: dict, name: str, rng) -> list[dict]:
    parts = p["parts"]
    if name == "missing_part":
        gone = parts.pop(int(rng.integers(len(parts))))
        return [_footprint(gone)]
    if name == "additional_part":
        kind = ("washer", "nut", "short_screw", "long_screw")[int(rng.integers(4))]
        new = _new_part(rng, kind, parts)
        parts.insert(int(rng.integers(len(parts) + 1)), new)
        return [_footprint(new)]
    if name == "wrong_screw_length":
        screws = [i for i, q in enumerate(parts) if q["kind"].endswith("screw")]
        i = screws[int(rng.integers(len(screws)))]
        old = parts.pop(i)
        kind = "short_screw" if old["kind"] == "long_screw" else "long_screw"
        try:
            new = _new_part(rng, kind, parts, centre=(old["cx"], old["cy"]))
        except Retry:
            new = _new_part(rng, kind, parts)
        parts.insert(i, new)
        return [_footprint(new)]
    raise KeyError(name)


def structural(p: dict, name: str, rng) -> list[dict]:
    parts = p["parts"]
    if name == "broken_screw":
        screws = [q for q in parts if q["kind"].endswith("screw")]
        part = screws[int(rng.integers(len(screws)))]
        part["bend"] = (1 if rng.uniform() < 0.5 else -1) * math.radians(uniform(rng, 35, 55))
        return [_footprint(part)]
    if name == "color":
        part = parts[int(rng.integers(len(parts)))]
        part["rust"] = True
        return [_footprint(part)]
    occupied = [c for q in parts for c in _circles(q)]

    def candidate():
        return {"x": uniform(rng, 30, 226), "y": uniform(rng, 64, 226)}

    try:
        c = place(rng, candidate, lambda c: no_overlap([(c["x"], c["y"], 14)], occupied), tries=300)
    except Retry:
        c = candidate()
    if name == "bag_broken":
        hole = random_blob(rng, c["x"], c["y"], uniform(rng, 10, 14), 0.35)
        p["holes"].append(hole)
        return [hole]
    if name == "contamination":
        return [add_dirt(p, rng, c["x"], c["y"], (6.5, 9.5), [[70, 52, 40], [35, 35, 40], [40, 100, 190]])]
    raise KeyError(name)


def render(p: dict, cv: Canvas, rng, photo: dict):
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
        geometry = _geometry(part)
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
                    return rgb((150, 78, 36))[None, None, :] * (0.8 + 0.2 * n[..., None])
                cv.fill(shape, rust, opacity=0.8)
    # the film on top of the parts
    cv.fill(inner_bag, flat((235, 238, 242), tex="grass_smooth", tex_amp=0.2, tex_scale=0.5, tex_offset=(to[1], to[0])), opacity=0.12)
    render_damage(p, cv, to)
