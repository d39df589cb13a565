r"""VL-ADAS: label-aware augmentation of the training split (pure functions, a plan, a runner, a filter).

    python -m tools.augment --list fit.txt --images /data/ele/train --out-dir outputs/augment \
        --cutouts data/demo/cutouts --contact-sheet outputs/augment/contact.png

Pass the *training* part of the split only: augmented copies of validation images would leak into training.

Transforms (every function takes and returns an RGB uint8 array of shape H×W×3):
  geometric  one affine warp: horizontal flip, crop, zoom, rotation. The crop and the zoom together keep
             at least `crop_keep` (0.85) of each side of the frame: hazards are often small or at the edge.
  colour     HSV jitter that keeps hazard colours: a pixel whose hue lies in a hazard band and which is
             chromatic enough (S ≥ 0.45, V ≥ 0.25) keeps its hue exactly (to the 2° of OpenCV's 8-bit hue);
             its saturation and value still move. Other pixels' hue moves, except that a chromatic pixel is
             never moved *into* a hazard band (no fake warning colours). The bands come from
             tools.scenes.HAZARD_COLOURS (hues 0°, 27°, 50°, 223°) ± `hazard_hue_halfwidth_deg` (15°), merged:
             warning red/orange/yellow 345°–65° and e-bike/battery blue 208°–238° (see HAZARD_HUE_BANDS).
  padding    pad to a target aspect ratio; the mode of each padded side comes from the strip of image along
             that side (see pad_mode_for): uniform (mean channel std ≤ 10) and very dark (luma ≤ 40) or very
             bright (luma ≥ 215) → constant with the strip's mean colour; uniform otherwise → edge
             replication; textured or structured (std > 10) → reflection.
  insert     hazard-region insertion: an RGBA cut-out (e-bike, battery) pasted, scaled by depth, inside the
             floor band (the lower `floor_band` = 45 % of the image) of a 无风险 or 低风险 image, with a
             soft contact shadow. This is the only transform that changes the label: it becomes 高风险.

Every image is first resized to the model's size (Qwen2.5-VL's smart_resize: sides multiples of 28, area ≤
max_pixels, aspect kept); padding lands directly on that rule for the padded shape, so the model never
resizes an augmented image. Randomness: each job's numbers come from numpy SeedSequence(seed, image name,
copy index), so the same seed gives the same bytes whatever the number of worker processes.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Mapping, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from tools.dataset import DataError, Sample, read_list, write_list
from tools.scenes import HAZARD_COLOURS
from tools.task import HIGH_RISK, LABELS, LABEL_TO_INDEX

# Extra copies per original, by label (0 = no extra copy). Chosen for the real class shares (无风险 ~59 %,
# 中风险 ~19 %, 低风险 ~14 %, 高风险 ~5 %, 非楼道 ~3 %): 高风险 ends at 11× and 非楼道 at 5× their originals.
# A fraction gives that share of the originals one more copy (a seeded choice).
DEFAULT_MULTIPLIERS: dict[str, float] = {"高风险": 10, "中风险": 0, "低风险": 0, "无风险": 0, "非楼道": 4}
INSERT_SOURCES = ("无风险", "低风险")  # images a hazard may be pasted into
INSERT_PER_HIGH = 2.0  # default insertion jobs per 高风险 original, when cut-outs are given
TRANSFORMS = ("insert", "geometric", "colour", "padding")  # application order
DEFAULT_MAX_PIXELS = 1003520  # 1,280 visual tokens of 28×28, as recipes/real.env
MIN_PIXELS = 3136  # Qwen2.5-VL's processor minimum (56×56)
PATCH_FACTOR = 28  # 14-pixel patches, 2×2 merge
LABEL_ASCII = {"高风险": "high", "中风险": "medium", "低风险": "low", "无风险": "none", "非楼道": "not-corridor"}
LIST_NAME = "augmented.txt"


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


# --------------------------------------------------------------------------- sizes, decode, encode
def smart_resize(height: int, width: int, max_pixels: int = DEFAULT_MAX_PIXELS, min_pixels: int = MIN_PIXELS,
                 factor: int = PATCH_FACTOR) -> tuple[int, int]:
    """(height, width) as Qwen2.5-VL resizes: sides multiples of `factor`, min_pixels ≤ area ≤ max_pixels."""
    if min(height, width) < 1:
        raise ValueError(f"empty image {width}x{height}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio over 200: {width}x{height}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resize_to(img: np.ndarray, height: int, width: int) -> np.ndarray:
    h, w = img.shape[:2]
    if (h, w) == (height, width):
        return img
    shrink = min(h / height, w / width)
    # Area averaging only where bilinear would alias: it costs ~6× more at small non-integer factors.
    interp = cv2.INTER_AREA if shrink >= 1.5 else cv2.INTER_LINEAR if shrink >= 1 else cv2.INTER_CUBIC
    return cv2.resize(img, (width, height), interpolation=interp)


def resize_for_model(img: np.ndarray, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    return resize_to(img, *smart_resize(*img.shape[:2], max_pixels=max_pixels))


def decode_image(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """RGB uint8. EXIF orientation is ignored, as swift's loader (PIL, no exif_transpose) ignores it, so an
    augmented copy is oriented as the model sees the original. With max_pixels, a large JPEG is decoded at
    1/2, 1/4 or 1/8 scale in the DCT (much faster) when that still leaves at least the model's size."""
    data = np.fromfile(str(path), dtype=np.uint8)
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    if max_pixels and data[:2].tobytes() == b"\xff\xd8":
        try:
            from PIL import Image

            with Image.open(io.BytesIO(data.tobytes())) as im:
                w, h = im.size  # header only
            th, tw = smart_resize(h, w, max_pixels=max_pixels)
            for r, flag in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                            (2, cv2.IMREAD_REDUCED_COLOR_2)):
                if h // r >= th and w // r >= tw:
                    flags = flag | cv2.IMREAD_IGNORE_ORIENTATION
                    break
        except Exception:
            pass
    bgr = cv2.imdecode(data, flags)
    if bgr is None:  # a format OpenCV lacks: PIL, as swift would
        from PIL import Image

        with Image.open(io.BytesIO(data.tobytes())) as im:
            return np.ascontiguousarray(np.asarray(im.convert("RGB")))
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode and resize to the model's size: the input of every transform in the pipeline."""
    return resize_for_model(decode_image(path, max_pixels), max_pixels)


def encode_jpeg(img: np.ndarray, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def load_cutout(path: str | os.PathLike) -> np.ndarray:
    """An RGBA uint8 cut-out (any PNG PIL reads; without transparency it would paste as a rectangle)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.ascontiguousarray(np.asarray(im.convert("RGBA")))


def list_cutouts(folder: str | os.PathLike) -> list[Path]:
    found = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() == ".png")
    if not found:
        raise DataError(f"{folder}: no PNG cut-outs")
    return found


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
def _rgb_hue_deg(rgb) -> float:
    r, g, b = (c / 255 for c in rgb)
    mx, mn = max(r, g, b), min(r, g, b)
    if mx == mn:
        return 0.0
    if mx == r:
        h = 60 * ((g - b) / (mx - mn))
    elif mx == g:
        h = 60 * ((b - r) / (mx - mn)) + 120
    else:
        h = 60 * ((r - g) / (mx - mn)) + 240
    return h % 360


HAZARD_HUES_DEG: tuple[float, ...] = tuple(round(_rgb_hue_deg(c), 1) for c in HAZARD_COLOURS)


def hazard_hue_bands(halfwidth_deg: float = 15.0, hues: Sequence[float] = HAZARD_HUES_DEG) -> list[tuple[float, float]]:
    """Merged hue intervals (degrees; lo may be negative = wrapping through red) of hazard colours."""
    spans = sorted((h % 360 - halfwidth_deg, h % 360 + halfwidth_deg) for h in hues)
    merged: list[list[float]] = []
    for lo, hi in spans:
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return [(round(lo, 1), round(hi, 1)) for lo, hi in merged]


HAZARD_HUE_BANDS = hazard_hue_bands()  # [(-15.0, 65.2), (208.3, 238.3)] with the scene palette


def _in_bands(hue_deg: np.ndarray, bands) -> np.ndarray:
    out = np.zeros(hue_deg.shape, dtype=bool)
    for lo, hi in bands:
        out |= ((hue_deg - lo) % 360) <= (hi - lo)
    return out


def hazard_mask(img: np.ndarray, cfg: AugmentConfig = AugmentConfig()) -> np.ndarray:
    """Pixels whose hue is protected: in a hazard band and chromatic enough (bool H×W)."""
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    band_lut = _band_lut(cfg.hazard_hue_halfwidth_deg)
    lo = (0, math.ceil(cfg.hazard_min_saturation * 255), math.ceil(cfg.hazard_min_value * 255))
    chroma = cv2.inRange(hsv, lo, (255, 255, 255)) > 0
    return chroma & (band_lut[hsv[..., 0]] > 0)


def _band_lut(halfwidth_deg: float) -> np.ndarray:
    """256-entry table over OpenCV's 8-bit hue (0..179, 2° a step): 255 where the hue is in a hazard band."""
    idx = np.arange(256)
    inside = _in_bands(idx * 2.0, hazard_hue_bands(halfwidth_deg)) & (idx < 180)
    return np.where(inside, 255, 0).astype(np.uint8)


def apply_colour(img: np.ndarray, hue_shift_deg: float, sat_scale: float, val_scale: float,
                 cfg: AugmentConfig = AugmentConfig()) -> np.ndarray:
    """HSV jitter with hazard hues held (see the module docstring). Deterministic."""
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    h, s, v = cv2.split(hsv)
    idx = np.arange(256)
    dh = int(round(hue_shift_deg / 2))  # 8-bit hue is in 2° steps
    shifted = np.where(idx < 180, (idx + dh) % 180, idx)
    band = _band_lut(cfg.hazard_hue_halfwidth_deg) > 0
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
    for the padded shape (smart_resize: sides multiples of 28, area ≤ max_pixels), so the aspect is met to
    that rounding: the content is resized first and then padded, one resampling and no full-size copy."""
    h, w = img.shape[:2]
    horizontal = w / h < aspect
    sw = max(2, int(round(cfg.pad_strip * (w if horizontal else h))))
    strips = {"left": img[:, :sw], "right": img[:, w - sw:], "top": img[:sw], "bottom": img[h - sw:]}
    ph, pw = (h, round(h * aspect)) if horizontal else (round(w / aspect), w)  # padded size
    if max_pixels:
        th, tw = smart_resize(ph, pw, max_pixels=max_pixels)
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


def _streams(seed: int) -> dict[str, np.random.Generator]:
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
    rng = _streams(seed)
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


# --------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class AugmentJob:
    sample: Sample  # the original
    copy: int  # k in <stem>_aug<k>.jpg, 1-based, unique per original
    seed: int  # from (plan seed, original name, copy) via SeedSequence: every copy differs
    transforms: tuple[str, ...]
    cutout: str | None = None  # cut-out path, insertion jobs only
    stem: str = ""  # output stem (the original's, made unique in the plan)

    @property
    def label(self) -> str:
        return label_after(self.sample.label, self.transforms)

    @property
    def out_name(self) -> str:
        return f"{self.stem or Path(self.sample.name).stem}_aug{self.copy}.jpg"


def job_seed(seed: int, name: str, copy: int) -> int:
    key = int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little")
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, key & 0xFFFFFFFF, key >> 32, int(copy)])
    return int(ss.generate_state(1, np.uint64)[0])


def _choose_transforms(seed: int, cfg: AugmentConfig, insert: bool) -> tuple[str, ...]:
    rng = _streams(seed)["plan"]
    draws = {"geometric": rng.random() < cfg.p_geometric, "colour": rng.random() < cfg.p_colour,
             "padding": rng.random() < cfg.p_padding}
    chosen = [t for t in TRANSFORMS[1:] if draws[t]]
    if insert:
        return ("insert", *chosen)
    return tuple(chosen) or ("geometric",)


def _spread(n_items: int, n_extra: int, rng: np.random.Generator) -> list[int]:
    """n_extra copies over n_items originals as evenly as possible; the remainder goes to a seeded choice."""
    if n_items == 0 or n_extra <= 0:
        return [0] * n_items
    base, rest = divmod(n_extra, n_items)
    counts = [base] * n_items
    for i in rng.permutation(n_items)[:rest]:
        counts[int(i)] += 1
    return counts


def _unique_stems(samples: Sequence[Sample]) -> dict[str, str]:
    stems: dict[str, str] = {}
    used: set[str] = set()
    for s in samples:
        stem = Path(s.name).stem
        if stem in used:  # a.jpg and a.png: keep both apart, deterministically
            stem = Path(s.name).name.replace(".", "_")
            k = 2
            while stem in used:
                stem, k = f"{Path(s.name).name.replace('.', '_')}_{k}", k + 1
        used.add(stem)
        stems[s.name] = stem
    return stems


def plan_augmentation(samples: Sequence[Sample], multipliers: Mapping[str, float] | None = None,
                      targets: Mapping[str, int] | None = None, *, seed: int = 0,
                      config: AugmentConfig = AugmentConfig(), cutouts: str | os.PathLike | Sequence | None = None,
                      n_insert: int | None = None) -> list[AugmentJob]:
    """The augmentation jobs for the training split `samples` (never pass validation images).

    multipliers: extra copies per original, by label (DEFAULT_MULTIPLIERS for labels not given).
    targets: total images wanted per label (originals + copies); a label in `targets` ignores its multiplier.
    cutouts: a folder of RGBA PNGs, or a list of their paths; without it there is no insertion.
    n_insert: insertion jobs (each a new 高风险 image made from a 无风险/低风险 original); default
      INSERT_PER_HIGH × the number of 高风险 originals when cut-outs are given, else 0.
    Jobs come original by original in input order (copies 1..n, insertion copies after the plain ones).
    """
    mult = dict(DEFAULT_MULTIPLIERS)
    for label, m in (multipliers or {}).items():
        if label not in LABEL_TO_INDEX:
            raise ValueError(f"unknown label {label!r} in multipliers")
        if m < 0:
            raise ValueError(f"negative multiplier for {label}: {m}")
        mult[label] = float(m)
    for label in targets or {}:
        if label not in LABEL_TO_INDEX:
            raise ValueError(f"unknown label {label!r} in targets")
    samples = list(samples)
    if any(s.label is None for s in samples):
        raise ValueError("augmentation needs labelled samples")
    names = [s.name for s in samples]
    if len(set(names)) != len(names):
        raise ValueError("duplicate sample names: pass each original once")
    plan_rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x61756720]))  # "aug "
    extra: dict[str, int] = {}
    for label in LABELS:
        members = [i for i, s in enumerate(samples) if s.label == label]
        if targets and label in targets:
            n_extra = max(0, int(targets[label]) - len(members))
        else:
            n_extra = int(round(mult[label] * len(members)))
        for i, n in zip(members, _spread(len(members), n_extra, plan_rng)):
            extra[samples[i].name] = n

    cutout_paths: list[str] = []
    if cutouts is not None:
        cutout_paths = [str(p) for p in (list_cutouts(cutouts) if isinstance(cutouts, (str, os.PathLike))
                                         else sorted(Path(p) for p in cutouts))]
    if n_insert is None:
        n_insert = int(round(INSERT_PER_HIGH * sum(s.label == HIGH_RISK for s in samples))) if cutout_paths else 0
    if n_insert and not cutout_paths:
        raise ValueError("insertion jobs need cut-outs")
    sources = [i for i, s in enumerate(samples) if s.label in INSERT_SOURCES]
    if n_insert and not sources:
        raise ValueError(f"insertion needs {'/'.join(INSERT_SOURCES)} images in the training split")
    inserts = dict.fromkeys((samples[i].name for i in sources), 0)
    for i, n in zip(sources, _spread(len(sources), n_insert, plan_rng)):
        inserts[samples[i].name] = n

    stems = _unique_stems(samples)
    jobs: list[AugmentJob] = []
    for s in samples:
        copy = 0
        for _ in range(extra[s.name]):
            copy += 1
            js = job_seed(seed, s.name, copy)
            jobs.append(AugmentJob(s, copy, js, _choose_transforms(js, config, insert=False), None, stems[s.name]))
        for _ in range(inserts.get(s.name, 0)):
            copy += 1
            js = job_seed(seed, s.name, copy)
            cut = cutout_paths[int(_streams(js)["cutout"].integers(len(cutout_paths)))]
            jobs.append(AugmentJob(s, copy, js, _choose_transforms(js, config, insert=True), cut, stems[s.name]))
    return jobs


# --------------------------------------------------------------------------- running the plan
def render_job(job: AugmentJob, cfg: AugmentConfig = AugmentConfig(), max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """The JPEG bytes of one job: decode, resize to the model's size, transforms, encode."""
    img = load_image(job.sample.path, max_pixels)
    cutout = load_cutout(job.cutout) if "insert" in job.transforms else None
    out = apply_transforms(img, job.transforms, job.seed, cfg, cutout, max_pixels)
    return encode_jpeg(out, cfg.jpeg_quality)


def _write_bytes(path: Path, data: bytes) -> None:
    """Temporary file + rename: a reader never sees half an image (no fsync per image: speed)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _run_one(job: AugmentJob, out_dir: str, cfg: AugmentConfig, max_pixels: int) -> Sample:
    path = Path(out_dir) / job.out_name
    try:
        data = render_job(job, cfg, max_pixels)
    except Exception as e:
        raise RuntimeError(f"augmenting {job.sample.path} (copy {job.copy}, {'+'.join(job.transforms)}): "
                           f"{type(e).__name__}: {e}") from e
    _write_bytes(path, data)
    return Sample(name=job.out_name, path=path, label=job.label, source=f"augment:{job.sample.source}")


def _worker_init() -> None:
    cv2.setNumThreads(1)  # one process per core already
    # glibc: keep freed image buffers in the heap. By default a fresh process hands each 3-5 MB buffer back
    # to the kernel and faults it in again on the next job: measured ~10 ms of system time per 1-MP job,
    # ~1 ms with this (~30 % of a job's CPU). Only the worker processes are tuned; elsewhere it is a no-op.
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: the glibc maximum (32 MiB)
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def run_plan(jobs: Sequence[AugmentJob], out_dir: str | os.PathLike, *, config: AugmentConfig = AugmentConfig(),
             max_pixels: int = DEFAULT_MAX_PIXELS, workers: int | None = None, chunksize: int = 8,
             progress: bool = True) -> list[Sample]:
    """Render every job into out_dir/<stem>_aug<k>.jpg; returns one Sample per job, in job order, with the
    new label and source "augment:<original source>". Bytes depend on the jobs only, not on `workers`."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    names = [j.out_name for j in jobs]
    if len(set(names)) != len(names):
        raise ValueError("two jobs write the same file: plan each original once")
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    fn = partial(_run_one, out_dir=str(out), cfg=config, max_pixels=max_pixels)
    bar = dict(total=len(jobs), desc="augmenting", disable=not progress, leave=False)
    if workers == 1:
        return [fn(j) for j in tqdm(jobs, **bar)]
    # spawn, not fork: a forked child can inherit OpenCV's thread pool in a bad state
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init) as pool:
        return list(tqdm(pool.map(fn, jobs, chunksize=chunksize), **bar))


# --------------------------------------------------------------------------- consistency filter
ScoreFn = Callable[[list[str], list[str]], np.ndarray]


def consistency_filter(records: Sequence[Sample], originals: Sequence[Sample] | Mapping[str, Sample],
                       score_fn: ScoreFn, ratio: float = 0.5) -> tuple[list[Sample], dict[str, int]]:
    """Drop augmented images the model no longer reads as their label.

    originals: the original of each record, aligned with `records` (`[job.sample for job in jobs]`), or a
      mapping from record name to original.
    score_fn(paths, labels) -> probabilities, one per path, of the label given beside it.
    Rule: keep a record when p(record's label | augmented image) ≥ ratio × p(original's label | original).
      For an insertion record that compares p(高风险 | image with the pasted hazard) with the original's
      confidence in its own label (无风险 or 低风险): the model must be at least `ratio` as sure the new
      image is high-risk as it was of the source. A NaN score drops the record.
    Returns the kept records (in order) and the number dropped per label of the record (all LABELS keys).
    score_fn is called twice: once for the records, once for the distinct originals.
    """
    records = list(records)
    if isinstance(originals, Mapping):
        orig = [originals[r.name] for r in records]
    else:
        orig = list(originals)
        if len(orig) != len(records):
            raise ValueError(f"{len(records)} records but {len(orig)} originals")
    dropped = dict.fromkeys(LABELS, 0)
    if not records:
        return [], dropped

    def scores(paths: list[str], labels: list[str]) -> np.ndarray:
        p = np.asarray(score_fn(paths, labels), dtype=np.float64).reshape(-1)
        if p.shape[0] != len(paths):
            raise ValueError(f"score_fn returned {p.shape[0]} probabilities for {len(paths)} images")
        return p

    p_aug = scores([str(r.path) for r in records], [r.label for r in records])
    unique = list(dict.fromkeys((str(o.path), o.label) for o in orig))
    p_unique = dict(zip(unique, scores([u[0] for u in unique], [u[1] for u in unique])))
    p_orig = np.array([p_unique[(str(o.path), o.label)] for o in orig])
    keep = p_aug >= ratio * p_orig  # False for NaN
    kept = []
    for r, k in zip(records, keep):
        if k:
            kept.append(r)
        else:
            dropped[r.label] += 1
    return kept, dropped


# --------------------------------------------------------------------------- contact sheet
def contact_rows(samples: Sequence[Sample], n: int = 5) -> list[Sample]:
    """Originals for a contact sheet: the first of each label (LABELS order), then the next ones, n in all."""
    first: dict[str, Sample] = {}
    for s in samples:
        first.setdefault(s.label, s)
    rows = [first[label] for label in LABELS if label in first]
    rows += [s for s in samples if s not in rows][: max(0, n - len(rows))]
    return rows[:n]


def contact_sheet(samples: Sequence[Sample], path: str | os.PathLike, *, config: AugmentConfig = AugmentConfig(),
                  cutouts: str | os.PathLike | None = None, seed: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS,
                  thumb_height: int = 160) -> Path:
    """A PNG, one row per original: original | geometric | colour | padding | insert (for 无风险/低风险
    originals when cut-outs are given), each captioned in ASCII with the transform and the label."""
    from PIL import Image, ImageDraw, ImageFont

    from tools.fileio import atomic_open

    cut_paths = list_cutouts(cutouts) if cutouts else []
    font = ImageFont.load_default()
    caption_h, pad = 14, 4
    rows = []
    for i, s in enumerate(samples):
        img = load_image(s.path, max_pixels)
        js = job_seed(seed, s.name, 1)
        cells = [("original", s.label, img)]
        for t in ("geometric", "colour", "padding"):
            cells.append((t, s.label, apply_transforms(img, (t,), js, config, None, max_pixels)))
        if cut_paths and s.label in INSERT_SOURCES:
            cut = load_cutout(cut_paths[i % len(cut_paths)])
            cells.append(("insert", HIGH_RISK, apply_transforms(img, ("insert",), js, config, cut, max_pixels)))
        rows.append(cells)
    col_w = 0
    thumbs = []
    for cells in rows:
        row = []
        for name, label, arr in cells:
            h, w = arr.shape[:2]
            tw = max(1, round(w * thumb_height / h))
            thumb = cv2.resize(arr, (tw, thumb_height), interpolation=cv2.INTER_AREA)
            row.append((name, label, Image.fromarray(thumb)))
            col_w = max(col_w, tw)
        thumbs.append(row)
    ncols = max((len(r) for r in thumbs), default=1)
    sheet = Image.new("RGB", (ncols * (col_w + pad) + pad, len(thumbs) * (thumb_height + caption_h + pad) + pad),
                      (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(thumbs):
        y = pad + r * (thumb_height + caption_h + pad)
        for c, (name, label, im) in enumerate(row):
            x = pad + c * (col_w + pad)
            draw.text((x, y), f"{name}: {LABEL_ASCII.get(label, '?')}", fill=(0, 0, 0), font=font)
            sheet.paste(im, (x, y + caption_h))
    path = Path(path)
    with atomic_open(path, "wb") as f:
        sheet.save(f, format="PNG")
    return path


# --------------------------------------------------------------------------- CLI
def parse_label_numbers(text: str, kind=float) -> dict[str, float]:
    """'高风险=10,非楼道=4' → {'高风险': 10.0, '非楼道': 4.0}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.replace("，", ",").split(","))):
        label, sep, value = part.partition("=")
        label = label.strip()
        if not sep or label not in LABEL_TO_INDEX:
            raise argparse.ArgumentTypeError(f"expected LABEL=NUMBER with a label of {', '.join(LABELS)}; got {part!r}")
        try:
            out[label] = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number in {part!r}") from None
        if out[label] < 0:
            raise argparse.ArgumentTypeError(f"negative value in {part!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m tools.augment", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", required=True, help="training list, <image>\\t<label> a line (training split only)")
    ap.add_argument("--images", required=True, help="folder of the images the list names")
    ap.add_argument("--out-dir", required=True, help=f"where the augmented JPEGs and {LIST_NAME} go")
    ap.add_argument("--cutouts", help="folder of RGBA PNG hazard cut-outs; without it, no insertion")
    ap.add_argument("--seed", type=int, default=42, help="plan seed: same seed, same bytes (default: %(default)s)")
    ap.add_argument("--multipliers", type=parse_label_numbers, default={},
                    help="extra copies per original, e.g. 高风险=10,非楼道=4 (others: "
                         + ",".join(f"{k}={v:g}" for k, v in DEFAULT_MULTIPLIERS.items()) + ")")
    ap.add_argument("--targets", type=partial(parse_label_numbers, kind=int), default={},
                    help="total images per label instead, e.g. 高风险=400 (overrides that label's multiplier)")
    ap.add_argument("--insert", type=int, default=None,
                    help=f"insertion images (new 高风险 from {'/'.join(INSERT_SOURCES)}); default "
                         f"{INSERT_PER_HIGH:g}× the 高风险 originals with --cutouts, else 0")
    ap.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                    help="model image size, as swift's MAX_PIXELS (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    ap.add_argument("--contact-sheet", help="also write this PNG: originals next to each transform")
    ap.add_argument("--contact-rows", type=int, default=5, help="originals on the contact sheet (default: %(default)s)")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tools.prepare_data import count_table

    try:
        samples = read_list(args.list, args.images, labelled=True, workers=args.workers,
                            progress=not args.no_progress)
        jobs = plan_augmentation(samples, args.multipliers, args.targets, seed=args.seed, cutouts=args.cutouts,
                                 n_insert=args.insert)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out_dir = Path(args.out_dir)
    records = run_plan(jobs, out_dir, max_pixels=args.max_pixels, workers=args.workers,
                       progress=not args.no_progress)
    write_list(out_dir / LIST_NAME, records)
    inserted = [r for r, j in zip(records, jobs) if "insert" in j.transforms]
    print(count_table({"original": samples, "augmented": records, "inserted": inserted,
                       "total": samples + records}))
    print(f"wrote {len(records)} images and {out_dir / LIST_NAME}")
    if args.contact_sheet:
        contact_sheet(contact_rows(samples, args.contact_rows), args.contact_sheet, cutouts=args.cutouts,
                      seed=args.seed, max_pixels=args.max_pixels)
        print(f"wrote {args.contact_sheet}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
