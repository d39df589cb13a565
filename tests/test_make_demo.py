"""The demo generator: official layout, class shares, determinism, and a tokenizer with Qwen's ids."""
from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
from PIL import Image

from tools import make_demo
from tools.dataset import read_list
from tools.task import LABELS


def tree_digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = make_demo.make_dataset(tmp_path / "a", seed=3, n_train=40, n_test=20, workers=2)
    b = make_demo.make_dataset(tmp_path / "b", seed=3, n_train=40, n_test=20, workers=1)
    c = make_demo.make_dataset(tmp_path / "c", seed=4, n_train=40, n_test=20, workers=1)
    assert tree_digest(a) == tree_digest(b)
    assert tree_digest(a) != tree_digest(c)


def test_official_layout_and_shares(tmp_path):
    root = make_demo.make_dataset(tmp_path / "d", seed=0, n_train=200, n_test=50, workers=2)
    train = read_list(root / "train.txt", root / "train", labelled=True, progress=False)
    test = read_list(root / "B.txt", root / "B", labelled=True, progress=False)
    counts = Counter(s.label for s in train)
    assert counts == {label: max(2, round(200 * make_demo.CLASS_SHARES[label])) for label in LABELS}
    assert all(s.name == hashlib.md5(s.path.read_bytes()).hexdigest() + ".jpg" for s in train)
    assert len(test) == 50 and {s.label for s in test} == set(LABELS)
    high = [s for s in train if s.label == "高风险"]
    assert len({hashlib.md5(s.path.read_bytes()).hexdigest() for s in high}) == len(high)  # distinct images
    with Image.open(train[0].path) as img:
        assert img.size == (make_demo.IMAGE_SIZE, make_demo.IMAGE_SIZE)
    cutouts = sorted((root / "cutouts").glob("*.png"))
    assert cutouts and Image.open(cutouts[0]).mode == "RGBA"


def test_high_risk_images_show_a_hazard_colour():
    # A hazard's saturated frame or casing must be visible: some pixels far from the grey/beige scene palette.
    def saturated_share(label, seed):
        rng = np.random.default_rng(seed)
        hsv = np.asarray(make_demo.risk_scene(rng, label).image.convert("HSV"), dtype=float)
        return ((hsv[..., 1] > 150) & (hsv[..., 2] > 100)).mean()

    high = np.mean([saturated_share("高风险", s) for s in range(12)])
    empty = np.mean([saturated_share("无风险", s) for s in range(12)])
    assert high - empty > 0.004  # ≥ ~200 more hazard-coloured pixels per 224² image on average


def test_tokenizer_has_qwen_special_ids(tmp_path):
    from transformers import AutoTokenizer

    make_demo.write_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == 151665
    for token, token_id in make_demo.QWEN_SPECIAL_TOKENS.items():
        assert tok.convert_tokens_to_ids(token) == token_id
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    from tools.score import label_token_ids

    assert len(set(label_token_ids(tok))) == len(LABELS)


def test_description_names_hazards_first_and_never_a_risk_label():
    # The pre-training description's first word must depend on what the image shows (hazard, clutter, nothing,
    # another scene), so the answer position learns to read the image; risk labels never appear in it.
    assert make_demo.describe("outdoor", [], "没有") == "户外的街道"
    assert make_demo.describe("room", [], "没有") == "家里的房间"
    assert make_demo.describe("corridor", [], "没有") == "空的走廊"
    assert make_demo.describe("corridor", ["box", "chair", "box"], "很多") == "很多物品：纸箱、椅子"
    assert make_demo.describe("corridor", ["shoes"], "一两件") == "一两件物品：鞋子"
    # Hazards lead, in a fixed order, whatever the drawing order.
    assert make_demo.describe("corridor", ["box", "cable", "ebike"], "一两件") == "电动车、充电线，还有一两件物品：纸箱"
    assert make_demo.describe("corridor", ["battery"], "一两件") == "电池"
    texts = []
    for seed in range(40):
        *_, description = make_demo.pretrain_example(np.random.default_rng(seed))
        texts.append(description)
    assert not any(label in t for t in texts for label in LABELS)
    assert len({t[:2] for t in texts}) >= 4  # several distinct openings over a few dozen images
