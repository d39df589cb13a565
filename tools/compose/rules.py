"""The stage-set composition rules: which rows each stage trains on, given the training split and the augmented
copies. Pure functions of their inputs and a seed."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from tools.data.lists import Sample
from tools.task import HIGH_RISK, LABELS, MEDIUM_RISK

# The defaults of the composition knobs (STAGE1_MIN_SHARE, STAGE2_HIGH_REPEAT, STAGE2_OTHER_RATIO in
# data-pre.sh; --stage1-min-share ... in tools.compose.stage_sets); the manifest records the values used.
DEFAULT_COMPOSITION = {"stage1_min_share": 0.1, "stage2_high_repeat": 3, "stage2_other_ratio": 2.0}


def oversample(samples: list[Sample], min_share: float, seed: int) -> list[Sample]:
    """Repeat each rare label's images (whole copies, then a seeded sample) until it makes up at least
    `min_share` of the rows. The result is shuffled with the seed."""
    rng = np.random.default_rng(seed)
    by_label = {label: [s for s in samples if s.label == label] for label in LABELS if any(s.label == label for s in samples)}
    # Final size T: the common labels keep their count and each rare one becomes min_share·T, so
    # T = common / (1 - #rare·min_share). A label that falls under the share as T grows becomes rare too.
    rare: set[str] = set()
    while True:
        common = sum(len(v) for k, v in by_label.items() if k not in rare)
        total = common / (1 - len(rare) * min_share) if len(rare) * min_share < 1 else float("inf")
        grown = {k for k, v in by_label.items() if k not in rare and len(v) < min_share * total}
        if not grown or total == float("inf"):
            break
        rare |= grown
    rows: list[Sample] = []
    for label, items in by_label.items():
        target = int(np.ceil(min_share * total)) if label in rare and total != float("inf") else len(items)
        reps, extra = divmod(max(target, len(items)), len(items))
        rows += items * reps + [items[i] for i in rng.permutation(len(items))[:extra]]
    return [rows[i] for i in rng.permutation(len(rows))]


def stage1_set(samples: list[Sample], min_share: float, seed: int, augmented: Sequence[Sample] = ()) -> list[Sample]:
    """Stage 1's training rows: the originals and every augmented copy, then plain repeats (oversample) only
    for a label still under `min_share` of the rows. Without copies this is oversample(samples) exactly."""
    return oversample(list(samples) + list(augmented), min_share, seed)


def stage2_set(samples: list[Sample], high_repeat: int, other_ratio: float, seed: int,
               augmented: Sequence[Sample] = ()) -> list[Sample]:
    """The specialist's training rows: 高风险 ×high_repeat, all 中风险, and other_ratio × #高风险 of the rest.

    Sizes are set by the original images. With augmented copies, the 高风险 block is the originals plus a
    seeded sample of the 高风险 copies (insertion-made ones included) in place of the plain repeats; a
    repeat is used only when there are too few copies."""
    rng = np.random.default_rng(seed)
    high = [s for s in samples if s.label == HIGH_RISK]
    medium = [s for s in samples if s.label == MEDIUM_RISK]
    rest = [s for s in samples if s.label not in (HIGH_RISK, MEDIUM_RISK)]
    n_rest = min(len(rest), round(other_ratio * len(high)))
    picked = [rest[i] for i in sorted(rng.permutation(len(rest))[:n_rest])]
    copies = [a for a in augmented if a.label == HIGH_RISK]
    if copies and high and high_repeat >= 1:
        aug_rng = np.random.default_rng([seed, 2])  # its own stream: the rows above are as without copies
        n_copies = min(len(copies), (high_repeat - 1) * len(high))
        high_rows = high + [copies[i] for i in sorted(aug_rng.permutation(len(copies))[:n_copies])]
        reps, extra = divmod(high_repeat * len(high) - len(high_rows), len(high))
        high_rows += high * reps + [high[i] for i in sorted(aug_rng.permutation(len(high))[:extra])]
    else:
        high_rows = high * high_repeat
    rows = high_rows + medium + picked
    return [rows[i] for i in rng.permutation(len(rows))]


def stage_sets(samples: list[Sample], composition: dict, seed: int, augmented: Sequence[Sample] = ()
               ) -> tuple[list[Sample], list[Sample]]:
    """(stage-1 rows, stage-2 rows) with the given composition settings."""
    return (stage1_set(samples, composition["stage1_min_share"], seed, augmented),
            stage2_set(samples, composition["stage2_high_repeat"], composition["stage2_other_ratio"], seed,
                       augmented))
