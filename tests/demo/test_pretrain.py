"""tools.demo.pretrain: the pre-training tasks never pair an image with a risk label, and their answers depend on
the image."""
from __future__ import annotations

import numpy as np

from tools.demo import pretrain as P
from tools.task import LABELS


def test_description_names_hazards_first_and_never_a_risk_label():
    # The pre-training description's first word must depend on what the image shows (hazard, clutter, nothing,
    # another scene), so the answer position learns to read the image; risk labels never appear in it.
    assert P.describe("outdoor", [], "没有") == "户外的街道"
    assert P.describe("room", [], "没有") == "家里的房间"
    assert P.describe("corridor", [], "没有") == "空的走廊"
    assert P.describe("corridor", ["box", "chair", "box"], "很多") == "很多物品：纸箱、椅子"
    assert P.describe("corridor", ["shoes"], "一两件") == "一两件物品：鞋子"
    # Hazards lead, in a fixed order, whatever the drawing order.
    assert P.describe("corridor", ["box", "cable", "ebike"], "一两件") == "电动车、充电线，还有一两件物品：纸箱"
    assert P.describe("corridor", ["battery"], "一两件") == "电池"
    texts = []
    for seed in range(40):
        *_, description = P.pretrain_example(np.random.default_rng(seed))
        texts.append(description)
    assert not any(label in t for t in texts for label in LABELS)
    assert len({t[:2] for t in texts}) >= 4  # several distinct openings over a few dozen images


def test_copy_and_choice_tasks():
    for seed in range(30):
        rng = np.random.default_rng(seed)
        question, answer = P.copy_example(rng)
        words = question.split("：", 1)[1].split("。")[0].split("、")
        k = int(question.split("第")[1].split("个")[0])
        assert len(words) == 5 and words[k - 1] == answer
        *_, caption, _ = P.pretrain_example(np.random.default_rng(seed))
        question, answer = P.choice_example(np.random.default_rng(seed), caption)
        assert f"{answer}（" in question  # the answer is one of the listed options
        assert not any(label in caption for label in LABELS)
