"""splicing_connectors: two connectors with equal slot counts, one cable between the same slot on
both sides; cable colour bound to the slot count (2 yellow, 3 blue, 5 red).

The module is one category's plug-in for ``scene.py``: ``sample(rng) -> params`` draws a normal
scene, ``logical`` / ``structural(params, name, rng) -> [region shapes]`` apply a defect to
``params`` in place, ``rules(params) -> [broken rule names]`` checks it, and
``render(params, canvas, rng, photo)`` draws it.
"""

from __future__ import annotations

import math

from .canvas import Canvas, flat, render_damage, tube
from .geometry import capsule, circle, diff, dilate, inter, rbox, union
from .sampling import Retry, add_dirt, bezier, jagged_line, random_blob, uniform

_COLORS = {"yellow": (236, 200, 40), "blue": (40, 92, 205), "red": (205, 42, 40)}
_COLOR_OF = {2: "yellow", 3: "blue", 5: "red"}
_SLOT = 20.0
_WIDTH = 40.0
_LEVER_COLOR = (232, 122, 32)


def _new_connector(side: str, rng, n: int) -> dict:
    cx = (44.0 if side == "left" else 212.0) + uniform(rng, -5, 5)
    return {"cx": cx, "cy": 128 + uniform(rng, -12, 12), "angle": math.radians(uniform(rng, -6, 6)), "n": n, "side": side,
            "lever_colors": [list(_LEVER_COLOR) for _ in range(n)], "cut": None}


def _local(conn, lx, ly):
    c, s = math.cos(conn["angle"]), math.sin(conn["angle"])
    return conn["cx"] + c * lx - s * ly, conn["cy"] + s * lx + c * ly


def _body(conn):
    return rbox(conn["cx"], conn["cy"], _WIDTH, conn["n"] * _SLOT + 10, conn["angle"], r=5)


def _slot_y(conn, i):
    return -(conn["n"] * _SLOT) / 2 + _SLOT * (i + 0.5)


def _hole(conn, i):
    inner = 10.0 if conn["side"] == "left" else -10.0
    return _local(conn, inner, _slot_y(conn, i))


def _lever(conn, i):
    outer = -7.0 if conn["side"] == "left" else 7.0
    x, y = _local(conn, outer, _slot_y(conn, i))
    return rbox(x, y, 20, 13, conn["angle"], r=3)


def _new_cable(rng, left, right, k_left, k_right, color) -> dict:
    p0, p3 = _hole(left, k_left), _hole(right, k_right)
    for _ in range(200):
        d1, d2 = uniform(rng, -60, 60), uniform(rng, -60, 60)
        pts = bezier(p0, (p0[0] + uniform(rng, 40, 70), p0[1] + d1), (p3[0] - uniform(rng, 40, 70), p3[1] + d2), p3, 28)
        if all(14 <= y <= 242 for _, y in pts):
            return {"slot_left": k_left, "slot_right": k_right, "color": color, "points": [list(q) for q in pts],
                    "gap": None}
    raise Retry()


def _cable_shape(cable):
    return capsule(cable["points"], 4.6)


def sample(rng) -> dict:
    n = (2, 3, 5)[int(rng.integers(3))]
    left, right = _new_connector("left", rng, n), _new_connector("right", rng, n)
    k = int(rng.integers(n))
    return {"left": left, "right": right, "cables": [_new_cable(rng, left, right, k, k, _COLOR_OF[n])], "damage": []}


def rules(p: dict) -> list[str]:
    broken = []
    left, right = p["left"], p["right"]
    if left["n"] != right["n"]:
        broken.append("unequal_slot_count")
    if not p["cables"]:
        broken.append("missing_cable")
    elif len(p["cables"]) > 1:
        broken.append("extra_cable")
    for cable in p["cables"][:1]:
        if left["n"] == right["n"] and cable["color"] != _COLOR_OF[left["n"]]:
            broken.append("wrong_cable_color")
        if cable["slot_left"] != cable["slot_right"]:
            broken.append("wrong_cable_slot")
    return broken


def logical(p: dict, name: str, rng) -> list[dict]:
    left, right = p["left"], p["right"]
    cable = p["cables"][0]
    if name == "wrong_cable_color":
        cable["color"] = [c for c in _COLORS if c != cable["color"]][int(rng.integers(2))]
        return [_cable_shape(cable), _body(left), _body(right)]
    if name == "unequal_slot_count":
        conn = left if rng.uniform() < 0.5 else right
        conn["n"] = [m for m in (2, 3, 5) if m != conn["n"]][int(rng.integers(2))]
        conn["lever_colors"] = [list(_LEVER_COLOR) for _ in range(conn["n"])]
        k = min(cable["slot_left"], min(left["n"], right["n"]) - 1)
        p["cables"] = [_new_cable(rng, left, right, k, k, cable["color"])]
        return [_body(conn)]
    if name == "missing_cable":
        p["cables"] = []
        return [_cable_shape(cable)]
    if name == "wrong_cable_slot":
        n = left["n"]
        k2 = [m for m in range(n) if m != cable["slot_left"]][int(rng.integers(n - 1))]
        if rng.uniform() < 0.5:
            new = _new_cable(rng, left, right, cable["slot_left"], k2, cable["color"])
        else:
            new = _new_cable(rng, left, right, k2, cable["slot_left"], cable["color"])
        p["cables"] = [new]
        return [_cable_shape(new)]
    if name == "extra_cable":
        n = left["n"]
        k2 = [m for m in range(n) if m != cable["slot_left"]][int(rng.integers(n - 1))]
        new = _new_cable(rng, left, right, k2, k2, cable["color"])
        p["cables"].append(new)
        return [_cable_shape(new)]
    raise KeyError(name)


def structural(p: dict, name: str, rng) -> list[dict]:
    left, right = p["left"], p["right"]
    if name == "broken_cable":
        cable = p["cables"][0]
        n = len(cable["points"])
        i = int(rng.integers(int(n * 0.3), int(n * 0.7)))
        cable["gap"] = [i, i + 2]
        a, b = cable["points"][i], cable["points"][i + 2]
        strands = []
        for _ in range(4):
            o1, o2 = uniform(rng, -3, 3), uniform(rng, -3, 3)
            mid = ((a[0] + b[0]) / 2 + uniform(rng, -3, 3), (a[1] + b[1]) / 2 + uniform(rng, -3, 3))
            strands.append([[a[0] + o1, a[1] + o2], list(mid), [b[0] + o2, b[1] + o1]])
        p["damage"].append({"kind": "strands", "strands": strands, "color": [205, 125, 62]})
        return [dilate(capsule([a, b], 4.6), 3.0)]
    if name == "broken_connector":
        conn = left if rng.uniform() < 0.5 else right
        h = conn["n"] * _SLOT / 2 + 5
        lx = uniform(rng, -20, 20)
        ly = (-h if rng.uniform() < 0.5 else h) if abs(lx) < 14 else uniform(rng, -h + 6, h - 6)
        if abs(lx) >= 14:
            lx = 20.0 if lx > 0 else -20.0
        x, y = _local(conn, lx, ly)
        conn["cut"] = random_blob(rng, x, y, uniform(rng, 11, 14), 0.3)
        ang = math.atan2(conn["cy"] - y, conn["cx"] - x) + uniform(rng, -0.5, 0.5)
        crack = capsule(jagged_line(rng, x, y, uniform(rng, 22, 30), ang, 5, 2.5), 1.2)
        p["damage"].append({"kind": "scratch", "shape": inter(crack, _body(conn)), "color": [70, 66, 62], "opacity": 0.9})
        return [inter(union(dilate(conn["cut"], 1.0), dilate(crack, 1.5)), _body(conn))]
    if name == "color":
        conn = left if rng.uniform() < 0.5 else right
        i = int(rng.integers(conn["n"]))
        conn["lever_colors"][i] = [[60, 165, 75], [150, 60, 175], [70, 70, 80]][int(rng.integers(3))]
        return [dilate(_lever(conn, i), 1.0)]
    if name == "contamination":
        x, y = uniform(rng, 80, 176), uniform(rng, 30, 226)
        return [add_dirt(p, rng, x, y, (6.5, 9.5), [[70, 52, 40], [35, 35, 40], [120, 160, 60]])]
    raise KeyError(name)


def render(p: dict, cv: Canvas, rng, photo: dict):
    to = photo["tex_offset"]
    cv.background(flat((212, 214, 208), tex="grass_smooth", tex_amp=0.03, tex_offset=to))
    cv.img += (cv.texture("gravel", cv.full, 0.8, to) * 3.0)[..., None]
    for conn in (p["left"], p["right"]):
        body = _body(conn)
        cv.shadow(body, (3, 4), 5, 0.45)
        shape = diff(body, conn["cut"]) if conn["cut"] else body
        cv.fill(shape, flat((226, 226, 222), tex="gravel_smooth", tex_amp=0.02, bevel=4, bevel_amp=0.35))
        for i in range(conn["n"]):
            lever = _lever(conn, i)
            if conn["cut"]:
                lever = diff(lever, conn["cut"])
            cv.fill(lever, flat(conn["lever_colors"][i], bevel=2.5, bevel_amp=0.45))
            hx, hy = _hole(conn, i)
            hole = circle(hx, hy, 4.5)
            if conn["cut"]:
                hole = diff(hole, conn["cut"])
            cv.fill(hole, (45, 45, 48))
            if i > 0:
                gy = -(conn["n"] * _SLOT) / 2 + _SLOT * i
                groove = capsule([_local(conn, -18, gy), _local(conn, 18, gy)], 0.6)
                if conn["cut"]:
                    groove = diff(groove, conn["cut"])
                cv.fill(groove, (170, 170, 168))
        if conn["cut"]:  # the broken-off part leaves a dark cavity with a light, jagged rim
            cv.fill(inter(conn["cut"], dilate(body, -3.0)), flat((62, 60, 58), tex="gravel", tex_amp=0.25, tex_scale=2.0))
            cv.fill(inter(dilate(conn["cut"], 1.5), diff(body, conn["cut"])), (150, 148, 144))
    for cable in p["cables"]:
        pts = cable["points"]
        pieces = [pts] if not cable["gap"] else [pts[: cable["gap"][0] + 1], pts[cable["gap"][1]:]]
        base = _COLORS[cable["color"]]
        for piece in pieces:
            shape = capsule(piece, 4.6)
            cv.shadow(shape, (2.5, 3.5), 3.5, 0.4)
            cv.fill(shape, tube(base, 4.6, spec=0.3))
    for dmg in p["damage"]:
        if dmg["kind"] == "strands":
            for strand in dmg["strands"]:
                cv.fill(capsule(strand, 0.8), tube(dmg["color"], 0.8, spec=0.5))
    render_damage({"damage": [d for d in p["damage"] if d["kind"] != "strands"]}, cv, to)
