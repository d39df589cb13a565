"""VL-ADAS augmentation: hazard hues held, geometry and crops bounded, context-aware padding, insertion into
the floor band (the only label change), the balancing plan, determinism across worker counts, the
consistency filter, contact sheet and CLI. Small images throughout, so the module runs in seconds."""
from __future__ import annotations

import hashlib
import itertools
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from tools import augment as A
from tools import make_demo
from tools.dataset import Sample, read_list
from tools.task import HIGH_RISK, LABELS

ROOT = Path(__file__).resolve().parents[1]
CFG = A.AugmentConfig()
SMALL = 224 * 168  # max_pixels for the tests: a 224² demo image becomes 196×196


def corridor(i: int, label: str = "无风险") -> np.ndarray:
    return np.asarray(make_demo.risk_scene(np.random.default_rng(i), label).image)


def hue_deg(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(img.astype(np.float32) / 255, cv2.COLOR_RGB2HSV)[..., 0]


def hue_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = np.abs(a - b) % 360
    return np.minimum(d, 360 - d)


@pytest.fixture(scope="module")
def cutouts(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cutouts")
    make_demo.write_cutouts(folder, 0, n=3)
    return folder


def write_samples(folder: Path, labels: list[str], start: int = 0) -> list[Sample]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, label in enumerate(labels, start):
        path = folder / f"img{i:02d}.jpg"
        Image.fromarray(corridor(i, label)).save(path, quality=92)
        out.append(Sample(path.name, path.resolve(), label, f"train.txt:{i + 1}"))
    return out


# --------------------------------------------------------------------------- colour
def test_hazard_bands_come_from_the_scene_palette():
    assert A.HAZARD_HUES_DEG == pytest.approx((0.0, 27.3, 50.2, 223.3), abs=0.1)
    assert A.HAZARD_HUE_BANDS == [(-15.0, 65.2), (208.3, 238.3)]


def test_colour_jitter_holds_hazard_hues_and_moves_the_others():
    hazard = [(220, 30, 30), (240, 120, 20), (235, 200, 20), (30, 80, 210), (150, 40, 30)]
    other = [(40, 170, 60), (150, 60, 200), (180, 60, 200), (120, 110, 95), (225, 222, 210)]  # green, purple,
    # violet, and two grey-beige scene colours (low saturation: their hue may move freely)
    img = np.concatenate([np.full((8, 8, 3), c, np.uint8) for c in hazard + other], axis=1)
    out = A.apply_colour(img, hue_shift_deg=30, sat_scale=0.7, val_scale=1.15)
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
        assert hue_diff(hue_deg(patch), hue_deg(A.apply_colour(patch, 30, 1.0, 1.0))).max() <= 4, colour


def test_colour_jitter_on_a_high_risk_scene():
    img = corridor(3, HIGH_RISK)
    protected = A.hazard_mask(img)
    assert protected.sum() > 200  # the e-bike or battery
    out = A.apply_colour(img, hue_shift_deg=-24, sat_scale=1.2, val_scale=0.85)
    d = hue_diff(hue_deg(img), hue_deg(out))
    assert np.percentile(d[protected], 99) <= 4
    s = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)[..., 1]
    free = ~protected & (s > 40) & ~A.hazard_mask(out)  # chromatic enough for a hue to mean something
    assert free.sum() > 1000 and np.median(d[free]) >= 16


# --------------------------------------------------------------------------- geometric
@pytest.mark.parametrize("shape", [(224, 224), (168, 280), (280, 140)])
def test_geometric_keeps_a_valid_image_and_the_label(shape):
    img = cv2.resize(corridor(1), shape[::-1])
    for seed in range(6):
        out = A.random_geometric(img, np.random.default_rng(seed), CFG)
        assert out.shape == img.shape and out.dtype == np.uint8
        assert np.isfinite(out.astype(np.float64)).all() and out.std() > 5  # a picture, not a fill
        assert not np.array_equal(out, img)
    for transforms in itertools.chain.from_iterable(itertools.combinations(A.TRANSFORMS[1:], k) for k in range(4)):
        for label in LABELS:
            assert A.label_after(label, transforms) == label


def test_crop_and_zoom_keep_the_configured_share_of_each_side():
    w, h = 256, 200
    xs, ys = np.meshgrid(np.arange(w), np.arange(h))
    coords = np.dstack([xs, ys * 255 // (h - 1), np.zeros_like(xs)]).astype(np.uint8)  # R = x, G ∝ y
    for keep in (0.85, 0.6):
        cfg = A.AugmentConfig(crop_keep=keep, max_rotation_deg=0, scale_range=(0.9, 1.3))
        fractions = []
        for seed in range(60):
            p = A.sample_geometric(np.random.default_rng(seed), w, h, cfg)
            assert p.keep >= keep and p.visible_fraction >= keep - 1e-9
            out = A.apply_geometric(coords, p).astype(int)
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
    assert A.pad_mode_for(grey) == ("edge", None)
    assert A.pad_mode_for(checker) == ("reflect", None)
    assert A.pad_mode_for(dark) == ("constant", (10, 12, 14))
    assert A.pad_mode_for(bright) == ("constant", (245, 246, 240))

    img = np.concatenate([dark, np.full((h, 40, 3), 90, np.uint8), checker], axis=1)  # 100 wide
    out, modes = A.pad_to_aspect(img, 16 / 9, split=0.5)
    assert modes == {"left": "constant", "right": "reflect"}
    assert abs(out.shape[1] / out.shape[0] - 16 / 9) <= 1 / out.shape[0] and out.shape[0] == h
    left = (out.shape[1] - 100) // 2
    assert (out[:, :left] == (10, 12, 14)).all()  # the border's mean colour
    assert np.array_equal(out[:, left + 100:left + 104], img[:, -2:-6:-1])  # mirrored, edge pixel not repeated

    tall = np.concatenate([bright, grey], axis=0)  # 240 × 30: pad top (bright) and bottom (grey)
    out, modes = A.pad_to_aspect(tall, 0.1, split=0.3)  # to 300 high: 18 rows on top, 42 below
    assert modes == {"top": "constant", "bottom": "edge"} and out.shape[:2] == (300, 30)
    assert (out[:18] == (245, 246, 240)).all() and np.array_equal(out[18:258], tall)
    assert (out[258:] == tall[-1]).all()  # the last row, replicated


def test_random_padding_ends_at_the_model_size():
    img = A.resize_for_model(corridor(2), SMALL)
    for seed in range(5):
        out = A.apply_transforms(img, ("padding",), seed, CFG, max_pixels=SMALL)
        h, w = out.shape[:2]
        assert h % 28 == 0 and w % 28 == 0 and h * w <= SMALL and (h, w) != img.shape[:2]
    for aspect in (16 / 9, 0.6):  # padded straight to the model's size, aspect to within the 28-pixel rounding
        out, modes = A.pad_to_aspect(img, aspect, max_pixels=SMALL, split=0.5)
        h, w = out.shape[:2]
        assert modes and h % 28 == 0 and w % 28 == 0 and h * w <= SMALL
        assert abs(w / h - aspect) <= 28 / min(h, w)


def test_smart_resize_matches_qwen():
    qwen = pytest.importorskip("qwen_vl_utils.vision_process")
    for h, w in [(960, 1280), (224, 224), (3000, 4000), (37, 1000), (1080, 1920), (20, 20), (4032, 3024)]:
        assert A.smart_resize(h, w) == qwen.smart_resize(h, w, 28, min_pixels=3136, max_pixels=1003520)


# --------------------------------------------------------------------------- insertion
def test_insertion_pastes_inside_the_floor_band(cutouts):
    cuts = [A.load_cutout(p) for p in A.list_cutouts(cutouts)]
    for seed in range(12):
        img = corridor(seed)
        out, (x0, y0, x1, y1) = A.insert_hazard(img, cuts[seed % 3], np.random.default_rng(seed), CFG)
        H, W = img.shape[:2]
        top = round(H * (1 - CFG.floor_band))
        changed = np.abs(out.astype(int) - img.astype(int)).max(axis=2) > 0
        rows = np.nonzero(changed.any(axis=1))[0]
        assert changed.sum() > 50 and rows.min() >= top and rows.max() < H
        assert top <= y0 < y1 <= H and 0 <= x0 < x1 <= W
        assert 0.05 * W <= x1 - x0 <= 0.36 * W  # scaled sensibly
        assert A.hazard_mask(out[y0:y1, x0:x1]).sum() > A.hazard_mask(img[y0:y1, x0:x1]).sum() + 10
    # an explicit region (the scene's own floor box) is honoured too
    scene = make_demo.risk_scene(np.random.default_rng(5), "无风险")
    img = np.asarray(scene.image)
    out, (x0, y0, x1, y1) = A.insert_hazard(img, cuts[0], np.random.default_rng(1), CFG, region=scene.floor)
    assert scene.floor[1] <= y0 and y1 <= scene.floor[3]
    with pytest.raises(ValueError):
        A.insert_hazard(img, cuts[0][..., :3], np.random.default_rng(0), CFG)


def test_only_insertion_makes_high_risk(cutouts):
    cut = A.load_cutout(A.list_cutouts(cutouts)[1])
    img = corridor(4)
    assert A.label_after("无风险", ("insert",)) == HIGH_RISK
    assert A.label_after("低风险", ("insert", "geometric", "colour", "padding")) == HIGH_RISK
    assert A.label_after("低风险", ("geometric", "colour", "padding")) == "低风险"
    samples = [Sample(f"{i}.jpg", Path(f"/x/{i}.jpg"), label, f"t:{i}") for i, label in enumerate(LABELS * 2)]
    jobs = A.plan_augmentation(samples, {label: 1 for label in LABELS}, seed=0, cutouts=A.list_cutouts(cutouts))
    assert all(j.label == (HIGH_RISK if "insert" in j.transforms else j.sample.label) for j in jobs)
    inserted = [j for j in jobs if "insert" in j.transforms]
    assert inserted and all(j.sample.label in A.INSERT_SOURCES and j.cutout for j in inserted)
    with pytest.raises(ValueError):
        A.apply_transforms(img, ("insert",), 0, CFG, cutout=None)
    assert not np.array_equal(A.apply_transforms(img, ("insert",), 0, CFG, cutout=cut, max_pixels=None), img)


# --------------------------------------------------------------------------- plan
def fake_samples(counts: dict[str, int]) -> list[Sample]:
    return [Sample(f"{label}{i}.jpg", Path(f"/nowhere/{i}.jpg"), label, f"t:{label}{i}")
            for label, n in counts.items() for i in range(n)]


def test_balancing_plan_counts_match_the_multipliers(cutouts):
    counts = {"高风险": 3, "中风险": 4, "低风险": 5, "无风险": 10, "非楼道": 2}
    samples = fake_samples(counts)

    def per_label(jobs, inserted=False):
        return {label: sum(j.sample.label == label and ("insert" in j.transforms) == inserted for j in jobs)
                for label in LABELS}

    jobs = A.plan_augmentation(samples, seed=1)  # defaults, no cut-outs: no insertion
    assert per_label(jobs) == {label: int(A.DEFAULT_MULTIPLIERS[label]) * n for label, n in counts.items()}
    assert per_label(jobs, inserted=True) == dict.fromkeys(LABELS, 0)
    assert all(sum(j.sample.name == s.name for j in jobs) == 10 for s in samples if s.label == "高风险")

    jobs = A.plan_augmentation(samples, {"中风险": 2, "高风险": 1}, {"非楼道": 9}, seed=1, cutouts=cutouts)
    assert per_label(jobs) == {"高风险": 3, "中风险": 8, "低风险": 0, "无风险": 0, "非楼道": 7}
    ins = per_label(jobs, inserted=True)
    assert sum(ins.values()) == 2 * counts["高风险"] and set(k for k, v in ins.items() if v) <= set(A.INSERT_SOURCES)
    assert len({j.seed for j in jobs}) == len(jobs) and len({j.out_name for j in jobs}) == len(jobs)
    assert sum(j.label == HIGH_RISK for j in jobs) == 3 + 6

    half = A.plan_augmentation(samples, {"无风险": 0.5, "高风险": 0}, seed=2, n_insert=0)
    none_jobs = [j for j in half if j.sample.label == "无风险"]
    assert len(none_jobs) == 5 and len({j.sample.name for j in none_jobs}) == 5  # half the originals, one each
    assert A.plan_augmentation(samples, seed=1) == A.plan_augmentation(samples, seed=1)
    seeds = [[j.seed for j in A.plan_augmentation(samples, seed=s)] for s in (1, 2)]
    assert seeds[0] != seeds[1]
    with pytest.raises(ValueError):
        A.plan_augmentation(samples, {"危险": 1})


# --------------------------------------------------------------------------- running
def digests(records) -> dict[str, str]:
    return {r.name: hashlib.sha256(Path(r.path).read_bytes()).hexdigest() for r in records}


def test_same_seed_same_bytes_with_one_or_two_workers(tmp_path, cutouts):
    samples = write_samples(tmp_path / "train", ["高风险", "无风险", "低风险", "非楼道"])
    jobs = A.plan_augmentation(samples, {"高风险": 2, "非楼道": 1, "低风险": 1}, seed=7, cutouts=cutouts)
    assert any("insert" in j.transforms for j in jobs)
    one = A.run_plan(jobs, tmp_path / "w1", workers=1, max_pixels=SMALL, progress=False)
    two = A.run_plan(jobs, tmp_path / "w2", workers=2, chunksize=2, max_pixels=SMALL, progress=False)
    assert digests(one) == digests(two) and len(one) == len(jobs)
    jobs8 = A.plan_augmentation(samples, {"高风险": 2, "非楼道": 1, "低风险": 1}, seed=8, cutouts=cutouts)
    other = A.run_plan(jobs8, tmp_path / "s8", workers=1, max_pixels=SMALL, progress=False)
    assert set(digests(other)) == set(digests(one))  # same names ...
    assert all(digests(other)[n] != d for n, d in digests(one).items())  # ... different images
    for r, j in zip(one, jobs):
        assert r.name == f"{Path(j.sample.name).stem}_aug{j.copy}.jpg" and r.label == j.label
        assert r.source == f"augment:{j.sample.source}"
        with Image.open(r.path) as im:
            w, h = im.size
            assert im.mode == "RGB" and w % 28 == 0 and h % 28 == 0 and w * h <= SMALL


# --------------------------------------------------------------------------- consistency filter
def fake_scorer(inserted: dict[str, str]):
    """A stand-in for the model that measures real things. For an insertion record (path → its source's
    path in `inserted`) p(高风险) is the increase in hazard-coloured pixels over the source (×400, capped at
    1); for anything else p(label) grows with mean brightness, so an all-black image scores 0."""
    def share(path) -> float:
        return float(A.hazard_mask(np.asarray(Image.open(path).convert("RGB"))).mean())

    def score(paths: list[str], labels: list[str]) -> np.ndarray:
        out = []
        for path, label in zip(paths, labels):
            if label == HIGH_RISK and path in inserted:
                out.append(min(1.0, max(0.0, 400 * (share(path) - share(inserted[path])))))
            else:
                out.append(min(1.0, 1.5 * np.asarray(Image.open(path).convert("L")).mean() / 255))
        return np.array(out)

    return score


def test_filter_drops_corrupted_samples_and_keeps_clean_ones(tmp_path, cutouts):
    samples = write_samples(tmp_path / "train", ["无风险", "低风险", "非楼道", "高风险"])
    jobs = [A.AugmentJob(s, 1, A.job_seed(0, s.name, 1), ("geometric", "colour")) for s in samples]
    cut = str(A.list_cutouts(cutouts)[0])
    jobs.append(A.AugmentJob(samples[0], 2, A.job_seed(0, samples[0].name, 2), ("insert",), cut))
    records = A.run_plan(jobs, tmp_path / "aug", workers=1, max_pixels=SMALL, progress=False)
    originals = [j.sample for j in jobs]
    # corrupt two: an all-black 低风险 copy, and a "high-risk" insertion copy that shows no hazard
    cv2.imwrite(str(records[1].path), np.zeros((196, 196, 3), np.uint8))
    bad_insert = tmp_path / "aug" / "img00_aug3.jpg"
    Image.fromarray(A.load_image(samples[0].path, SMALL)).save(bad_insert, quality=90)
    records.append(Sample("img00_aug3.jpg", bad_insert, HIGH_RISK, "augment:x"))
    originals.append(samples[0])
    score = fake_scorer({str(records[4].path): str(samples[0].path), str(bad_insert): str(samples[0].path)})

    kept, dropped = A.consistency_filter(records, originals, score, ratio=0.5)
    assert [r.name for r in kept] == ["img00_aug1.jpg", "img02_aug1.jpg", "img03_aug1.jpg", "img00_aug2.jpg"]
    assert dropped == {"高风险": 1, "中风险": 0, "低风险": 1, "无风险": 0, "非楼道": 0}
    # the mapping form gives the same; a stricter ratio drops more
    kept2, _ = A.consistency_filter(records, {r.name: o for r, o in zip(records, originals)}, score, 0.5)
    assert kept2 == kept
    assert len(A.consistency_filter(records, originals, score, ratio=1.5)[0]) < len(kept)
    with pytest.raises(ValueError):
        A.consistency_filter(records, originals, lambda p, l: np.ones(1))


# --------------------------------------------------------------------------- contact sheet, CLI
def test_contact_sheet_and_cli(tmp_path, cutouts):
    samples = write_samples(tmp_path / "train", ["高风险", "无风险", "低风险", "非楼道", "中风险"])
    (tmp_path / "train.txt").write_text("".join(f"{s.name}\t{s.label}\n" for s in samples), encoding="utf-8")
    sheet = tmp_path / "sheet.png"
    rc = A.main(["--list", str(tmp_path / "train.txt"), "--images", str(tmp_path / "train"), "--out-dir",
                 str(tmp_path / "aug"), "--cutouts", str(cutouts), "--multipliers", "高风险=2,非楼道=1",
                 "--max-pixels", str(SMALL), "--workers", "1", "--contact-sheet", str(sheet), "--no-progress"])
    assert rc == 0
    got = read_list(tmp_path / "aug" / A.LIST_NAME, tmp_path / "aug", labelled=True, progress=False)
    labels = [s.label for s in got]
    assert labels.count(HIGH_RISK) == 2 + 2 and labels.count("非楼道") == 1 and len(got) == 5
    with Image.open(sheet) as im:
        assert im.mode == "RGB" and im.height > 5 * 160 and im.width > 4 * 160
    help_text = subprocess.run([sys.executable, "-m", "tools.augment", "--help"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout
    assert "--cutouts" in help_text and "--multipliers" in help_text
    with pytest.raises(SystemExit):
        A.main(["--list", str(tmp_path / "train.txt"), "--images", str(tmp_path / "train"), "--out-dir",
                str(tmp_path / "x"), "--multipliers", "危险=1"])
    (tmp_path / "bad.txt").write_text("missing.jpg\t高风险\n", encoding="utf-8")
    assert A.main(["--list", str(tmp_path / "bad.txt"), "--images", str(tmp_path / "train"), "--out-dir",
                   str(tmp_path / "x"), "--no-progress"]) == 1
