"""pushpins: a 4 x 3 tray, exactly one pin per compartment, pins anywhere inside it.

The module is one category's plug-in for ``scene.py``: ``sample(rng) -> params`` draws a normal
scene, ``logical`` / ``structural(params, name, rng) -> [region shapes]`` apply a defect to
``params`` in place, ``rules(params) -> [broken rule names]`` checks it, and
``render(params, canvas, rng, photo)`` draws it.
"""

from __future__ import annotations

import math
from collections import Counter

from .canvas import Canvas, flat, render_damage, sphere, tube
from .geometry import capsule, circle, diff, dilate, inter, rbox, union
from .sampling import Retry, add_dirt, bezier, no_overlap, place, random_blob, uniform

_COLS, _ROWS, _WALL = 4, 3, 5.0
_TRAY = {"cx": 128.0, "cy": 128.0, "w": 240.0, "h": 184.0}
_HEAD, _COLLAR = 12.5, 14.5  # pins seen from above: a domed head on a wider collar
_COLOR = (236, 196, 34)


def _compartments() -> list[dict]:
    t = _TRAY
    cw = (t["w"] - (_COLS + 1) * _WALL) / _COLS
    ch = (t["h"] - (_ROWS + 1) * _WALL) / _ROWS
    comps = []
    for r in range(_ROWS):
        for c in range(_COLS):
            x = t["cx"] - t["w"] / 2 + _WALL + c * (cw + _WALL) + cw / 2
            y = t["cy"] - t["h"] / 2 + _WALL + r * (ch + _WALL) + ch / 2
            comps.append({"cx": x, "cy": y, "w": cw, "h": ch, "row": r, "col": c})
    return comps


def _separators() -> list[dict]:
    """Internal walls, each between two compartments (ids ``a``, ``b``)."""
    comps = _compartments()
    seps = []
    for r in range(_ROWS):
        for c in range(_COLS - 1):
            a, b = r * _COLS + c, r * _COLS + c + 1
            seps.append({"a": a, "b": b, "cx": (comps[a]["cx"] + comps[b]["cx"]) / 2, "cy": comps[a]["cy"],
                         "w": _WALL + 2, "h": comps[a]["h"]})
    for r in range(_ROWS - 1):
        for c in range(_COLS):
            a, b = r * _COLS + c, (r + 1) * _COLS + c
            seps.append({"a": a, "b": b, "cx": comps[a]["cx"], "cy": (comps[a]["cy"] + comps[b]["cy"]) / 2,
                         "w": comps[a]["w"], "h": _WALL + 2})
    return seps


def _new_pin(rng, comp, others=(), color=_COLOR, gap=1.0):
    margin = _COLLAR + 1.5

    def candidate():
        cx = uniform(rng, comp["cx"] - comp["w"] / 2 + margin, comp["cx"] + comp["w"] / 2 - margin)
        cy = uniform(rng, comp["cy"] - comp["h"] / 2 + margin, comp["cy"] + comp["h"] / 2 - margin)
        return {"cx": cx, "cy": cy, "angle": uniform(rng, 0, 2 * math.pi), "color": [float(v) for v in color],
                "needle": 0.0, "cut": None}

    def ok(pin):
        tx = pin["cx"] + pin["needle"] * math.cos(pin["angle"])
        ty = pin["cy"] + pin["needle"] * math.sin(pin["angle"])
        inside = abs(tx - comp["cx"]) < comp["w"] / 2 - 2.5 and abs(ty - comp["cy"]) < comp["h"] / 2 - 2.5
        return inside and no_overlap([(pin["cx"], pin["cy"], _COLLAR)], [(o["cx"], o["cy"], _COLLAR) for o in others], gap)

    return place(rng, candidate, ok, tries=500)


def _footprint(pin):
    tip = (pin["cx"] + pin["needle"] * math.cos(pin["angle"]), pin["cy"] + pin["needle"] * math.sin(pin["angle"]))
    return union(circle(pin["cx"], pin["cy"], _COLLAR + 0.5), capsule([(pin["cx"], pin["cy"]), tip], 2.0))


def sample(rng) -> dict:
    comps = _compartments()
    pins = [_new_pin(rng, comp) for comp in comps]
    tint = uniform(rng, -6, 6)
    return {
        "pins": pins,
        "missing_separators": [],
        "tray_color": [200 + tint, 205 + tint, 212 + tint],
        "damage": [],
    }


def _comp_of(x, y) -> int | None:
    for i, comp in enumerate(_compartments()):
        if abs(x - comp["cx"]) <= comp["w"] / 2 and abs(y - comp["cy"]) <= comp["h"] / 2:
            return i
    return None


def rules(p: dict) -> list[str]:
    broken = []
    counts = Counter(_comp_of(pin["cx"], pin["cy"]) for pin in p["pins"])
    n = len(_compartments())
    if any(counts.get(i, 0) == 0 for i in range(n)):
        broken.append("missing_pushpin")
    if any(counts.get(i, 0) > 1 for i in range(n)) or None in counts:
        broken.append("additional_pushpin")
    if p["missing_separators"]:
        broken.append("missing_separator")
    return broken


def logical(p: dict, name: str, rng) -> list[dict]:
    comps = _compartments()
    if name == "missing_pushpin":
        i = int(rng.integers(len(p["pins"])))
        gone = p["pins"].pop(i)
        comp = comps[_comp_of(gone["cx"], gone["cy"])]
        return [rbox(comp["cx"], comp["cy"], comp["w"] - 2, comp["h"] - 2, r=4)]
    if name == "additional_pushpin":
        i = int(rng.integers(len(comps)))
        comp = comps[i]
        others = [pin for pin in p["pins"] if _comp_of(pin["cx"], pin["cy"]) == i]
        new = _new_pin(rng, comp, others, gap=-6.0)  # two pins in one compartment may touch
        p["pins"].append(new)
        return [_footprint(new)]
    if name == "missing_separator":
        seps = _separators()
        j = int(rng.integers(len(seps)))
        p["missing_separators"].append(j)
        s = seps[j]
        return [rbox(s["cx"], s["cy"], s["w"], s["h"])]
    raise KeyError(name)


def structural(p: dict, name: str, rng) -> list[dict]:
    if name == "broken_pushpin":
        pin = p["pins"][int(rng.integers(len(p["pins"])))]
        a = uniform(rng, 0, 2 * math.pi)
        pin["cut"] = random_blob(rng, pin["cx"] + 9 * math.cos(a), pin["cy"] + 9 * math.sin(a), uniform(rng, 11, 13), 0.3)
        pin["angle"] = a  # the needle is bared where the head broke off
        pin["needle"] = uniform(rng, 20, 26)
        b = a + math.pi + uniform(rng, -1.0, 1.0)
        shard = random_blob(rng, pin["cx"] + 21 * math.cos(b), pin["cy"] + 21 * math.sin(b), uniform(rng, 5.5, 7), 0.35)
        p["damage"].append({"kind": "plastic", "shape": shard, "color": [c * 0.9 for c in pin["color"]]})
        return [union(_footprint(pin), dilate(shard, 1.0))]
    if name == "color":
        pin = p["pins"][int(rng.integers(len(p["pins"])))]
        pin["color"] = [[50, 100, 230], [210, 50, 160], [50, 170, 70], [215, 40, 40]][int(rng.integers(4))]
        return [_footprint(pin)]
    if name == "contamination":
        comp = _compartments()[int(rng.integers(len(p["pins"])))]
        pins = [(q["cx"], q["cy"], _COLLAR) for q in p["pins"]]

        def candidate():
            return {"x": uniform(rng, comp["cx"] - comp["w"] / 2 + 11, comp["cx"] + comp["w"] / 2 - 11),
                    "y": uniform(rng, comp["cy"] - comp["h"] / 2 + 11, comp["cy"] + comp["h"] / 2 - 11)}

        try:
            c = place(rng, candidate, lambda c: no_overlap([(c["x"], c["y"], 8)], pins), tries=200)
        except Retry:
            c = candidate()
        if rng.uniform() < 0.6:
            shape = add_dirt(p, rng, c["x"], c["y"], (8, 10.5), [[70, 52, 40], [40, 40, 44], [150, 60, 40]])
        else:
            pts = bezier((c["x"] - 16, c["y"] + uniform(rng, -6, 6)), (c["x"] - 5, c["y"] + uniform(rng, -20, 20)),
                          (c["x"] + 5, c["y"] + uniform(rng, -20, 20)), (c["x"] + 16, c["y"] + uniform(rng, -6, 6)), 10)
            shape = capsule(pts, 2.0)
            p["damage"].append({"kind": "hair", "shape": shape, "color": [40, 50, 120]})
            shape = dilate(shape, 1.5)
        return [shape]
    raise KeyError(name)


def render(p: dict, cv: Canvas, rng, photo: dict):
    to = photo["tex_offset"]
    cv.background(flat((58, 58, 62), tex="gravel", tex_amp=0.18, tex_scale=0.8, tex_offset=to))
    t = _TRAY
    tray = rbox(t["cx"], t["cy"], t["w"], t["h"], r=8)
    cv.shadow(tray, (4, 5), 6, 0.5)
    tc = p["tray_color"]
    cv.fill(tray, flat(tc, tex="brick_smooth", tex_amp=0.03, tex_offset=to, bevel=4, bevel_amp=0.35))
    comps = _compartments()
    seps = _separators()
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
        foot = circle(pin["cx"], pin["cy"], _COLLAR)
        tip = (pin["cx"] + pin["needle"] * math.cos(pin["angle"]), pin["cy"] + pin["needle"] * math.sin(pin["angle"]))
        needle = capsule([(pin["cx"], pin["cy"]), tip], 1.5)
        cv.shadow(union(foot, needle), (2.5, 3.0), 3.5, 0.45)
        if pin["needle"] > 0.5:
            cv.fill(needle, tube((200, 200, 206), 1.5, spec=0.4))
        col = pin["color"]
        collar, head = foot, circle(pin["cx"], pin["cy"], _HEAD)
        if pin["cut"]:
            collar, head = diff(collar, pin["cut"]), diff(head, pin["cut"])
        cv.fill(collar, flat([c * 0.78 for c in col], bevel=2.0, bevel_amp=0.4))
        cv.fill(head, sphere(col, pin["cx"], pin["cy"], _HEAD * 1.15, spec=0.45, ambient=0.5))
        if pin["cut"]:
            cv.fill(inter(dilate(pin["cut"], 1.2), diff(foot, pin["cut"])), [c * 0.45 for c in col])
    render_damage(p, cv, to)
