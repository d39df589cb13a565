"""The augmentation plan: which copies each training original gets, with which transforms and seed.

Randomness: each job's numbers come from numpy SeedSequence(seed, image name, copy index), so the same seed gives
the same bytes whatever the number of worker processes.
"""
from __future__ import annotations

import argparse
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from tools.augment.images import list_cutouts
from tools.augment.transforms import TRANSFORMS, AugmentConfig, job_streams, label_after
from tools.data.lists import Sample
from tools.task import HIGH_RISK, LABELS, LABEL_TO_INDEX

# Extra copies per original, by label (0 = no extra copy). Chosen for the real class shares (无风险 ~59 %,
# 中风险 ~19 %, 低风险 ~14 %, 高风险 ~5 %, 非楼道 ~3 %): 高风险 ends at 11× and 非楼道 at 5× their originals.
# A fraction gives that share of the originals one more copy (a seeded choice).
DEFAULT_MULTIPLIERS: dict[str, float] = {"高风险": 10, "中风险": 0, "低风险": 0, "无风险": 0, "非楼道": 4}
INSERT_SOURCES = ("无风险", "低风险")  # images a hazard may be pasted into
INSERT_PER_HIGH = 2.0  # default insertion jobs per 高风险 original, when cut-outs are given


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
    rng = job_streams(seed)["plan"]
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
            cut = cutout_paths[int(job_streams(js)["cutout"].integers(len(cutout_paths)))]
            jobs.append(AugmentJob(s, copy, js, _choose_transforms(js, config, insert=True), cut, stems[s.name]))
    return jobs



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

