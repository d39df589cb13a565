"""The consistency filter: drop augmented copies the model no longer reads as their label.

`consistency_filter` is the rule on any scorer; `filter_records` feeds it prior-corrected probabilities from a
model (tools.model.score, as test.sh scores), and `choose_filter_model` picks that model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from tools.data.lists import Sample
from tools.task import LABEL_TO_INDEX, LABELS, Layout, sft_row

FILTER_MODES = ("auto", "0", "1")
DEFAULT_RATIO = 0.5
VectorsFn = Callable[[list[str]], np.ndarray]  # image paths -> [N, 5] probabilities (LABELS order)
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

    def probs_of(paths: list[str], labels: list[str]) -> np.ndarray:
        p = np.asarray(score_fn(paths, labels), dtype=np.float64).reshape(-1)
        if p.shape[0] != len(paths):
            raise ValueError(f"score_fn returned {p.shape[0]} probabilities for {len(paths)} images")
        return p

    p_aug = probs_of([str(r.path) for r in records], [r.label for r in records])
    unique = list(dict.fromkeys((str(o.path), o.label) for o in orig))
    p_unique = dict(zip(unique, probs_of([u[0] for u in unique], [u[1] for u in unique])))
    p_orig = np.array([p_unique[(str(o.path), o.label)] for o in orig])
    keep = p_aug >= ratio * p_orig  # False for NaN
    kept = []
    for r, k in zip(records, keep):
        if k:
            kept.append(r)
        else:
            dropped[r.label] += 1
    return kept, dropped


def filter_records(records: Sequence[Sample], originals: Sequence[Sample], vectors_fn: VectorsFn,
                   ratio: float = DEFAULT_RATIO, prior_images: Sequence[Sample] = ()
                   ) -> tuple[list[Sample], dict[str, int], np.ndarray]:
    """consistency_filter with prior-corrected probabilities p(label|image)/π(label).

    With π the model's mean probability vector over prior_images (default: the distinct originals), a copy is
    kept when p(y'|copy)/π(y') ≥ ratio · p(y|original)/π(y), y' the copy's label and y the original's. For a
    copy that keeps the label π cancels: p(y|copy) ≥ ratio · p(y|original). For an insertion copy (y' = 高风险)
    the prior correction makes the test "the pasted hazard is as much evidence for 高风险 as the source was for
    its own label", which a model that leans on class priors cannot fail for every copy at once.
    Every distinct image is scored once by vectors_fn. Returns (kept, dropped per label, π)."""
    records, originals = list(records), list(originals)
    if not records:
        return [], dict.fromkeys(LABELS, 0), np.full(len(LABELS), 1 / len(LABELS))
    prior_paths = [str(s.path) for s in (prior_images or originals)]
    paths = list(dict.fromkeys([str(r.path) for r in records] + [str(o.path) for o in originals] + prior_paths))
    probs = np.asarray(vectors_fn(paths), dtype=np.float64)
    if probs.shape != (len(paths), len(LABELS)):
        raise ValueError(f"the model returned shape {probs.shape} for {len(paths)} images")
    vec = dict(zip(paths, probs))
    prior = np.mean([vec[p] for p in dict.fromkeys(prior_paths)], axis=0)
    prior = np.maximum(prior, 1e-9)

    def corrected(ps: list[str], labels: list[str]) -> np.ndarray:
        return np.array([vec[p][LABEL_TO_INDEX[lab]] / prior[LABEL_TO_INDEX[lab]] for p, lab in zip(ps, labels)])

    kept, dropped = consistency_filter(records, originals, corrected, ratio)
    return kept, dropped, prior


def trained_stage1(layout: Layout, model_stage1: str | None) -> tuple[Path | None, str]:
    """The stage-1 checkpoint train.sh recorded, if it exists and was trained from model_stage1."""
    from tools.model.checkpoint import read_pointer

    try:
        ckpt = read_pointer(layout.run_dir("stage1"))
    except FileNotFoundError:
        return None, "no stage-1 checkpoint"
    args_path = ckpt / "args.json"
    if model_stage1 and args_path.exists():
        trained = json.loads(args_path.read_text(encoding="utf-8"))
        wanted = {model_stage1, str(Path(model_stage1).resolve())}
        if not wanted & {str(trained.get(k)) for k in ("model", "model_dir")}:
            return None, f"stage-1 checkpoint {ckpt} was trained from {trained.get('model')}, not {model_stage1}"
    return ckpt, f"stage-1 checkpoint {ckpt}"


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def choose_filter_model(mode: str, layout: Layout, model_stage1: str | None, recipe: str | None,
                        torch_dtype: str | None, max_pixels: int) -> tuple[list[str] | None, str]:
    """(swift infer arguments for tools.model.infer.load, or None for no filter; what was chosen and why).

    `auto` scores with the stage-1 checkpoint when train.sh trained one from model_stage1, else with the
    stage-1 base model; it skips the filter when the recipe is not `demo` and no GPU is visible (a 7B on CPU
    would take hours). `1` always filters (and fails if it cannot); `0` never does."""
    if mode not in FILTER_MODES:
        raise ValueError(f"filter mode must be one of {FILTER_MODES}, got {mode!r}")
    if mode == "0":
        return None, "off (--filter 0)"
    ckpt, why = trained_stage1(layout, model_stage1)
    if ckpt is not None:
        argv, what = ["--adapters", str(ckpt)], why
    elif model_stage1:
        argv = ["--model", model_stage1, "--template", "qwen2_5_vl"]
        argv += ["--torch_dtype", torch_dtype] if torch_dtype else []
        what = f"stage-1 base model {model_stage1} ({why})"
    else:
        if mode == "1":
            raise ValueError("--filter 1 needs --model-stage1 or a stage-1 checkpoint")
        return None, f"skipped: {why} and no --model-stage1"
    if mode == "auto" and recipe != "demo" and not cuda_available():
        return None, (f"skipped: no GPU visible for the {recipe or 'real'} recipe's model (a 7B on CPU takes "
                      "hours); AUGMENT_FILTER=1 (--filter 1) scores anyway")
    return argv + ["--max_pixels", str(max_pixels)], what


def model_vectors_fn(swift_argv: list[str], batch_size: int = 8, progress: bool = True,
                     devices: list[str | None] | None = None) -> VectorsFn:
    """Load once with tools.model.infer.load (as test.sh does); score image paths with score_rows.

    With several GPUs visible (SCORE_GPUS, as test.sh: tools.model.shards) the images are scored by one process per
    GPU, each loading the model when the function is called (a failure there raises tools.model.shards.ShardsFailed);
    `devices` overrides the choice (None entries: CPU processes, for tests)."""
    import os

    from tools.model import shards

    if devices is None:
        visible = shards.visible_gpus()
        devices = shards.scoring_devices(os.environ.get(shards.ENV_GPUS), visible) if len(visible) > 1 else []
    if devices:
        return lambda paths: shards.vectors_on_gpus(swift_argv, list(paths), devices, batch_size, progress)
    from tools.model.infer import load, score_rows

    model, template, label_ids, _ = load(swift_argv)

    def vectors(paths: list[str]) -> np.ndarray:
        rows = [sft_row(p, None) for p in paths]
        return score_rows(model, template, label_ids, rows, batch_size, progress=progress, tta="0")

    return vectors
