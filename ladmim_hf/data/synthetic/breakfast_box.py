"""breakfast_box: 2 tangerines + 1 nectarine on the left; cereal and toppings (banana chips +
almonds) in a 1:1 ratio on the right (which of the two lies on top varies).

The module is one category's plug-in for ``scene.py``: ``sample(rng) -> params`` draws a normal
scene, ``logical`` / ``structural(params, name, rng) -> [region shapes]`` apply a defect to
``params`` in place, ``rules(params) -> [broken rule names]`` checks it, and
``render(params, canvas, rng, photo)`` draws it.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from .canvas import Canvas, flat, render_damage, sphere
from .geometry import capsule, circle, dilate, ellipse, inter, rbox, sdf, union, wave
from .sampling import Retry, bezier, jagged_line, no_overlap, place, random_blob, uniform

_LEFT = {"cx": 67.0, "cy": 128.0, "w": 100.0, "h": 176.0}
_RIGHT = {"cx": 181.0, "cy": 128.0, "w": 112.0, "h": 176.0}
_FRUIT_R = {"tangerine": (19.0, 21.5), "nectarine": (22.5, 25.0)}
_RULE_COUNTS = {"tangerine": 2, "nectarine": 1}
_RATIO = (0.42, 0.58)  # allowed cereal fraction of the right compartment


def _new_fruit(rng, kind, fruits, comp=_LEFT, centre=None):
    lo, hi = _FRUIT_R[kind]
    r = uniform(rng, lo, hi)

    def candidate():
        if centre is not None:
            cx, cy = centre
        else:
            cx = uniform(rng, comp["cx"] - comp["w"] / 2 + r + 3, comp["cx"] + comp["w"] / 2 - r - 3)
            cy = uniform(rng, comp["cy"] - comp["h"] / 2 + r + 3, comp["cy"] + comp["h"] / 2 - r - 3)
        return {"kind": kind, "cx": cx, "cy": cy, "r": r, "stem_angle": uniform(rng, 0, 2 * math.pi),
                "blush_angle": uniform(rng, 0, 2 * math.pi)}

    others = [(f["cx"], f["cy"], f["r"]) for f in fruits]
    return place(rng, candidate, lambda f: no_overlap([(f["cx"], f["cy"], f["r"])], others, gap=-2.0))


def sample(rng) -> dict:
    fruits: list[dict] = []
    for kind in ("tangerine", "tangerine", "nectarine"):
        fruits.append(_new_fruit(rng, kind, fruits))
    rng.shuffle(fruits)
    comp = _RIGHT
    toppings = []
    for _ in range(46):
        x = uniform(rng, comp["cx"] - comp["w"] / 2 + 5, comp["cx"] + comp["w"] / 2 - 5)
        y = uniform(rng, comp["cy"] - comp["h"] / 2 + 5, comp["cy"] + comp["h"] / 2 - 5)
        if rng.uniform() < 0.7:
            toppings.append({"kind": "chip", "cx": x, "cy": y, "r": uniform(rng, 7.5, 9.5), "angle": uniform(rng, 0, 6.3)})
        else:
            toppings.append({"kind": "almond", "cx": x, "cy": y, "r": uniform(rng, 7.5, 9.0), "angle": uniform(rng, 0, 6.3)})
    fraction = uniform(rng, 0.46, 0.54)
    return {
        "fruits": fruits,
        "cereal_on_top": bool(rng.uniform() < 0.5),
        "cereal_fraction": fraction,
        "nominal_fraction": fraction,
        "wave": {"amp": uniform(rng, 2.0, 5.0), "period": uniform(rng, 40, 80), "phase": uniform(rng, 0, 6.3)},
        "toppings": toppings,
        "tray_color": [uniform(rng, 222, 234), uniform(rng, 216, 226), uniform(rng, 198, 212)],
        "damage": [],
    }


def _regions(p: dict, fraction: float):
    """(cereal region, toppings region) of the right compartment for a cereal fraction."""
    comp = _RIGHT
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


def rules(p: dict) -> list[str]:
    broken = []
    counts = Counter(f["kind"] for f in p["fruits"])
    if sum(counts.values()) < 3:
        broken.append("missing_fruit")
    elif sum(counts.values()) > 3:
        broken.append("extra_fruit")
    elif dict(counts) != _RULE_COUNTS:
        broken.append("wrong_fruit_kind")
    f = p["cereal_fraction"]
    if f <= 0.0 or f >= 1.0:
        broken.append("missing_ingredient")
    elif not (_RATIO[0] <= f <= _RATIO[1]):
        broken.append("wrong_ratio")
    return broken


def logical(p: dict, name: str, rng) -> list[dict]:
    fruits = p["fruits"]
    if name == "missing_fruit":
        gone = fruits.pop(int(rng.integers(len(fruits))))
        return [circle(gone["cx"], gone["cy"], gone["r"])]
    if name == "extra_fruit":
        kind = "tangerine" if rng.uniform() < 0.6 else "nectarine"
        new = _new_fruit(rng, kind, fruits)
        fruits.insert(int(rng.integers(len(fruits) + 1)), new)
        return [circle(new["cx"], new["cy"], new["r"])]
    if name == "wrong_fruit_kind":
        i = int(rng.integers(len(fruits)))
        old = fruits.pop(i)
        kind = "nectarine" if old["kind"] == "tangerine" else "tangerine"
        try:
            new = _new_fruit(rng, kind, fruits, centre=(old["cx"], old["cy"]), )
        except Retry:
            new = _new_fruit(rng, kind, fruits)
        fruits.insert(i, new)
        return [circle(new["cx"], new["cy"], new["r"])]
    nominal = p["nominal_fraction"]
    if name == "wrong_ratio":
        f = uniform(rng, 0.16, 0.28) if rng.uniform() < 0.5 else uniform(rng, 0.72, 0.84)
        p["cereal_fraction"] = f
        # the band between the nominal and the actual boundary
        cereal_now, _ = _regions(p, f)
        cereal_nom, top_nom = _regions(p, nominal)
        if f > nominal:
            return [inter(cereal_now, top_nom)]
        return [inter(cereal_nom, _regions(p, f)[1])]
    if name == "missing_ingredient":
        cereal_nom, top_nom = _regions(p, nominal)
        if rng.uniform() < 0.5:
            p["cereal_fraction"] = 1.0
            return [top_nom]
        p["cereal_fraction"] = 0.0
        return [cereal_nom]
    raise KeyError(name)


def structural(p: dict, name: str, rng) -> list[dict]:
    if name == "damaged_fruit":
        f = p["fruits"][int(rng.integers(len(p["fruits"])))]
        a, dist = uniform(rng, 0, 2 * math.pi), uniform(rng, 0.0, 0.4) * f["r"]
        b = random_blob(rng, f["cx"] + dist * math.cos(a), f["cy"] + dist * math.sin(a), uniform(rng, 0.5, 0.62) * f["r"], 0.3)
        region = inter(b, circle(f["cx"], f["cy"], f["r"] - 0.5))
        p["damage"].append({"kind": "bruise", "shape": region, "color": [uniform(rng, 60, 80), uniform(rng, 38, 48), uniform(rng, 18, 26)]})
        return [region]
    if name == "contamination":
        comp = _LEFT if rng.uniform() < 0.5 else _RIGHT
        cx = uniform(rng, comp["cx"] - comp["w"] / 2 + 14, comp["cx"] + comp["w"] / 2 - 14)
        cy = uniform(rng, comp["cy"] - comp["h"] / 2 + 14, comp["cy"] + comp["h"] / 2 - 14)
        if rng.uniform() < 0.65:
            shape = random_blob(rng, cx, cy, uniform(rng, 9.5, 13), 0.35)
            color = [[40, 95, 210], [50, 50, 56], [70, 160, 70]][int(rng.integers(3))]
            p["damage"].append({"kind": "plastic", "shape": shape, "color": color})
        else:
            pts = bezier((cx - 26, cy + uniform(rng, -8, 8)), (cx - 8, cy + uniform(rng, -28, 28)),
                          (cx + 8, cy + uniform(rng, -28, 28)), (cx + 26, cy + uniform(rng, -8, 8)), 14)
            shape = capsule(pts, 2.0)
            p["damage"].append({"kind": "hair", "shape": shape, "color": [30, 24, 20]})
            shape = dilate(shape, 1.5)
        return [shape]
    if name == "box_damage":
        # a crack running from a chipped hole at a compartment wall into the floor
        comp = _LEFT if rng.uniform() < 0.6 else _RIGHT
        side = int(rng.integers(4))
        if side < 2:
            x0 = comp["cx"] + (comp["w"] / 2 if side == 0 else -comp["w"] / 2)
            y0 = uniform(rng, comp["cy"] - comp["h"] / 2 + 20, comp["cy"] + comp["h"] / 2 - 20)
            angle = (math.pi if side == 0 else 0.0) + uniform(rng, -0.6, 0.6)
        else:
            x0 = uniform(rng, comp["cx"] - comp["w"] / 2 + 20, comp["cx"] + comp["w"] / 2 - 20)
            y0 = comp["cy"] + (comp["h"] / 2 if side == 2 else -comp["h"] / 2)
            angle = (-math.pi / 2 if side == 2 else math.pi / 2) + uniform(rng, -0.6, 0.6)
        pts = jagged_line(rng, x0, y0, uniform(rng, 36, 50), angle, 7, 3.5)
        crack = capsule(pts, 1.6)
        chip = random_blob(rng, pts[0][0], pts[0][1], uniform(rng, 8, 10.5), 0.3)
        p["damage"].append({"kind": "crack", "shape": crack, "chip": chip, "color": [62, 52, 44]})
        return [union(dilate(crack, 1.5), chip)]
    raise KeyError(name)


def render(p: dict, cv: Canvas, rng, photo: dict):
    to = photo["tex_offset"]
    cv.background(flat((96, 78, 62), tex="brick_smooth", tex_amp=0.08, tex_scale=0.5, tex_offset=to))
    cv.img += (cv.texture("grass", cv.full, 1.0, to) * 5.0)[..., None]
    tray = rbox(124, 128, 240, 196, r=14)
    cv.shadow(tray, (4, 6), 7, 0.5)
    tray_col = p["tray_color"]
    cv.fill(tray, flat(tray_col, tex="gravel_smooth", tex_amp=0.02, bevel=5, bevel_amp=0.3))
    floor_col = [c * 0.9 for c in tray_col]
    for comp in (_LEFT, _RIGHT):
        cv.fill(rbox(comp["cx"], comp["cy"], comp["w"], comp["h"], r=9),
                flat(floor_col, tex="gravel_smooth", tex_amp=0.03, inner_shadow=0.25, inner_width=9))
    # right compartment: cereal and toppings
    cereal, tops = _regions(p, p["cereal_fraction"])
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
    render_damage(p, cv, to)
