"""Procedural scenes for the demo: corridors in perspective, the objects that set the risk label, and
non-corridor scenes (outdoors, rooms). Pure functions of a numpy Generator, so a seed fixes every pixel.

Every object is drawn on its own RGBA layer first; that is what lets the demo export hazard cut-outs
(e-bikes, batteries) for the augmentation suite's hazard-region insertion.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

RGB = tuple[int, int, int]

# Object names as the demo's pre-training captions say them (Chinese, as the competition's images are).
OBJECT_NAMES = {
    "ebike": "电动车", "battery": "电池", "cable": "充电线", "box": "纸箱", "chair": "椅子",
    "cabinet": "柜子", "bag": "袋子", "shoes": "鞋子", "plant": "盆栽", "bucket": "水桶",
}
HAZARDS = ("ebike", "battery")
CLUTTER = ("box", "chair", "cabinet", "bag")
TIDY = ("shoes", "plant", "bucket", "box")
SCENE_NAMES = {"corridor": "走廊", "outdoor": "户外", "room": "房间"}

# Hazard colours kept saturated and warm/blue, as real e-bikes and batteries mostly are.
HAZARD_COLOURS: list[RGB] = [(220, 30, 30), (240, 120, 20), (235, 200, 20), (30, 80, 210)]
WALL_COLOURS: list[RGB] = [(225, 222, 210), (205, 210, 205), (230, 228, 230), (200, 215, 200), (220, 205, 185)]
FLOOR_COLOURS: list[RGB] = [(140, 140, 135), (120, 110, 95), (165, 160, 150), (110, 120, 125), (150, 135, 115)]
DOOR_COLOURS: list[RGB] = [(110, 75, 45), (70, 90, 70), (90, 90, 100), (140, 110, 80), (60, 60, 70)]


@dataclass
class Scene:
    image: Image.Image
    kind: str  # corridor | outdoor | room
    objects: list[str] = field(default_factory=list)  # names of drawn objects, in drawing order
    floor: tuple[int, int, int, int] = (0, 0, 0, 0)  # corridor floor box x0, y0, x1, y1 (for insertion)


def _jitter(rng: np.random.Generator, colour: RGB, amount: int = 18) -> RGB:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)  # type: ignore


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


@dataclass
class Corridor:
    """Geometry of a one-point-perspective corridor: the back wall box and the image size."""
    w: int
    h: int
    bx0: float
    by0: float
    bx1: float
    by1: float

    def floor_point(self, t: float, u: float) -> tuple[float, float]:
        """Floor point at depth t (0 = front edge, 1 = back wall) and across-position u (0 left, 1 right)."""
        y = self.h + (self.by1 - self.h) * t
        xl = 0 + (self.bx0 - 0) * t
        xr = self.w + (self.bx1 - self.w) * t
        return xl + (xr - xl) * u, y

    def scale(self, t: float) -> float:
        return 1.0 - 0.72 * t


def draw_corridor(rng: np.random.Generator, w: int, h: int) -> tuple[Image.Image, Corridor]:
    bw, bh = w * rng.uniform(0.26, 0.38), h * rng.uniform(0.3, 0.42)
    cx, cy = w * rng.uniform(0.4, 0.6), h * rng.uniform(0.4, 0.5)
    g = Corridor(w, h, cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2)
    img = Image.new("RGB", (w, h))
    d = ImageDraw.Draw(img)
    wall = _jitter(rng, _pick(rng, WALL_COLOURS))
    floor = _jitter(rng, _pick(rng, FLOOR_COLOURS))
    shade = lambda c, f: tuple(int(v * f) for v in c)  # noqa: E731
    d.polygon([(0, 0), (w, 0), (g.bx1, g.by0), (g.bx0, g.by0)], fill=shade(wall, 1.05))  # ceiling
    d.polygon([(0, h), (w, h), (g.bx1, g.by1), (g.bx0, g.by1)], fill=floor)
    d.polygon([(0, 0), (g.bx0, g.by0), (g.bx0, g.by1), (0, h)], fill=shade(wall, 0.9))
    d.polygon([(w, 0), (g.bx1, g.by0), (g.bx1, g.by1), (w, h)], fill=shade(wall, 0.85))
    d.rectangle([g.bx0, g.by0, g.bx1, g.by1], fill=shade(wall, 0.75))
    # Floor tiles: lines converging to the vanishing point give the perspective cue.
    for u in np.linspace(0.2, 0.8, 4):
        x0, y0 = g.floor_point(0, u)
        x1, y1 = g.floor_point(1, u)
        d.line([(x0, y0), (x1, y1)], fill=shade(floor, 0.85), width=1)
    # Doors on both side walls.
    door = _jitter(rng, _pick(rng, DOOR_COLOURS))
    for side in (0, 1):
        for t0 in rng.choice([0.15, 0.45, 0.7], size=int(rng.integers(1, 3)), replace=False):
            t1 = t0 + 0.12
            quad = []
            for t, top in ((t0, False), (t1, False), (t1, True), (t0, True)):
                x = (g.bx0 * t) if side == 0 else (w + (g.bx1 - w) * t)
                y_floor = h + (g.by1 - h) * t
                y_ceil = 0 + g.by0 * t
                y = y_floor - (y_floor - y_ceil) * 0.78 if top else y_floor
                quad.append((x, y))
            d.polygon(quad, fill=door)
    # Ceiling lights along the centre line.
    for t in (0.25, 0.55, 0.8):
        x, _ = g.floor_point(t, 0.5)
        y = g.by0 * t
        s = g.scale(t) * w * 0.05
        d.rectangle([x - s, y - s * 0.2, x + s, y + s * 0.2], fill=(250, 250, 240))
    return img, g


def _layer(w: int, h: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    return layer, ImageDraw.Draw(layer)


def draw_object(rng: np.random.Generator, kind: str, w: int, h: int, x: float, y: float, s: float) -> Image.Image:
    """One object standing on the floor at (x, y) with scale s, on a transparent layer of size (w, h)."""
    layer, d = _layer(w, h)
    u = s * w * (0.36 if kind in HAZARDS else 0.28)  # the object's unit size in pixels; hazards are salient
    if kind == "ebike":
        frame = _pick(rng, HAZARD_COLOURS)
        r = u * 0.24
        lw, rw = (x - u * 0.42, y - r), (x + u * 0.42, y - r)
        for cx, cy in (lw, rw):
            d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(25, 25, 25), width=max(2, int(r * 0.35)))
        top = y - r - u * 0.45
        d.polygon([(lw[0], lw[1]), (x - u * 0.1, top + u * 0.12), (x + u * 0.3, top + u * 0.12), (rw[0], rw[1]),
                   (x, y - r * 0.9)], fill=frame)
        d.rectangle([x - u * 0.2, top, x + u * 0.1, top + u * 0.1], fill=(20, 20, 20))  # seat
        d.line([(rw[0], rw[1]), (x + u * 0.36, top - u * 0.1)], fill=(40, 40, 40), width=max(2, int(u * 0.06)))
        d.line([(x + u * 0.26, top - u * 0.1), (x + u * 0.48, top - u * 0.1)], fill=(30, 30, 30),
               width=max(2, int(u * 0.05)))
    elif kind == "battery":
        colour = _pick(rng, HAZARD_COLOURS)
        bw, bh = u * 0.45, u * 0.7
        d.rectangle([x - bw / 2, y - bh, x + bw / 2, y], fill=colour, outline=(15, 15, 15), width=2)
        d.rectangle([x - bw / 2, y - bh * 0.62, x + bw / 2, y - bh * 0.45], fill=(245, 245, 245))  # label band
        d.rectangle([x - bw * 0.3, y - bh - u * 0.06, x - bw * 0.05, y - bh], fill=(30, 30, 30))  # terminals
        d.rectangle([x + bw * 0.05, y - bh - u * 0.06, x + bw * 0.3, y - bh], fill=(30, 30, 30))
    elif kind == "box":
        bw, bh = u * rng.uniform(0.35, 0.55), u * rng.uniform(0.3, 0.45)
        c = _jitter(rng, (170, 125, 75), 15)
        for level in range(int(rng.integers(1, 4))):  # a stack of 1-3 boxes
            yb = y - level * bh
            d.polygon([(x - bw / 2, yb), (x + bw / 2, yb), (x + bw / 2, yb - bh), (x - bw / 2, yb - bh)], fill=c,
                      outline=(110, 80, 45))
            d.polygon([(x + bw / 2, yb), (x + bw * 0.65, yb - bh * 0.2), (x + bw * 0.65, yb - bh * 1.2),
                       (x + bw / 2, yb - bh)], fill=tuple(int(v * 0.75) for v in c))
            d.line([(x, yb - bh), (x, yb - bh * 0.6)], fill=(215, 195, 150), width=2)  # tape
    elif kind == "chair":
        c = _jitter(rng, _pick(rng, [(120, 80, 50), (60, 110, 160), (90, 150, 90), (200, 200, 200)]), 15)
        lw_ = max(2, int(u * 0.05))
        for dx in (-0.2, 0.2):
            d.line([(x + dx * u, y), (x + dx * u, y - u * 0.35)], fill=c, width=lw_)
        d.rectangle([x - u * 0.25, y - u * 0.4, x + u * 0.25, y - u * 0.33], fill=c)
        d.rectangle([x - u * 0.25, y - u * 0.8, x - u * 0.18, y - u * 0.35], fill=c)
        d.rectangle([x - u * 0.25, y - u * 0.8, x + u * 0.1, y - u * 0.7], fill=c)
    elif kind == "cabinet":
        c = _jitter(rng, _pick(rng, [(150, 110, 70), (180, 180, 175), (110, 90, 70)]), 15)
        cw, ch = u * 0.45, u * 1.0
        d.rectangle([x - cw / 2, y - ch, x + cw / 2, y], fill=c, outline=(60, 50, 40), width=2)
        d.line([(x, y - ch), (x, y)], fill=(60, 50, 40), width=2)
    elif kind == "bag":
        c = _jitter(rng, _pick(rng, [(230, 230, 225), (90, 90, 95), (60, 120, 60)]), 12)
        d.ellipse([x - u * 0.22, y - u * 0.4, x + u * 0.22, y], fill=c, outline=(50, 50, 50))
    elif kind == "shoes":
        c = _jitter(rng, _pick(rng, [(40, 40, 40), (230, 230, 230), (120, 70, 40)]), 10)
        for dx in (-0.09, 0.09):
            d.ellipse([x + (dx - 0.07) * u, y - u * 0.07, x + (dx + 0.07) * u, y], fill=c)
    elif kind == "plant":
        d.polygon([(x - u * 0.1, y), (x + u * 0.1, y), (x + u * 0.13, y - u * 0.18), (x - u * 0.13, y - u * 0.18)],
                  fill=(150, 90, 60))
        d.ellipse([x - u * 0.18, y - u * 0.5, x + u * 0.18, y - u * 0.15], fill=_jitter(rng, (50, 140, 60), 20))
    elif kind == "bucket":
        c = _jitter(rng, _pick(rng, [(60, 110, 200), (230, 230, 230), (90, 160, 90)]), 12)
        d.polygon([(x - u * 0.1, y), (x + u * 0.1, y), (x + u * 0.13, y - u * 0.22), (x - u * 0.13, y - u * 0.22)],
                  fill=c, outline=(40, 40, 40))
    else:
        raise ValueError(f"unknown object kind {kind!r}")
    return layer


def draw_cable(rng: np.random.Generator, g: Corridor, layer: Image.Image, x: float, y: float, s: float) -> None:
    """A flying-lead charging cable from a socket on the nearer side wall, sagging to (x, y)."""
    d = ImageDraw.Draw(layer)
    left = x < g.w / 2
    t = float(np.clip(rng.uniform(0.1, 0.4), 0, 1))
    wx = g.bx0 * t if left else g.w + (g.bx1 - g.w) * t
    wy = g.h + (g.by1 - g.h) * t - g.h * 0.35 * g.scale(t)
    sock = max(3, g.w * 0.02)
    d.rectangle([wx - sock, wy - sock, wx + sock, wy + sock], fill=(250, 250, 250), outline=(30, 30, 30))
    tx, ty = x, y - s * g.w * 0.12
    pts = []
    for k in np.linspace(0, 1, 12):
        px = wx + (tx - wx) * k
        py = wy + (ty - wy) * k + np.sin(np.pi * k) * g.h * 0.08  # sag
        pts.append((px, py))
    colour = _pick(rng, [(20, 20, 20), (245, 245, 245), (240, 120, 20)])
    d.line(pts, fill=colour, width=max(2, int(g.w * 0.012)))
    mx, my = pts[6]
    d.rectangle([mx - sock, my - sock * 0.7, mx + sock, my + sock * 0.7], fill=(25, 25, 25))  # charger brick


def place(rng: np.random.Generator, g: Corridor, where: str) -> tuple[float, float, float]:
    """A floor point (x, y, scale): at a side (tidy storage) or anywhere including the centre (blocking)."""
    t = float(rng.uniform(0.05, 0.6))
    if where == "side":
        u = float(rng.uniform(0.06, 0.2)) if rng.random() < 0.5 else float(rng.uniform(0.8, 0.94))
    else:
        u = float(rng.uniform(0.15, 0.85))
    x, y = g.floor_point(t, u)
    return x, y, g.scale(t)


def corridor_scene(rng: np.random.Generator, w: int, h: int, objects: list[tuple[str, str]],
                   cable: bool = False) -> Scene:
    """A corridor holding `objects` = [(kind, "side"|"any"), ...]; `cable` ties a charging lead to the first."""
    img, g = draw_corridor(rng, w, h)
    placed = sorted(((kind, *place(rng, g, where)) for kind, where in objects), key=lambda o: o[2])  # far first
    names = []
    for i, (kind, x, y, s) in enumerate(placed):
        layer = draw_object(rng, kind, w, h, x, y, s)
        if cable and kind in HAZARDS and "cable" not in names:
            draw_cable(rng, g, layer, x, y, s)
            names.append("cable")
        img.paste(layer, (0, 0), layer)
        names.append(kind)
    _, fy = g.floor_point(0.85, 0)
    return Scene(img, "corridor", names, floor=(0, int(fy), w, h))


def outdoor_scene(rng: np.random.Generator, w: int, h: int) -> Scene:
    img = Image.new("RGB", (w, h))
    d = ImageDraw.Draw(img)
    horizon = int(h * rng.uniform(0.45, 0.65))
    top, bottom = np.array(_jitter(rng, (110, 160, 225), 25)), np.array((215, 230, 245))
    for yy in range(horizon):
        d.line([(0, yy), (w, yy)], fill=tuple(int(v) for v in top + (bottom - top) * yy / horizon))
    d.rectangle([0, horizon, w, h], fill=_jitter(rng, _pick(rng, [(90, 150, 70), (150, 150, 145), (170, 150, 110)])))
    for _ in range(int(rng.integers(1, 4))):  # buildings with windows
        bx = rng.uniform(0, w * 0.8)
        bw_, bh_ = rng.uniform(w * 0.12, w * 0.3), rng.uniform(h * 0.15, h * 0.4)
        c = _jitter(rng, (180, 170, 160), 30)
        d.rectangle([bx, horizon - bh_, bx + bw_, horizon], fill=c)
        for wy in np.arange(horizon - bh_ + 6, horizon - 6, 10):
            for wx in np.arange(bx + 4, bx + bw_ - 4, 9):
                d.rectangle([wx, wy, wx + 4, wy + 4], fill=(90, 110, 140))
    for _ in range(int(rng.integers(1, 5))):  # trees
        tx, ty = rng.uniform(0, w), horizon + rng.uniform(0, h * 0.2)
        r = rng.uniform(w * 0.04, w * 0.09)
        d.rectangle([tx - r * 0.15, ty - r, tx + r * 0.15, ty + r * 0.6], fill=(100, 70, 40))
        d.ellipse([tx - r, ty - r * 2.4, tx + r, ty - r * 0.5], fill=_jitter(rng, (40, 120, 50), 25))
    return Scene(img, "outdoor")


def room_scene(rng: np.random.Generator, w: int, h: int) -> Scene:
    img = Image.new("RGB", (w, h))
    d = ImageDraw.Draw(img)
    horizon = int(h * rng.uniform(0.55, 0.7))
    d.rectangle([0, 0, w, horizon], fill=_jitter(rng, _pick(rng, WALL_COLOURS)))
    d.rectangle([0, horizon, w, h], fill=_jitter(rng, (150, 115, 80), 25))  # wooden floor
    wx = rng.uniform(w * 0.1, w * 0.6)
    d.rectangle([wx, h * 0.12, wx + w * 0.3, h * 0.42], fill=(170, 210, 240), outline=(240, 240, 240), width=3)
    furniture = _pick(rng, ["bed", "sofa", "table"])
    fx = rng.uniform(w * 0.1, w * 0.55)
    c = _jitter(rng, _pick(rng, [(200, 60, 60), (80, 90, 160), (120, 160, 120), (220, 200, 160)]), 20)
    if furniture == "bed":
        d.rectangle([fx, horizon - h * 0.05, fx + w * 0.45, horizon + h * 0.18], fill=c)
        d.rectangle([fx, horizon - h * 0.05, fx + w * 0.12, horizon + h * 0.05], fill=(245, 245, 245))
    elif furniture == "sofa":
        d.rectangle([fx, horizon - h * 0.12, fx + w * 0.42, horizon + h * 0.12], fill=c)
        d.rectangle([fx + w * 0.03, horizon - h * 0.02, fx + w * 0.39, horizon + h * 0.06],
                    fill=tuple(int(v * 0.8) for v in c))
    else:
        d.rectangle([fx, horizon - h * 0.02, fx + w * 0.35, horizon + h * 0.02], fill=(130, 90, 55))
        for lx in (fx + 4, fx + w * 0.35 - 8):
            d.rectangle([lx, horizon, lx + 4, horizon + h * 0.15], fill=(110, 75, 45))
    return Scene(img, "room")


def finish(rng: np.random.Generator, img: Image.Image) -> Image.Image:
    """Camera effects: exposure, a little blur and sensor noise."""
    arr = np.asarray(img, dtype=np.float32) * rng.uniform(0.7, 1.2)
    arr += rng.normal(0, rng.uniform(2, 7), arr.shape)
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if rng.random() < 0.3:
        out = out.filter(ImageFilter.GaussianBlur(radius=0.6))
    return out
