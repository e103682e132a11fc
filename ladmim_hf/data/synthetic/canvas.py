"""The canvas renderer: shapes are filled onto an RGB float image with colour functions.

A colour is an RGB triple or a function ``color(canvas, window, distance) -> (h, w, 3)`` that
shades the pixels of a window (``flat``, ``sphere``, ``tube`` build such functions).
:func:`finish` turns the canvas into a photograph (lighting, white balance, noise) as uint8.
"""

from __future__ import annotations

import math

import numpy as np

from .geometry import INF, SCENE_SIZE, bbox, sdf
from .textures import load_textures

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
        tex = load_textures()[name]
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

def rgb(color) -> np.ndarray:
    return np.asarray(color, dtype=np.float32)


def flat(base, tex: str | None = None, tex_amp: float = 0.0, tex_scale: float = 1.0, tex_offset=(0, 0),
         bevel: float = 0.0, bevel_amp: float = 0.25, inner_shadow: float = 0.0, inner_width: float = 6.0):
    """Flat surface: optional texture, bevel lighting at the edges and ambient occlusion inside."""
    base = rgb(base)

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
    base = rgb(base)

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
            col = col * (1 - w[..., None]) + rgb(color2) * w[..., None]
        shade = ambient + (1.0 - ambient) * 1.1 * lam
        if tex:
            shade = shade * (1.0 + tex_amp * cv.texture(tex, win, tex_scale, tex_offset))
        col = col * shade[..., None] + 255.0 * spec * (lam ** gloss)[..., None]
        return col

    return color


def tube(base, r, spec: float = 0.3, stripes: tuple | None = None):
    """Cylinder profile across a capsule; ``stripes=(ax, ay, ux, uy, period, amp)`` adds threads."""
    base = rgb(base)

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


def finish(cv: Canvas, rng: np.random.Generator, photo: dict) -> np.ndarray:
    """Lighting gradient, vignetting, exposure, white balance and sensor noise -> uint8."""
    s = cv.size
    if s not in _GRIDS:
        u = np.linspace(-1.0, 1.0, s, dtype=np.float32)
        _GRIDS[s] = np.meshgrid(u, u)
    uu, vv = _GRIDS[s]
    ga = photo["gradient_angle"]
    gain = 1.0 + photo["gradient"] * (math.cos(ga) * uu + math.sin(ga) * vv) - photo["vignette"] * (uu * uu + vv * vv) / 2
    img = cv.img * (photo["exposure"] * gain)[..., None] * rgb(photo["white_balance"])[None, None, :]
    img += rng.standard_normal(img.shape, dtype=np.float32) * photo["noise"]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_damage(p: dict, cv: Canvas, to):
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
