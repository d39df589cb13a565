"""tools.augment.transforms (VL-ADAS): hazard hues held, geometry and crops bounded, context-aware padding,
insertion into the floor band (the only label change), and one random stream per transform. Small images
throughout, so the module runs in seconds."""
from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest

from tests.helpers import corridor
from tools.augment import transforms as T
from tools.augment.images import list_cutouts, load_cutout, resize_for_model
from tools.demo.data import risk_scene
from tools.demo.scenes import HAZARD_COLOURS
from tools.task import HIGH_RISK, LABELS

CFG = T.AugmentConfig()
SMALL = 224 * 168  # max_pixels for the tests: a 224² demo image becomes 196×196


def hue_deg(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(img.astype(np.float32) / 255, cv2.COLOR_RGB2HSV)[..., 0]


def hue_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = np.abs(a - b) % 360
    return np.minimum(d, 360 - d)


def patches(colours) -> np.ndarray:
    """8×8 blocks of the given RGB colours side by side."""
    return np.concatenate([np.full((8, 8, 3), c, np.uint8) for c in colours], axis=1)


# --------------------------------------------------------------------------- colour
def test_the_demo_hazard_colours_lie_in_the_default_protected_bands():
    bands = T.hazard_hue_bands(CFG.hazard_hues_deg, CFG.hazard_hue_halfwidth_deg)
    assert bands == [(-15.0, 65.2), (208.3, 238.3)]  # warning red/orange/yellow, and e-bike/battery blue
    img = patches(HAZARD_COLOURS)
    assert T.hazard_mask(img).all()  # every pixel of every demo hazard colour is protected ...
    for k, hue in enumerate(hue_deg(img)[0, ::8]):  # ... because its hue is inside a band
        assert any(lo <= hue <= hi or lo <= hue - 360 <= hi for lo, hi in bands), HAZARD_COLOURS[k]
    out = T.apply_colour(img, hue_shift_deg=30, sat_scale=1.0, val_scale=1.0)
    assert hue_diff(hue_deg(img), hue_deg(out)).max() <= 2  # and keeps its hue under the jitter


def test_a_custom_hazard_hue_setting_changes_the_protected_pixels():
    green, red, yellow_green = (40, 200, 40), (220, 30, 30), (150, 220, 40)  # hues 120°, 0°, ~86°
    img = patches([green, red, yellow_green])
    cfg = T.AugmentConfig(hazard_hues_deg=(120.0,))  # only green is a hazard colour now
    assert T.hazard_hue_bands(cfg.hazard_hues_deg, cfg.hazard_hue_halfwidth_deg) == [(105.0, 135.0)]
    assert T.hazard_mask(img, cfg)[:, :8].all() and not T.hazard_mask(img, cfg)[:, 8:].any()
    assert not T.hazard_mask(img)[:, :8].any() and T.hazard_mask(img)[:, 8:16].all()  # the defaults: the reverse
    d = hue_diff(hue_deg(img), hue_deg(T.apply_colour(img, 30, 1.0, 1.0, cfg)))
    assert d[:, :8].max() <= 2  # green held
    assert abs(d[:, 8:16] - 30).max() <= 2  # red moved by 30°
    assert d[:, 16:].max() <= 2  # yellow-green would land in the green band: not moved into it
    d = hue_diff(hue_deg(img), hue_deg(T.apply_colour(img, 30, 1.0, 1.0)))
    assert abs(d[:, :8] - 30).max() <= 2 and d[:, 8:16].max() <= 2  # the defaults: green moves, red is held


def test_hazard_hue_bands_merge_overlaps():
    assert T.hazard_hue_bands([0, 20, 100], 15) == [(-15.0, 35.0), (85.0, 115.0)]
    assert T.hazard_hue_bands([370], 5) == [(5.0, 15.0)]  # hues are taken modulo 360
    assert T.hazard_hue_bands([], 15) == []


def test_colour_jitter_holds_hazard_hues_and_moves_the_others():
    hazard = [(220, 30, 30), (240, 120, 20), (235, 200, 20), (30, 80, 210), (150, 40, 30)]
    other = [(40, 170, 60), (150, 60, 200), (180, 60, 200), (120, 110, 95), (225, 222, 210)]  # green, purple,
    # violet, and two grey-beige scene colours (low saturation: their hue may move freely)
    img = np.concatenate([np.full((8, 8, 3), c, np.uint8) for c in hazard + other], axis=1)
    out = T.apply_colour(img, hue_shift_deg=30, sat_scale=0.7, val_scale=1.15)
    h0, h1 = hue_deg(img), hue_deg(out)
    s0 = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)[..., 1].astype(int)
    s1 = cv2.cvtColor(out, cv2.COLOR_RGB2HSV)[..., 1].astype(int)
    for k in range(len(hazard)):
        block = np.s_[:, 8 * k:8 * k + 8]
        assert hue_diff(h0[block], h1[block]).max() <= 4, hazard[k]  # hue held ...
        assert (s1[block] < s0[block] - 20).all(), hazard[k]  # ... while saturation moved
    for k in range(len(hazard), len(hazard) + 3):  # saturated non-hazard colours: hue moved by ~30°
        block = np.s_[:, 8 * k:8 * k + 8]
        assert np.abs(hue_diff(h0[block], h1[block]) - 30).max() <= 4, other[k - len(hazard)]
    # a chromatic colour never becomes a hazard colour: +30° would make cyan (188°) e-bike blue and
    # magenta (317°) warning red, so they keep their hue
    for colour in [(40, 170, 190), (200, 60, 160)]:
        patch = np.full((4, 4, 3), colour, np.uint8)
        assert hue_diff(hue_deg(patch), hue_deg(T.apply_colour(patch, 30, 1.0, 1.0))).max() <= 4, colour


def test_colour_jitter_on_a_high_risk_scene():
    img = corridor(3, HIGH_RISK)
    protected = T.hazard_mask(img)
    assert protected.sum() > 200  # the e-bike or battery
    out = T.apply_colour(img, hue_shift_deg=-24, sat_scale=1.2, val_scale=0.85)
    d = hue_diff(hue_deg(img), hue_deg(out))
    assert np.percentile(d[protected], 99) <= 4
    s = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)[..., 1]
    free = ~protected & (s > 40) & ~T.hazard_mask(out)  # chromatic enough for a hue to mean something
    assert free.sum() > 1000 and np.median(d[free]) >= 16


# --------------------------------------------------------------------------- geometric
@pytest.mark.parametrize("shape", [(224, 224), (168, 280), (280, 140)])
def test_geometric_keeps_a_valid_image_and_the_label(shape):
    img = cv2.resize(corridor(1), shape[::-1])
    for seed in range(6):
        out = T.random_geometric(img, np.random.default_rng(seed), CFG)
        assert out.shape == img.shape and out.dtype == np.uint8
        assert np.isfinite(out.astype(np.float64)).all() and out.std() > 5  # a picture, not a fill
        assert not np.array_equal(out, img)
    for transforms in itertools.chain.from_iterable(itertools.combinations(T.TRANSFORMS[1:], k) for k in range(4)):
        for label in LABELS:
            assert T.label_after(label, transforms) == label


def test_crop_and_zoom_keep_the_configured_share_of_each_side():
    w, h = 256, 200
    xs, ys = np.meshgrid(np.arange(w), np.arange(h))
    coords = np.dstack([xs, ys * 255 // (h - 1), np.zeros_like(xs)]).astype(np.uint8)  # R = x, G ∝ y
    for keep in (0.85, 0.6):
        cfg = T.AugmentConfig(crop_keep=keep, max_rotation_deg=0, scale_range=(0.9, 1.3))
        fractions = []
        for seed in range(60):
            p = T.sample_geometric(np.random.default_rng(seed), w, h, cfg)
            assert p.keep >= keep and p.visible_fraction >= keep - 1e-9
            out = T.apply_geometric(coords, p).astype(int)
            x_span = (out[h // 2, :, 0].max() - out[h // 2, :, 0].min()) / 255
            y_span = (out[:, w // 2, 1].max() - out[:, w // 2, 1].min()) / 255
            assert min(x_span, y_span) >= keep - 0.01, (seed, p)
            fractions.append(p.visible_fraction)
        assert min(fractions) < keep + 0.05  # the bound is reached, i.e. it is the parameter that holds it


# --------------------------------------------------------------------------- padding
def test_padding_mode_follows_the_border_rule_and_reaches_the_aspect():
    rng = np.random.default_rng(0)
    h = 120
    grey = np.clip(rng.normal(128, 2, (h, 30, 3)), 0, 255).astype(np.uint8)  # uniform mid-tone
    checker = ((np.indices((h, 30)).sum(0) // 4) % 2 * 200 + 20).astype(np.uint8)[..., None].repeat(3, 2)
    dark = np.full((h, 30, 3), (10, 12, 14), np.uint8)
    bright = np.full((h, 30, 3), (245, 246, 240), np.uint8)
    assert T.pad_mode_for(grey) == ("edge", None)
    assert T.pad_mode_for(checker) == ("reflect", None)
    assert T.pad_mode_for(dark) == ("constant", (10, 12, 14))
    assert T.pad_mode_for(bright) == ("constant", (245, 246, 240))

    img = np.concatenate([dark, np.full((h, 40, 3), 90, np.uint8), checker], axis=1)  # 100 wide
    out, modes = T.pad_to_aspect(img, 16 / 9, split=0.5)
    assert modes == {"left": "constant", "right": "reflect"}
    assert abs(out.shape[1] / out.shape[0] - 16 / 9) <= 1 / out.shape[0] and out.shape[0] == h
    left = (out.shape[1] - 100) // 2
    assert (out[:, :left] == (10, 12, 14)).all()  # the border's mean colour
    assert np.array_equal(out[:, left + 100:left + 104], img[:, -2:-6:-1])  # mirrored, edge pixel not repeated

    tall = np.concatenate([bright, grey], axis=0)  # 240 × 30: pad top (bright) and bottom (grey)
    out, modes = T.pad_to_aspect(tall, 0.1, split=0.3)  # to 300 high: 18 rows on top, 42 below
    assert modes == {"top": "constant", "bottom": "edge"} and out.shape[:2] == (300, 30)
    assert (out[:18] == (245, 246, 240)).all() and np.array_equal(out[18:258], tall)
    assert (out[258:] == tall[-1]).all()  # the last row, replicated


def test_random_padding_ends_at_the_model_size():
    img = resize_for_model(corridor(2), SMALL)
    for seed in range(5):
        out = T.apply_transforms(img, ("padding",), seed, CFG, max_pixels=SMALL)
        h, w = out.shape[:2]
        assert h % 28 == 0 and w % 28 == 0 and h * w <= SMALL and (h, w) != img.shape[:2]
    for aspect in (16 / 9, 0.6):  # padded straight to the model's size, aspect to within the 28-pixel rounding
        out, modes = T.pad_to_aspect(img, aspect, max_pixels=SMALL, split=0.5)
        h, w = out.shape[:2]
        assert modes and h % 28 == 0 and w % 28 == 0 and h * w <= SMALL
        assert abs(w / h - aspect) <= 28 / min(h, w)


# --------------------------------------------------------------------------- insertion
def test_insertion_pastes_inside_the_floor_band(cutouts):
    cuts = [load_cutout(p) for p in list_cutouts(cutouts)]
    for seed in range(12):
        img = corridor(seed)
        out, (x0, y0, x1, y1) = T.insert_hazard(img, cuts[seed % 3], np.random.default_rng(seed), CFG)
        H, W = img.shape[:2]
        top = round(H * (1 - CFG.floor_band))
        changed = np.abs(out.astype(int) - img.astype(int)).max(axis=2) > 0
        rows = np.nonzero(changed.any(axis=1))[0]
        assert changed.sum() > 50 and rows.min() >= top and rows.max() < H
        assert top <= y0 < y1 <= H and 0 <= x0 < x1 <= W
        assert 0.05 * W <= x1 - x0 <= 0.36 * W  # scaled sensibly
        assert T.hazard_mask(out[y0:y1, x0:x1]).sum() > T.hazard_mask(img[y0:y1, x0:x1]).sum() + 10
    # an explicit region (the scene's own floor box) is honoured too
    scene = risk_scene(np.random.default_rng(5), "无风险")
    img = np.asarray(scene.image)
    out, (x0, y0, x1, y1) = T.insert_hazard(img, cuts[0], np.random.default_rng(1), CFG, region=scene.floor)
    assert scene.floor[1] <= y0 and y1 <= scene.floor[3]
    with pytest.raises(ValueError):
        T.insert_hazard(img, cuts[0][..., :3], np.random.default_rng(0), CFG)


def test_only_insertion_makes_high_risk(cutouts):
    cut = load_cutout(list_cutouts(cutouts)[1])
    img = corridor(4)
    assert T.label_after("无风险", ("insert",)) == HIGH_RISK
    assert T.label_after("低风险", ("insert", "geometric", "colour", "padding")) == HIGH_RISK
    assert T.label_after("低风险", ("geometric", "colour", "padding")) == "低风险"
    with pytest.raises(ValueError):
        T.apply_transforms(img, ("insert",), 0, CFG, cutout=None)
    assert not np.array_equal(T.apply_transforms(img, ("insert",), 0, CFG, cutout=cut, max_pixels=None), img)


# --------------------------------------------------------------------------- a job's transforms
def test_each_transform_draws_from_its_own_stream(cutouts):
    img = resize_for_model(corridor(6), SMALL)
    cut = load_cutout(list_cutouts(cutouts)[0])
    seed = 1234
    streams = T.job_streams(seed)
    assert set(streams) == {*T.TRANSFORMS, "plan", "cutout"}
    first = {name: g.random(3).tolist() for name, g in streams.items()}
    assert {name: g.random(3).tolist() for name, g in T.job_streams(seed).items()} == first  # seeded
    assert len({tuple(v) for v in first.values()}) == len(first)  # independent streams
    # switching a transform off leaves the others' numbers: all four equal each one applied with its own stream
    s = T.job_streams(seed)
    expected = T.insert_hazard(img, cut, s["insert"], CFG)[0]
    expected = T.random_geometric(expected, s["geometric"], CFG)
    expected = T.random_colour(expected, s["colour"], CFG)
    expected = T.random_padding(expected, s["padding"], CFG, SMALL)
    got = T.apply_transforms(img, ("padding", "colour", "insert", "geometric"), seed, CFG, cut, SMALL)  # any order
    assert np.array_equal(got, expected)
    only_colour = T.random_colour(img, T.job_streams(seed)["colour"], CFG)
    assert np.array_equal(T.apply_transforms(img, ("colour",), seed, CFG, max_pixels=SMALL), only_colour)
    with pytest.raises(ValueError, match="unknown transform"):
        T.apply_transforms(img, ("blur",), seed, CFG)
    out = T.apply_transforms(img, (), seed, CFG)
    assert np.array_equal(out, img) and out is not img  # a copy, never the input
