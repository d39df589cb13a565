"""tools.demo.data: the demo dataset in the official layout, its class shares, determinism, and its hazards."""
from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from tools.demo import data as D
from tools.data.lists import read_list
from tools.task import LABELS


def tree_digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = D.make_dataset(tmp_path / "a", seed=3, n_train=40, n_test=20, workers=2)
    b = D.make_dataset(tmp_path / "b", seed=3, n_train=40, n_test=20, workers=1)
    c = D.make_dataset(tmp_path / "c", seed=4, n_train=40, n_test=20, workers=1)
    assert tree_digest(a) == tree_digest(b)
    assert tree_digest(a) != tree_digest(c)


def test_official_layout_and_shares(tmp_path):
    root = D.make_dataset(tmp_path / "d", seed=0, n_train=200, n_test=50, workers=2)
    train = read_list(root / "train.txt", root / "train", labelled=True, progress=False)
    test = read_list(root / "B.txt", root / "B", labelled=True, progress=False)
    counts = Counter(s.label for s in train)
    assert counts == {label: max(2, round(200 * D.CLASS_SHARES[label])) for label in LABELS}
    assert all(s.name == hashlib.md5(s.path.read_bytes()).hexdigest() + ".jpg" for s in train)
    assert len(test) == 50 and {s.label for s in test} == set(LABELS)
    high = [s for s in train if s.label == "高风险"]
    assert len({hashlib.md5(s.path.read_bytes()).hexdigest() for s in high}) == len(high)  # distinct images
    with Image.open(train[0].path) as img:
        assert img.size == (D.IMAGE_SIZE, D.IMAGE_SIZE)
    cutouts = sorted((root / "cutouts").glob("*.png"))
    assert cutouts and Image.open(cutouts[0]).mode == "RGBA"


def test_high_risk_images_show_a_hazard_colour():
    # A hazard's saturated frame or casing must be visible: some pixels far from the grey/beige scene palette.
    def saturated_share(label, seed):
        rng = np.random.default_rng(seed)
        hsv = np.asarray(D.risk_scene(rng, label).image.convert("HSV"), dtype=float)
        return ((hsv[..., 1] > 150) & (hsv[..., 2] > 100)).mean()

    high = np.mean([saturated_share("高风险", s) for s in range(12)])
    empty = np.mean([saturated_share("无风险", s) for s in range(12)])
    assert high - empty > 0.004  # ≥ ~200 more hazard-coloured pixels per 224² image on average


def test_label_plan_and_image_seeds():
    labels = D.label_plan(100, np.random.default_rng(0))
    assert Counter(labels) == {"无风险": 59, "中风险": 19, "低风险": 14, "高风险": 5, "非楼道": 3}
    assert D.label_plan(100, np.random.default_rng(0)) == labels != D.label_plan(100, np.random.default_rng(1))
    small = Counter(D.label_plan(10, np.random.default_rng(0)))
    assert small["高风险"] == 2 and small["非楼道"] == 2 and sum(small.values()) == 10  # rare classes at least 2
    draw = lambda *a: np.random.default_rng(D.image_seed(*a)).random()  # noqa: E731
    assert draw(0, "train", 1) == draw(0, "train", 1)
    assert len({draw(0, "train", 1), draw(0, "test", 1), draw(0, "train", 2), draw(1, "train", 1)}) == 4


def test_risk_scene_kinds():
    for seed in range(6):
        assert D.risk_scene(np.random.default_rng(seed), "非楼道").kind in ("outdoor", "room")
        high = D.risk_scene(np.random.default_rng(seed), "高风险")
        assert high.kind == "corridor" and set(high.objects) & {"ebike", "battery"}
        assert D.risk_scene(np.random.default_rng(seed), "无风险").objects == []
        medium = D.risk_scene(np.random.default_rng(seed), "中风险").objects
        assert len(medium) >= 5 and not set(medium) & {"ebike", "battery"}
    with pytest.raises(ValueError, match="unknown label"):
        D.risk_scene(np.random.default_rng(0), "危险")
