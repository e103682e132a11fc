"""juice_bottle: one bottle, fixed fill level, main label centred with a fruit icon matching the
juice colour, small label at the bottom.

The module is one category's plug-in for ``scene.py``: ``sample(rng) -> params`` draws a normal
scene, ``logical`` / ``structural(params, name, rng) -> [region shapes]`` apply a defect to
``params`` in place, ``rules(params) -> [broken rule names]`` checks it, and
``render(params, canvas, rng, photo)`` draws it.
"""

from __future__ import annotations

import math

import numpy as np

from .canvas import Canvas, flat, render_damage, rgb, sphere
from .geometry import capsule, circle, diff, dilate, ellipse, inter, rbox, sdf, union, wave
from .sampling import add_dirt, jagged_line, place, random_blob, uniform

_JUICES = {
    "orange": (238, 128, 24),
    "cherry": (128, 16, 38),
    "banana": (236, 214, 140),
}
_FILL = 84.0                                  # nominal fill line (for a bottle centred at y = 128)
_LABEL = {"dy": 50.0, "w": 66.0, "h": 58.0}   # label centre = bottle centre + dy
_BOTTOM = {"dy": 98.0, "w": 66.0, "h": 14.0}


def sample(rng) -> dict:
    cx = 128 + uniform(rng, -4, 4)
    cy = 128 + uniform(rng, -2, 2)
    juice = ("orange", "cherry", "banana")[int(rng.integers(3))]
    return {
        "bottle": {"cx": cx, "cy": cy},
        "juice": juice,
        "fill_y": _FILL + uniform(rng, -2, 2) + (cy - 128),
        "label": {"cx": cx + uniform(rng, -1.5, 1.5), "cy": cy + _LABEL["dy"] + uniform(rng, -2, 2),
                  "angle": math.radians(uniform(rng, -1.5, 1.5)), "icon": juice, "icon_angle": math.radians(uniform(rng, -8, 8))},
        "bottom_label": {"cx": cx + uniform(rng, -1.5, 1.5), "cy": cy + _BOTTOM["dy"] + uniform(rng, -1.5, 1.5),
                         "angle": math.radians(uniform(rng, -1.5, 1.5))},
        "cap_color": [uniform(rng, 185, 210)] * 3,
        "juice_tint": [uniform(rng, 0.9, 1.08), uniform(rng, 0.9, 1.08), uniform(rng, 0.9, 1.08)],
        "paper": uniform(rng, 226, 246),
        "glass": uniform(rng, 0.45, 0.65),
        "highlight": uniform(rng, -6, 6),
        "damage": [],
    }


def _bottle_shape(b, inset=0.0):
    cx, cy = b["cx"], b["cy"]
    return union(
        rbox(cx, cy - 88, 40 - 2 * inset, 44 - 2 * inset, r=6),
        rbox(cx, cy - 62, 88 - 2 * inset, 30 - 2 * inset, r=14),
        rbox(cx, cy + 24, 110 - 2 * inset, 180 - 2 * inset, r=18),
    )


def _liquid(p, fill_y):
    b = p["bottle"]
    return inter(_bottle_shape(b, 3.0), wave(fill_y, 0.0, 100.0, 0.0, below=True))


def _label_shape(lab):
    return rbox(lab["cx"], lab["cy"], _LABEL["w"], _LABEL["h"], lab["angle"], r=4)


def _bottom_shape(lab):
    return rbox(lab["cx"], lab["cy"], _BOTTOM["w"], _BOTTOM["h"], lab["angle"], r=3)


def _icon_parts(lab) -> list[tuple[dict, object]]:
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


def _icon_region(lab):
    return dilate(union(*[s for s, _ in _icon_parts(lab)]), 1.5)


def rules(p: dict) -> list[str]:
    broken = []
    b, lab = p["bottle"], p["label"]
    if lab is not None and lab["icon"] != p["juice"]:
        broken.append("wrong_fruit_icon")
    if abs(p["fill_y"] - (_FILL + b["cy"] - 128)) > 6.0:
        broken.append("wrong_fill_level")
    if lab is None:
        broken.append("missing_label")
    elif (abs(lab["cx"] - b["cx"]) > 5 or abs(lab["cy"] - b["cy"] - _LABEL["dy"]) > 6
          or abs(lab["angle"]) > math.radians(6)):
        broken.append("misplaced_label")
    if p["bottom_label"] is None:
        broken.append("missing_bottom_label")
    return broken


def logical(p: dict, name: str, rng) -> list[dict]:
    lab = p["label"]
    if name == "wrong_fruit_icon":
        lab["icon"] = [j for j in _JUICES if j != p["juice"]][int(rng.integers(2))]
        return [_icon_region(lab), diff(_liquid(p, p["fill_y"]), dilate(_label_shape(lab), 1.0))]
    if name == "wrong_fill_level":
        nominal = p["fill_y"]
        if rng.uniform() < 0.6:
            p["fill_y"] = nominal + uniform(rng, 22, 40)   # too little juice
        else:
            p["fill_y"] = nominal - uniform(rng, 16, 26)   # too much juice (up into the shoulder)
        lo, hi = sorted((nominal, p["fill_y"]))
        band = inter(_bottle_shape(p["bottle"], 3.0), wave(lo, 0, 100, 0, True), wave(hi, 0, 100, 0, False))
        return [diff(band, _label_shape(lab))]
    if name == "missing_label":
        p["label"] = None
        return [_label_shape(lab)]
    if name == "misplaced_label":
        mode = int(rng.integers(3))
        if mode == 0:  # sideways, still on the bottle
            lab["cx"] += (1 if rng.uniform() < 0.5 else -1) * uniform(rng, 11, 15)
        elif mode == 1:  # too high
            lab["cy"] -= uniform(rng, 20, 34)
        else:  # tilted
            lab["angle"] += (1 if rng.uniform() < 0.5 else -1) * math.radians(uniform(rng, 12, 18))
        return [_label_shape(lab)]
    if name == "missing_bottom_label":
        gone = p["bottom_label"]
        p["bottom_label"] = None
        return [_bottom_shape(gone)]
    raise KeyError(name)


def structural(p: dict, name: str, rng) -> list[dict]:
    b, lab = p["bottle"], p["label"]
    if name == "contamination":
        labels = union(_label_shape(lab), _bottom_shape(p["bottom_label"]))
        liquid = _liquid(p, p["fill_y"])

        def candidate():
            return {"x": uniform(rng, b["cx"] - 42, b["cx"] + 42), "y": uniform(rng, p["fill_y"] + 10, b["cy"] + 105)}

        def ok(c):
            x, y = np.float32([c["x"]]), np.float32([c["y"]])
            return sdf(labels, x, y)[0] > 14 and sdf(liquid, x, y)[0] < -12

        c = place(rng, candidate, ok)
        return [add_dirt(p, rng, c["x"], c["y"], (8, 11), [[40, 34, 28], [235, 235, 225], [60, 130, 60]])]
    if name == "damaged_label":
        # tear off a piece at the label's edge
        side = int(rng.integers(4))
        w, h = _LABEL["w"] / 2, _LABEL["h"] / 2
        if side < 2:
            dx, dy = (w if side == 0 else -w), uniform(rng, -h + 6, h - 6)
        else:
            dx, dy = uniform(rng, -w + 6, w - 6), (h if side == 2 else -h)
        c, s = math.cos(lab["angle"]), math.sin(lab["angle"])
        cut = random_blob(rng, lab["cx"] + c * dx - s * dy, lab["cy"] + s * dx + c * dy, uniform(rng, 11, 15), 0.35)
        lab["cut"] = cut
        region = inter(cut, _label_shape(lab))
        p["damage"].append({"kind": "scratch", "shape": capsule(_tear_edge(lab, cut), 0.9), "color": [120, 110, 100], "opacity": 0.6})
        return [region]
    if name == "scratch":
        x0 = uniform(rng, b["cx"] - 40, b["cx"] + 10)
        y0 = uniform(rng, b["cy"] - 30, b["cy"] + 70)
        ang = uniform(rng, -0.9, 0.9)
        pts = jagged_line(rng, x0, y0, uniform(rng, 50, 70), ang, 6, 2.0)
        pts2 = [(x - 4 * math.sin(ang), y + 4 * math.cos(ang)) for x, y in pts[1:-2]]
        shape = union(capsule(pts, 1.4), capsule(pts2, 0.9))
        p["damage"].append({"kind": "scratch", "shape": shape, "color": [245, 245, 240], "opacity": 0.95})
        return [inter(dilate(shape, 2.0), _bottle_shape(b))]
    if name == "damaged_cap":
        cap = rbox(b["cx"], b["cy"] - 112, 48, 18, r=4)
        cut = random_blob(rng, b["cx"] + uniform(rng, -18, 18), b["cy"] - 112 + (-9 if rng.uniform() < 0.5 else 9), uniform(rng, 8, 10), 0.3)
        p["cap_cut"] = cut
        p["damage"].append({"kind": "stain", "shape": inter(dilate(cut, 3.0), cap), "color": [70, 60, 55], "opacity": 0.7})
        return [inter(dilate(cut, 3.0), cap)]
    raise KeyError(name)


def _tear_edge(lab, cut):
    # points along the cut boundary inside the label: sample angles of the blob and keep inner points
    pts = []
    label = _label_shape(lab)
    for k in range(24):
        t = 2 * math.pi * k / 24
        radius = cut["r"] * (1 + sum(a * math.cos(kk * t + ph) for kk, a, ph in cut["harmonics"]))
        x, y = cut["cx"] + radius * math.cos(t), cut["cy"] + radius * math.sin(t)
        if sdf(label, np.float32([x]), np.float32([y]))[0] < -0.5:
            pts.append((x, y))
    return pts if len(pts) >= 2 else [(cut["cx"], cut["cy"]), (cut["cx"] + 0.1, cut["cy"])]


def render(p: dict, cv: Canvas, rng, photo: dict):
    to = photo["tex_offset"]
    b = p["bottle"]
    cv.background(flat((30, 30, 34), tex="brick_smooth", tex_amp=0.25, tex_scale=0.6, tex_offset=to))
    cv.img += (cv.texture("gravel", cv.full, 1.0, to) * 3.0)[..., None]
    bottle = _bottle_shape(b)
    cv.shadow(bottle, (6, 3), 8, 0.4)
    cv.fill(bottle, flat((70, 78, 78), bevel=4, bevel_amp=0.5), opacity=p["glass"])
    juice = rgb(_JUICES[p["juice"]]) * rgb(p["juice_tint"])
    cx = b["cx"]

    def liquid_color(cv_, win, d):
        x, _ = cv_.local(win)
        t = np.clip((x - cx) / 54.0, -1, 1)
        prof = np.sqrt(1 - t * t)
        shade = 0.62 + 0.42 * prof + 0.05 * cv_.texture("grass_smooth", win, 1.0, to)
        return juice[None, None, :] * shade[..., None]

    cv.fill(_liquid(p, p["fill_y"]), liquid_color)
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
        shape = _label_shape(lab)
        if lab.get("cut"):
            shape = diff(shape, lab["cut"])
        cv.shadow(shape, (1.5, 1.5), 2.0, 0.3)
        paper = p["paper"]
        cv.fill(shape, flat((paper, paper - 2, paper - 9), tex="grass_smooth", tex_amp=0.03, bevel=2.0, bevel_amp=0.15))
        for part, col in _icon_parts(lab):
            if lab.get("cut"):
                part = diff(part, lab["cut"])
            cv.fill(part, col)
    bl = p["bottom_label"]
    if bl is not None:
        paper = p["paper"]
        cv.fill(_bottom_shape(bl), flat((paper, paper, paper - 6), bevel=1.5, bevel_amp=0.15))
        c, s = math.cos(bl["angle"]), math.sin(bl["angle"])
        for dx, length in ((-17, 15), (2, 17), (21, 10)):
            x, y = bl["cx"] + c * dx, bl["cy"] + s * dx
            cv.fill(rbox(x, y, length, 4.5, bl["angle"], r=1), (60, 60, 70))
    render_damage(p, cv, to)
