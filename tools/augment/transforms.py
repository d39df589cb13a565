r"""VL-ADAS transforms: pure functions on RGB uint8 arrays already at the model's size (tools.augment.images).

  geometric  one affine warp: horizontal flip, crop, zoom, rotation. The crop and the zoom together keep
             at least `crop_keep` (0.85) of each side of the frame: hazards are often small or at the edge.
  colour     HSV jitter that keeps hazard colours: a pixel whose hue lies in a hazard band and which is
             chromatic enough (S ≥ 0.45, V ≥ 0.25) keeps its hue exactly (to the 2° of OpenCV's 8-bit hue);
             its saturation and value still move. Other pixels' hue moves, except that a chromatic pixel is
             never moved *into* a hazard band (no fake warning colours). The bands are the config's
             `hazard_hues_deg` ± `hazard_hue_halfwidth_deg` (15°), merged: by default warning red/orange/yellow
             345°–65° and the blue of many e-bike frames and battery packs 208°–238°.
  padding    pad to a target aspect ratio; the mode of each padded side comes from the strip of image along
             that side (see pad_mode_for): uniform (mean channel std ≤ 10) and very dark (luma ≤ 40) or very
             bright (luma ≥ 215) → constant with the strip's mean colour; uniform otherwise → edge
             replication; textured or structured (std > 10) → reflection. Padding lands directly on the
             model's size for the padded shape, so the model never resizes an augmented image.
  insert     hazard-region insertion: an RGBA cut-out (e-bike, battery) pasted, scaled by depth, inside the
             floor band (the lower `floor_band` = 45 % of the image) of a 无风险 or 低风险 image, with a
             soft contact shadow. This is the only transform that changes the label: it becomes 高风险.

Randomness: apply_transforms draws each transform's numbers from its own stream of one job seed, so switching
one transform off leaves the others' numbers unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from tools.augment.images import DEFAULT_MAX_PIXELS, resize_to
from tools.data.images import model_size
from tools.task import HIGH_RISK

TRANSFORMS = ("insert", "geometric", "colour", "padding")  # application order


@dataclass(frozen=True)
class AugmentConfig:
    # which transforms a job gets (the plan draws each independently; a plain job gets at least one)
    p_geometric: float = 0.9
    p_colour: float = 0.8
    p_padding: float = 0.3
    # geometric
    hflip_prob: float = 0.5
    crop_keep: float = 0.85  # minimum kept fraction of each side, crop and zoom-in together
    scale_range: tuple[float, float] = (0.9, 1.1)  # zoom; > 1 zooms in (bounded by crop_keep)
    max_rotation_deg: float = 7.0
    # colour (HSV)
    hue_shift_deg: float = 10.0  # uniform in ±this, applied to non-hazard pixels
    saturation_range: tuple[float, float] = (0.7, 1.3)
    value_range: tuple[float, float] = (0.75, 1.25)
    # Hazard hues (degrees): warning red, orange and yellow, and blue; the demo draws its hazards in these.
    hazard_hues_deg: tuple[float, ...] = (0.0, 27.3, 50.2, 223.3)
    hazard_hue_halfwidth_deg: float = 15.0
    hazard_min_saturation: float = 0.45  # chromatic enough to count as a hazard colour (fraction of 1)
    hazard_min_value: float = 0.25
    # padding
    pad_aspects: tuple[float, ...] = (1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16)  # width / height targets
    pad_min_fraction: float = 0.05  # a target must add at least this share of the padded side ...
    pad_max_fraction: float = 0.35  # ... and at most this (reflection mirrors content); else +10-30 % at random
    pad_strip: float = 0.03  # width of the border strip that decides the mode, as a share of the side
    pad_uniform_std: float = 10.0  # mean per-channel std at or below which a strip is "uniform"
    pad_dark: float = 40.0  # uniform strip with luma ≤ this → constant fill
    pad_bright: float = 215.0  # uniform strip with luma ≥ this → constant fill
    # insertion
    floor_band: float = 0.45  # the floor region: the lower 45 % of the image
    insert_width: tuple[float, float] = (0.15, 0.35)  # cut-out width as a share of image width, nearest
    insert_far_scale: float = 0.55  # at the top of the floor band the cut-out is this much smaller
    insert_shadow: float = 0.35  # darkening of the contact shadow under the object (0 = none)
    # output
    jpeg_quality: int = 90



# --------------------------------------------------------------------------- geometric
@dataclass(frozen=True)
class GeometricParams:
    flip: bool
    keep: float  # side fraction of the crop window
    x0: float  # crop window origin, pixels
    y0: float
    scale: float  # zoom about the centre after the crop; > 1 zooms in
    angle: float  # degrees, counter-clockwise

    @property
    def visible_fraction(self) -> float:
        """Share of each side of the original frame that the output still shows (rotation aside)."""
        return self.keep / max(self.scale, 1.0)


def sample_geometric(rng: np.random.Generator, width: int, height: int, cfg: AugmentConfig) -> GeometricParams:
    keep = float(rng.uniform(cfg.crop_keep, 1.0))
    x0 = float(rng.uniform(0, (1 - keep) * width))
    y0 = float(rng.uniform(0, (1 - keep) * height))
    lo, hi = cfg.scale_range
    scale = float(rng.uniform(lo, hi)) if hi > lo else float(lo)
    scale = min(scale, keep / cfg.crop_keep)  # zoom-in and crop together keep ≥ crop_keep of each side
    angle = float(rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg)) if cfg.max_rotation_deg > 0 else 0.0
    flip = bool(rng.random() < cfg.hflip_prob)
    return GeometricParams(flip, keep, x0, y0, scale, angle)


def geometric_matrix(p: GeometricParams, width: int, height: int) -> np.ndarray:
    """The 2×3 source→output matrix: crop window → full frame, flip, then zoom and rotate about the centre."""
    crop = np.array([[1 / p.keep, 0, -p.x0 / p.keep], [0, 1 / p.keep, -p.y0 / p.keep], [0, 0, 1]])
    flip = np.array([[-1, 0, width - 1], [0, 1, 0], [0, 0, 1]]) if p.flip else np.eye(3)
    rot = np.vstack([cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), p.angle, p.scale), [0, 0, 1]])
    return (rot @ flip @ crop)[:2]


def apply_geometric(img: np.ndarray, p: GeometricParams) -> np.ndarray:
    """One warp, same output size; what the rotation or a zoom-out uncovers is filled by reflection."""
    h, w = img.shape[:2]
    m = geometric_matrix(p, w, h)
    if np.allclose(m, [[1, 0, 0], [0, 1, 0]]):
        return img.copy()
    # OpenCV's 4-channel warp is vectorised and the 3-channel one is not: the same bytes, ~30 % faster
    # including the two conversions.
    rgba = cv2.cvtColor(img, cv2.COLOR_RGB2RGBA)
    out = cv2.warpAffine(rgba, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    return cv2.cvtColor(out, cv2.COLOR_RGBA2RGB)


def random_geometric(img: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    return apply_geometric(img, sample_geometric(rng, img.shape[1], img.shape[0], cfg))


# --------------------------------------------------------------------------- colour
def hazard_hue_bands(hues: Sequence[float], halfwidth_deg: float) -> list[tuple[float, float]]:
    """Merged hue intervals (degrees; lo may be negative = wrapping through red) of hazard colours."""
    spans = sorted((h % 360 - halfwidth_deg, h % 360 + halfwidth_deg) for h in hues)
    merged: list[list[float]] = []
    for lo, hi in spans:
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return [(round(lo, 1), round(hi, 1)) for lo, hi in merged]


def _in_bands(hue_deg: np.ndarray, bands) -> np.ndarray:
    out = np.zeros(hue_deg.shape, dtype=bool)
    for lo, hi in bands:
        out |= ((hue_deg - lo) % 360) <= (hi - lo)
    return out


def hazard_mask(img: np.ndarray, cfg: AugmentConfig = AugmentConfig()) -> np.ndarray:
    """Pixels whose hue is protected: in a hazard band and chromatic enough (bool H×W)."""
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    band_lut = _band_lut(cfg)
    lo = (0, math.ceil(cfg.hazard_min_saturation * 255), math.ceil(cfg.hazard_min_value * 255))
    chroma = cv2.inRange(hsv, lo, (255, 255, 255)) > 0
    return chroma & (band_lut[hsv[..., 0]] > 0)


def _band_lut(cfg: AugmentConfig) -> np.ndarray:
    """256-entry table over OpenCV's 8-bit hue (0..179, 2° a step): 255 where the hue is in a hazard band."""
    idx = np.arange(256)
    inside = _in_bands(idx * 2.0, hazard_hue_bands(cfg.hazard_hues_deg, cfg.hazard_hue_halfwidth_deg)) & (idx < 180)
    return np.where(inside, 255, 0).astype(np.uint8)


def apply_colour(img: np.ndarray, hue_shift_deg: float, sat_scale: float, val_scale: float,
                 cfg: AugmentConfig = AugmentConfig()) -> np.ndarray:
    """HSV jitter with hazard hues held (see the module docstring). Deterministic."""
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    h, s, v = cv2.split(hsv)
    idx = np.arange(256)
    dh = int(round(hue_shift_deg / 2))  # 8-bit hue is in 2° steps
    shifted = np.where(idx < 180, (idx + dh) % 180, idx)
    band = _band_lut(cfg) > 0
    # chromatic pixels: a hazard hue stays; a shift that would land in a hazard band is not made
    lut_chroma = np.where(band[idx] | band[shifted], idx, shifted).astype(np.uint8)
    lo = (0, math.ceil(cfg.hazard_min_saturation * 255), math.ceil(cfg.hazard_min_value * 255))
    chroma = cv2.inRange(hsv, lo, (255, 255, 255))
    h_new = cv2.LUT(h, shifted.astype(np.uint8))
    cv2.copyTo(cv2.LUT(h, lut_chroma), chroma, h_new)
    s_new = cv2.LUT(s, np.clip(np.round(idx * sat_scale), 0, 255).astype(np.uint8))
    v_new = cv2.LUT(v, np.clip(np.round(idx * val_scale), 0, 255).astype(np.uint8))
    return cv2.cvtColor(cv2.merge([h_new, s_new, v_new]), cv2.COLOR_HSV2RGB)


def random_colour(img: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    dh = float(rng.uniform(-cfg.hue_shift_deg, cfg.hue_shift_deg))
    return apply_colour(img, dh, float(rng.uniform(*cfg.saturation_range)), float(rng.uniform(*cfg.value_range)), cfg)

# --------------------------------------------------------------------------- padding
def pad_mode_for(strip: np.ndarray, cfg: AugmentConfig = AugmentConfig()) -> tuple[str, tuple[int, int, int] | None]:
    """The padding rule, on the strip of image along the side to pad:
    mean per-channel std ≤ pad_uniform_std and luma ≤ pad_dark or ≥ pad_bright → ("constant", mean colour);
    std ≤ pad_uniform_std otherwise → ("edge", None); std above it (texture, lines) → ("reflect", None)."""
    mean, std = cv2.meanStdDev(np.ascontiguousarray(strip))
    mean = mean.reshape(3)
    luma = float(mean @ np.array([0.299, 0.587, 0.114]))
    if float(std.mean()) <= cfg.pad_uniform_std:
        if luma <= cfg.pad_dark or luma >= cfg.pad_bright:
            return "constant", tuple(int(round(c)) for c in mean)  # type: ignore[return-value]
        return "edge", None
    return "reflect", None


_BORDER = {"edge": cv2.BORDER_REPLICATE, "reflect": cv2.BORDER_REFLECT_101, "constant": cv2.BORDER_CONSTANT}


def pad_to_aspect(img: np.ndarray, aspect: float, cfg: AugmentConfig = AugmentConfig(), split: float = 0.5,
                  max_pixels: int | None = None) -> tuple[np.ndarray, dict[str, str]]:
    """Pad to width/height = aspect; `split` is the share of the padding put before (left or top). Returns
    the image and the mode used on each padded side (decided on the input's border strips).

    Without max_pixels the aspect is met to the nearest pixel. With it the result is at the model's size
    for the padded shape (tools.data.images.model_size, as swift resizes), so the aspect is met to
    that rounding: the content is resized first and then padded, one resampling and no full-size copy."""
    h, w = img.shape[:2]
    horizontal = w / h < aspect
    sw = max(2, int(round(cfg.pad_strip * (w if horizontal else h))))
    strips = {"left": img[:, :sw], "right": img[:, w - sw:], "top": img[:sw], "bottom": img[h - sw:]}
    ph, pw = (h, round(h * aspect)) if horizontal else (round(w / aspect), w)  # padded size
    if max_pixels:
        th, tw = model_size(ph, pw, max_pixels)
        ch, cw = (th, min(tw, max(1, round(w * th / h)))) if horizontal else (min(th, max(1, round(h * tw / w))), tw)
        img = resize_to(img, ch, cw)
        total = (tw - cw) if horizontal else (th - ch)
    else:
        total = (pw - w) if horizontal else (ph - h)
    if total <= 0:
        return img.copy(), {}
    before = int(round(total * split))
    amounts = {"left": before, "right": total - before} if horizontal else {"top": before, "bottom": total - before}
    plan = {side: pad_mode_for(strips[side], cfg) for side, amount in amounts.items() if amount > 0}
    out = img
    if len(set(plan.values())) == 1:  # one mode for both sides: one copy
        mode, colour = next(iter(plan.values()))
        groups = [(amounts, mode, colour)]
    else:
        groups = [({side: amounts[side]}, *plan[side]) for side in plan]
    for sides, mode, colour in groups:
        out = cv2.copyMakeBorder(out, sides.get("top", 0), sides.get("bottom", 0), sides.get("left", 0),
                                 sides.get("right", 0), _BORDER[mode], value=colour or (0, 0, 0))
    return out, {side: mode for side, (mode, _) in plan.items()}


def choose_pad_aspect(width: int, height: int, rng: np.random.Generator, cfg: AugmentConfig) -> float:
    """A target from cfg.pad_aspects that adds between pad_min_fraction and pad_max_fraction of the padded
    side; if none does, the current aspect widened or heightened by 10-30 %."""
    a = width / height
    added = {t: (t / a if t > a else a / t) - 1 for t in cfg.pad_aspects}  # share added to the padded side
    cands = [t for t, f in added.items() if cfg.pad_min_fraction <= f <= cfg.pad_max_fraction]
    if cands:
        return float(cands[int(rng.integers(len(cands)))])
    u = float(rng.uniform(0.1, 0.3))
    return a * (1 + u) if rng.random() < 0.5 else a / (1 + u)


def random_padding(img: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig,
                   max_pixels: int | None = None) -> np.ndarray:
    aspect = choose_pad_aspect(img.shape[1], img.shape[0], rng, cfg)
    return pad_to_aspect(img, aspect, cfg, split=float(rng.uniform(0, 1)), max_pixels=max_pixels)[0]

# --------------------------------------------------------------------------- insertion
def floor_region(height: int, width: int, cfg: AugmentConfig = AugmentConfig()) -> tuple[int, int, int, int]:
    """The floor band (x0, y0, x1, y1): the lower cfg.floor_band of the image."""
    return 0, int(round(height * (1 - cfg.floor_band))), width, height


def insert_hazard(img: np.ndarray, cutout: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig(),
                  region: tuple[int, int, int, int] | None = None) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Paste an RGBA cut-out standing on the floor. Returns the image and the cut-out's box (x0, y0, x1, y1).

    Everything changed (object and shadow) lies inside `region` (default: floor_region). Depth d in [0, 1]
    puts the object's foot from the band's bottom (d=0, full size: insert_width of the image width) to its
    top (d=1, insert_far_scale of that), as in a one-point perspective; it is shrunk to fit the band. The
    object is mirrored at random and its brightness follows the floor under it (gain luma/140 in 0.75-1.1).
    """
    if cutout.ndim != 3 or cutout.shape[2] != 4:
        raise ValueError("a cut-out must be RGBA")
    H, W = img.shape[:2]
    rx0, ry0, rx1, ry1 = region or floor_region(H, W, cfg)
    bw, bh = rx1 - rx0, ry1 - ry0
    if bw < 2 or bh < 2:
        raise ValueError(f"floor region {region} too small")
    ch, cw = cutout.shape[:2]
    depth = float(rng.uniform(0, 1))
    width = W * float(rng.uniform(*cfg.insert_width)) * (1 - (1 - cfg.insert_far_scale) * depth)
    width = min(width, bw)
    height = width * ch / cw
    if height > 0.95 * bh:
        height = 0.95 * bh
        width = height * cw / ch
    ow, oh = max(1, min(bw, int(round(width)))), max(1, min(bh, int(round(height))))
    y1 = ry1 - int(round(depth * (bh - oh)))
    y0 = y1 - oh
    x0 = int(rng.integers(rx0, rx1 - ow + 1))
    flip = bool(rng.random() < 0.5)

    obj = cutout[:, ::-1] if flip else cutout
    alpha = obj[..., 3:4].astype(np.float32) / 255
    premult = obj[..., :3].astype(np.float32) * alpha  # premultiplied: no dark fringe when resizing
    interp = cv2.INTER_AREA if ow < cw else cv2.INTER_LINEAR
    premult = cv2.resize(premult, (ow, oh), interpolation=interp).reshape(oh, ow, 3)
    alpha = cv2.resize(alpha, (ow, oh), interpolation=interp).reshape(oh, ow, 1)

    out = img.copy()
    if cfg.insert_shadow > 0:  # a soft ellipse under the foot, clipped to the region
        sh = max(2, int(round(0.06 * oh)))
        top, bottom = max(ry0, y1 - sh), min(ry1, y1 + sh)
        left, right = max(rx0, x0 - ow // 10), min(rx1, x0 + ow + ow // 10)
        mask = np.zeros((bottom - top, right - left), np.float32)
        cv2.ellipse(mask, (x0 + ow // 2 - left, y1 - 1 - top), (max(1, int(ow * 0.45)), sh), 0, 0, 360, 1.0, -1)
        mask = cv2.GaussianBlur(mask, (0, 0), max(1.0, sh / 2))
        patch = out[top:bottom, left:right].astype(np.float32)
        shade = 1 - cfg.insert_shadow * mask[..., None]
        out[top:bottom, left:right] = np.clip(patch * shade, 0, 255).astype(np.uint8)
    bg = out[y0:y1, x0:x0 + ow].astype(np.float32)
    luma = float((bg @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).mean())
    gain = float(np.clip(luma / 140.0, 0.75, 1.1))
    out[y0:y1, x0:x0 + ow] = np.clip(premult * gain + bg * (1 - alpha), 0, 255).astype(np.uint8)
    return out, (x0, y0, x0 + ow, y1)

# --------------------------------------------------------------------------- a job's transforms
def label_after(label: str, transforms: Sequence[str]) -> str:
    """The label of an augmented copy: 高风险 when a hazard was inserted, else the original's."""
    return HIGH_RISK if "insert" in transforms else label


def job_streams(seed: int) -> dict[str, np.random.Generator]:
    """Independent generators per transform, so switching one transform off leaves the others' numbers."""
    names = (*TRANSFORMS, "plan", "cutout")
    children = np.random.SeedSequence(seed).spawn(len(names))
    return {name: np.random.default_rng(ss) for name, ss in zip(names, children)}


def apply_transforms(img: np.ndarray, transforms: Sequence[str], seed: int, cfg: AugmentConfig = AugmentConfig(),
                     cutout: np.ndarray | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Apply `transforms` (in TRANSFORMS order) to an image already at the model's size; the result is at the
    model's size again (only padding changes the size). Deterministic in `seed`."""
    unknown = set(transforms) - set(TRANSFORMS)
    if unknown:
        raise ValueError(f"unknown transform(s) {sorted(unknown)}; known: {TRANSFORMS}")
    rng = job_streams(seed)
    out = img
    if "insert" in transforms:
        if cutout is None:
            raise ValueError("insert needs a cut-out")
        out, _ = insert_hazard(out, cutout, rng["insert"], cfg)
    if "geometric" in transforms:
        out = random_geometric(out, rng["geometric"], cfg)
    if "colour" in transforms:
        out = random_colour(out, rng["colour"], cfg)
    if "padding" in transforms:
        out = random_padding(out, rng["padding"], cfg, max_pixels)
    return out if out is not img else img.copy()

