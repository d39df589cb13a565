r"""Augment the training split (VL-ADAS, tools.augment), filter the copies with a model, and add them to the
stage-1 and stage-2 training sets. data-pre.sh runs this after tools.prepare_data (AUGMENT=1, the default).

    python -m tools.augment_data --output-dir outputs --max-pixels 28224 --cutouts data/demo/cutouts \
        --model-stage1 .cache/demo-models/v2-seed0/stage1 --recipe demo [--filter auto]

Reads only what tools.prepare_data wrote: <output-dir>/data/train_split.txt (the training part of the split;
validation and test images are never read, so no copy of them can exist) and manifest.json. Writes, under
<output-dir>/data/augmented/:
  images/            the kept copies, <stem>_aug<k>.jpg, already at the model's size
  dropped/           the copies the consistency filter dropped, for inspection
  augmented.txt      the kept copies as <image>\t<label> (readable by tools.dataset)
  index.tsv          every copy: name, label, source image, source label, transforms, kept
  report.json        counts per class (copies, inserted, dropped, kept), the filter's model and rule
  contact_sheet.png  one row per original: original | geometric | colour | padding | insert
and rewrites stage1_train.jsonl and stage2_train.jsonl (tools.prepare_data.stage1_set / stage2_set with the
kept copies: they take the place of plain repeats) and the counts in manifest.json. With folds (FOLDS > 1,
data/folds/<i>/), each fold's two training JSONLs are rewritten the same way with only the copies whose source
image is outside that fold (index.tsv's `source`), so a held-out image never reaches its fold's training rows,
not even as a copy. The validation, test and held-out JSONLs are not touched.

Consistency filter (--filter): `auto` scores with the stage-1 checkpoint when <output-dir>/stage1 has one
trained from --model-stage1 (a train.sh run before), else with the stage-1 base model; it skips the filter
when the recipe is not `demo` and no GPU is visible (a 7B on CPU would take hours) or when the model cannot be
loaded. `1` always filters (and fails if it cannot); `0` never does. Scoring is tools.score's, as test.sh.
Rule: with π the model's mean probability vector over a sample of the training originals (its prior), keep a
copy when p(y'|copy)/π(y') ≥ ratio · p(y|original)/π(y), y' the copy's label and y the original's. For a copy
that keeps the label π cancels: p(y|copy) ≥ ratio · p(y|original). For an insertion copy (y' = 高风险) the
prior correction makes the test "the pasted hazard is as much evidence for 高风险 as the source was for its
own label", which a model that leans on class priors cannot fail for every copy at once.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from tools import augment as A
from tools.dataset import DataError, Sample, class_counts, read_list, write_list
from tools.fileio import atomic_open, write_json
from tools.prepare_data import (DEFAULT_COMPOSITION, augmented_dir, count_table, read_folds, stage_sets,
                                train_split_list, write_folds, write_sft_rows)
from tools.task import LABEL_TO_INDEX, LABELS, Layout, read_json, sft_row

FILTER_MODES = ("auto", "0", "1")
DEFAULT_RATIO = 0.5
PRIOR_SAMPLE = 128  # training originals scored to estimate the model's prior π
CONTACT_ROWS = 6
VectorsFn = Callable[[list[str]], np.ndarray]  # image paths -> [N, 5] probabilities (LABELS order)


# --------------------------------------------------------------------------- inputs
def load_split(layout: Layout) -> tuple[dict, list[Sample], set[str]]:
    """(manifest, training part of the split, validation image names), as tools.prepare_data wrote them."""
    if not layout.manifest.exists() or not train_split_list(layout).exists():
        raise DataError(f"{layout.data_dir}: no manifest.json or {train_split_list(layout).name}: "
                        "run tools.prepare_data (data-pre.sh) first")
    manifest = read_json(layout.manifest)
    fit = read_list(train_split_list(layout), manifest["train_images"], labelled=True, check_images=False)
    val = set()
    if layout.val_list.exists() and layout.val_list.read_text(encoding="utf-8").strip():
        val = {s.name for s in read_list(layout.val_list, manifest["train_images"], labelled=True,
                                         check_images=False)}
    leaked = {s.name for s in fit} & val
    if leaked:
        raise DataError(f"{train_split_list(layout)}: {len(leaked)} image(s) also in {layout.val_list}, "
                        f"e.g. {sorted(leaked)[0]}")
    return manifest, fit, val


# --------------------------------------------------------------------------- the model
def find_checkpoint(layout: Layout, model_stage1: str | None) -> tuple[Path | None, str]:
    """The stage-1 checkpoint train.sh recorded, if it exists and was trained from model_stage1."""
    from tools.checkpoint import read_pointer

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
    """(swift infer arguments for tools.score.load, or None for no filter; what was chosen and why)."""
    if mode not in FILTER_MODES:
        raise ValueError(f"filter mode must be one of {FILTER_MODES}, got {mode!r}")
    if mode == "0":
        return None, "off (--filter 0)"
    ckpt, why = find_checkpoint(layout, model_stage1)
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


def model_vectors_fn(swift_argv: list[str], batch_size: int = 8, progress: bool = True) -> VectorsFn:
    """Load once with tools.score.load (as test.sh does); score image paths with tools.score.score_rows."""
    from tools.score import load, score_rows

    model, template, label_ids, _ = load(swift_argv)

    def vectors(paths: list[str]) -> np.ndarray:
        rows = [sft_row(p, None) for p in paths]
        return score_rows(model, template, label_ids, rows, batch_size, progress=progress)

    return vectors


# --------------------------------------------------------------------------- filter
def filter_records(records: Sequence[Sample], originals: Sequence[Sample], vectors_fn: VectorsFn,
                   ratio: float = DEFAULT_RATIO, prior_images: Sequence[Sample] = ()
                   ) -> tuple[list[Sample], dict[str, int], np.ndarray]:
    """tools.augment.consistency_filter with prior-corrected probabilities p(label|image)/π(label).

    Every distinct image (copies, their originals, prior_images) is scored once by vectors_fn. π is the mean
    vector over prior_images (default: the distinct originals). Returns (kept, dropped per label, π)."""
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

    def score(ps: list[str], labels: list[str]) -> np.ndarray:
        return np.array([vec[p][LABEL_TO_INDEX[lab]] / prior[LABEL_TO_INDEX[lab]] for p, lab in zip(ps, labels)])

    kept, dropped = A.consistency_filter(records, originals, score, ratio)
    return kept, dropped, prior


# --------------------------------------------------------------------------- steps
def write_index(path: Path, records: Sequence[Sample], jobs: Sequence[A.AugmentJob], kept: set[str]) -> None:
    with atomic_open(path) as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["image", "label", "source", "source_label", "transforms", "kept"])
        for r, j in zip(records, jobs):
            w.writerow([r.name, r.label, j.sample.name, j.sample.label, "+".join(j.transforms), int(r.name in kept)])


def read_index(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def augment(args: argparse.Namespace, vectors_fn: VectorsFn | None = None) -> dict:
    """The whole step; vectors_fn replaces the model (tests). Returns the report written to report.json."""
    start = time.time()
    layout = Layout(args.output_dir)
    manifest, fit, _ = load_split(layout)
    seed = manifest["seed"] if args.seed is None else args.seed
    comp = {**DEFAULT_COMPOSITION, **manifest.get("composition", {})}
    folds = manifest.get("folds", 1)
    heldout = read_folds(layout, folds, manifest["train_images"]) if folds > 1 else []  # read before writing
    if args.cutouts and not Path(args.cutouts).is_dir():
        raise DataError(f"{args.cutouts}: cut-out folder not found (CUTOUTS_DIR=none turns insertion off)")
    out = augmented_dir(layout)
    shutil.rmtree(out, ignore_errors=True)
    images, dropped_dir = out / "images", out / "dropped"

    jobs = A.plan_augmentation(fit, args.multipliers, args.targets, seed=seed, cutouts=args.cutouts,
                               n_insert=args.insert)
    t = time.time()
    records = A.run_plan(jobs, images, max_pixels=args.max_pixels, workers=args.workers,
                         progress=not args.no_progress)
    render_s = time.time() - t
    originals = [j.sample for j in jobs]
    print(f"augmented {len(records)} copies of {len({o.name for o in originals})} originals in {render_s:.1f} s "
          f"({len(records) / max(render_s, 1e-9):.1f} images/s, {args.workers or os.cpu_count()} workers)")

    # the consistency filter
    t = time.time()
    filt: dict = {"mode": args.filter, "ratio": args.filter_ratio}
    if vectors_fn is None and records:
        argv, what = choose_filter_model(args.filter, layout, args.model_stage1, args.recipe, args.torch_dtype,
                                         args.max_pixels)
        filt["model"] = what
        if argv is not None:
            print(f"consistency filter: {what}")
            try:
                vectors_fn = model_vectors_fn(argv, args.score_batch_size, progress=not args.no_progress)
            except Exception as e:  # noqa: BLE001 - auto is best effort; 1 must not degrade silently
                if args.filter == "1":
                    raise
                filt["model"] = f"skipped: could not load {what} ({type(e).__name__}: {e})"
                print(f"warning: consistency filter {filt['model']}", file=sys.stderr)
    elif vectors_fn is not None:
        filt["model"] = "given scorer"
    if vectors_fn is not None and records:
        rng = np.random.default_rng([seed, 3])
        prior_images = [fit[i] for i in sorted(rng.permutation(len(fit))[:PRIOR_SAMPLE])]
        kept, dropped, prior = filter_records(records, originals, vectors_fn, args.filter_ratio, prior_images)
        filt.update(applied=True, prior=dict(zip(LABELS, np.round(prior, 4).tolist())),
                    seconds=round(time.time() - t, 1))
    else:
        kept, dropped = list(records), dict.fromkeys(LABELS, 0)
        filt.update(applied=False)
        print(f"consistency filter: {filt.get('model', 'nothing to filter')}")
    kept_names = {r.name for r in kept}
    lost = [r for r in records if r.name not in kept_names]
    if lost:
        dropped_dir.mkdir(parents=True, exist_ok=True)
        for r in lost:
            os.replace(r.path, dropped_dir / r.name)

    # new training sets: the kept copies take the place of plain repeats
    stage1, stage2 = stage_sets(fit, comp, seed, kept)
    write_sft_rows(layout.train_jsonl("stage1"), stage1)
    write_sft_rows(layout.train_jsonl("stage2"), stage2)
    if heldout:
        sources = {r.name: j.sample.name for r, j in zip(records, jobs)}
        manifest["counts"]["folds"] = write_folds(layout, fit, heldout, comp, seed, kept, sources)
    write_list(out / A.LIST_NAME, kept)
    write_index(out / "index.tsv", records, jobs, kept_names)

    sheet = out / "contact_sheet.png"
    A.contact_sheet(A.contact_rows(fit, args.contact_rows), sheet, cutouts=args.cutouts, seed=seed,
                    max_pixels=args.max_pixels)

    inserted = [r for r, j in zip(records, jobs) if "insert" in j.transforms]
    report = {
        "seed": seed, "max_pixels": args.max_pixels, "cutouts": str(Path(args.cutouts).resolve()) if args.cutouts
        else None, "multipliers": {**A.DEFAULT_MULTIPLIERS, **args.multipliers}, "targets": args.targets,
        "counts": {"originals": class_counts(fit), "copies": class_counts(records),
                   "inserted": class_counts(inserted), "dropped": dropped, "kept": class_counts(kept)},
        "filter": filt, "render_seconds": round(render_s, 1), "seconds": round(time.time() - start, 1),
        "contact_sheet": str(sheet),
    }
    write_json(out / "report.json", report)
    manifest["augmentation"] = report
    manifest["counts"]["stage1_rows"] = class_counts(stage1)
    manifest["counts"]["stage2_rows"] = class_counts(stage2)
    write_json(layout.manifest, manifest)

    print(count_table({"train": fit, "copies": records, "inserted": inserted, "dropped": lost, "kept": kept,
                       "stage1": stage1, "stage2": stage2}))
    print("dropped by the consistency filter: "
          + (", ".join(f"{label} {n}" for label, n in dropped.items()) if filt["applied"] else "filter not run"))
    print(f"wrote {out} (contact sheet {sheet.name}) and the stage-1/stage-2 training JSONL")
    return report


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m tools.augment_data", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output-dir", default="outputs", help="pipeline output folder (default: %(default)s)")
    ap.add_argument("--max-pixels", type=int, default=A.DEFAULT_MAX_PIXELS,
                    help="the model's image size, the recipe's MAX_PIXELS (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=None, help="default: the split's seed (manifest.json)")
    ap.add_argument("--cutouts", help="folder of RGBA PNG hazard cut-outs; without it, no insertion")
    ap.add_argument("--multipliers", type=A.parse_label_numbers, default={},
                    help="extra copies per original, e.g. 高风险=10,非楼道=4 (defaults: "
                         + ",".join(f"{k}={v:g}" for k, v in A.DEFAULT_MULTIPLIERS.items()) + ")")
    ap.add_argument("--targets", type=partial(A.parse_label_numbers, kind=int), default={},
                    help="total images per label instead, e.g. 高风险=400 (overrides that label's multiplier)")
    ap.add_argument("--insert", type=int, default=None,
                    help=f"insertion copies (new 高风险 from {'/'.join(A.INSERT_SOURCES)} images); default "
                         f"{A.INSERT_PER_HIGH:g}× the 高风险 originals with --cutouts, else 0")
    ap.add_argument("--filter", choices=FILTER_MODES, default="auto", help="consistency filter (default: auto)")
    ap.add_argument("--filter-ratio", type=float, default=DEFAULT_RATIO,
                    help="keep a copy whose prior-corrected probability is ≥ this × its original's "
                         "(default: %(default)s)")
    ap.add_argument("--model-stage1", help="stage-1 base model (id or folder), for the filter without a checkpoint")
    ap.add_argument("--recipe", help="recipe name; with `auto`, a non-demo recipe filters only on a GPU")
    ap.add_argument("--torch-dtype", help="dtype for the base model (the recipe's TORCH_DTYPE)")
    ap.add_argument("--score-batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=None, help="processes for augmenting (default: all cores)")
    ap.add_argument("--contact-rows", type=int, default=CONTACT_ROWS, help="originals on the contact sheet")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        augment(args)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
