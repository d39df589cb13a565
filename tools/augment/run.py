r"""Step 2 of data-pre.sh (AUGMENT=1): augment the training split (VL-ADAS) and filter the copies with a model.

    python -m tools.augment.run --output-dir outputs --max-pixels 28224 --cutouts data/demo/cutouts \
        --model-stage1 .cache/demo-models/v4-seed0/stage1 --recipe demo [--filter auto]

Reads only the training part of the split (<output-dir>/data/split/train.txt and split.json, written by
tools.data.prepare): validation and test images are never read, so no copy of them can exist. Writes only its
own folder, <output-dir>/data/augmented/ (tools.task.Layout), replacing what an earlier run left there:
  images/            the kept copies, <stem>_aug<k>.jpg, already at the model's size
  dropped/           the copies the consistency filter dropped, for inspection
  augmented.txt      the kept copies as <image>\t<label> (readable by tools.data.lists)
  index.tsv          every copy: name, label, source image, source label, transforms, kept
  report.json        counts per class (copies, inserted, dropped, kept), the filter's model and rule, and the
                     digest of the split the copies belong to
  contact_sheet.png  one row per original: original | geometric | colour | padding | insert
tools.compose.stage_sets then puts the kept copies into the training sets, in place of plain repeats.

Consistency filter (--filter, tools.augment.filter): `auto` scores with the stage-1 checkpoint when
<output-dir>/stage1 has one trained from --model-stage1 (a train.sh run before), else with the stage-1 base
model; it skips the filter when the recipe is not `demo` and no GPU is visible (a 7B on CPU would take hours) or
when the model cannot be loaded. `1` always filters (and fails if it cannot); `0` never does. Scoring is
tools.model.score's, as in test.sh, one process per visible GPU (SCORE_GPUS; tools.model.shards). Rule: with π the
model's mean probability vector over a sample of the training originals (its prior), keep a copy when
p(y'|copy)/π(y') ≥ ratio · p(y|original)/π(y).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

from tools import cli
from tools.augment import filter as F
from tools.augment.contact_sheet import contact_rows, contact_sheet
from tools.augment.images import DEFAULT_MAX_PIXELS
from tools.augment.plan import DEFAULT_MULTIPLIERS, INSERT_PER_HIGH, INSERT_SOURCES, parse_label_numbers, plan_augmentation
from tools.augment.record import split_digest, write_index
from tools.augment.render import run_plan
from tools.augment.transforms import AugmentConfig
from tools.data.lists import Sample, class_counts, count_table, read_list, write_list
from tools.fileio import DataError, read_json, write_json
from tools.model.shards import ShardsFailed
from tools.task import LABELS, Layout

PRIOR_SAMPLE = 128  # training originals scored to estimate the model's prior π
CONTACT_ROWS = 6


def load_split(layout: Layout) -> tuple[dict, list[Sample]]:
    """(split record, training part of the split), as tools.data.prepare wrote them."""
    if not layout.split_record.exists() or not layout.train_split.exists():
        raise DataError(f"{layout.split_dir}: no split.json or train.txt: run tools.data.prepare (data-pre.sh) first")
    record = read_json(layout.split_record)
    fit = read_list(layout.train_split, record["train_images"], labelled=True, check_images=False, progress=False)
    return record, fit


def augment(args: argparse.Namespace, vectors_fn: F.VectorsFn | None = None) -> dict:
    """The whole step; vectors_fn replaces the model (tests). Returns the report written to report.json."""
    start = time.time()
    layout = Layout(args.output_dir)
    record, fit = load_split(layout)
    seed = record["seed"] if args.seed is None else args.seed
    if args.cutouts and not Path(args.cutouts).is_dir():
        raise DataError(f"{args.cutouts}: cut-out folder not found (CUTOUTS_DIR=none turns insertion off)")
    config = AugmentConfig(hazard_hues_deg=tuple(args.hazard_hues)) if args.hazard_hues else AugmentConfig()
    shutil.rmtree(layout.augmented_dir, ignore_errors=True)  # this step's own folder: earlier copies are replaced

    jobs = plan_augmentation(fit, args.multipliers, args.targets, seed=seed, config=config, cutouts=args.cutouts,
                             n_insert=args.insert)
    t = time.time()
    records = run_plan(jobs, layout.augmented_images, config=config, max_pixels=args.max_pixels,
                       workers=args.workers, progress=not args.no_progress)
    render_s = time.time() - t
    originals = [j.sample for j in jobs]
    print(f"augmented {len(records)} copies of {len({o.name for o in originals})} originals in {render_s:.1f} s "
          f"({len(records) / max(render_s, 1e-9):.1f} images/s, {args.workers or os.cpu_count()} workers)")

    t = time.time()
    filt: dict = {"mode": args.filter, "ratio": args.filter_ratio}
    if vectors_fn is None and records:
        argv, what = F.choose_filter_model(args.filter, layout, args.model_stage1, args.recipe, args.torch_dtype,
                                           args.max_pixels)
        filt["model"] = what
        if argv is not None:
            print(f"consistency filter: {what}")
            try:
                vectors_fn = F.model_vectors_fn(argv, args.score_batch_size, progress=not args.no_progress)
            except Exception as e:  # noqa: BLE001 - auto is best effort; 1 must not degrade silently
                if args.filter == "1":
                    raise
                filt["model"] = f"skipped: could not load {what} ({type(e).__name__}: {e})"
                print(f"warning: consistency filter {filt['model']}", file=sys.stderr)
    elif vectors_fn is not None:
        filt["model"] = "given scorer"
    filtered = None
    if vectors_fn is not None and records:
        rng = np.random.default_rng([seed, 3])
        prior_images = [fit[i] for i in sorted(rng.permutation(len(fit))[:PRIOR_SAMPLE])]
        try:
            filtered = F.filter_records(records, originals, vectors_fn, args.filter_ratio, prior_images)
        except ShardsFailed as e:  # several GPUs: the model loads in the scoring processes, so it fails here
            if args.filter == "1":
                raise
            filt["model"] = f"skipped: {filt.get('model')} failed on several GPUs ({e})"
            print(f"warning: consistency filter {filt['model']}", file=sys.stderr)
    if filtered is not None:
        kept, dropped, prior = filtered
        filt.update(applied=True, prior=dict(zip(LABELS, np.round(prior, 4).tolist())),
                    seconds=round(time.time() - t, 1))
    else:
        kept, dropped = list(records), dict.fromkeys(LABELS, 0)
        filt.update(applied=False)
        print(f"consistency filter: {filt.get('model', 'nothing to filter')}")
    kept_names = {r.name for r in kept}
    lost = [r for r in records if r.name not in kept_names]
    if lost:
        layout.augmented_dropped.mkdir(parents=True, exist_ok=True)
        for r in lost:
            os.replace(r.path, layout.augmented_dropped / r.name)

    write_list(layout.augmented_list, kept)
    write_index(layout.augmented_index, [(r.name, r.label, j.sample.name, j.sample.label, "+".join(j.transforms),
                                          r.name in kept_names) for r, j in zip(records, jobs)])
    contact_sheet(contact_rows(fit, args.contact_rows), layout.contact_sheet, config=config, cutouts=args.cutouts,
                  seed=seed, max_pixels=args.max_pixels)
    inserted = [r for r, j in zip(records, jobs) if "insert" in j.transforms]
    report = {
        "seed": seed, "max_pixels": args.max_pixels, "split_sha256": split_digest(layout),
        "cutouts": str(Path(args.cutouts).resolve()) if args.cutouts else None,
        "hazard_hues_deg": list(config.hazard_hues_deg),
        "multipliers": {**DEFAULT_MULTIPLIERS, **args.multipliers}, "targets": args.targets,
        "counts": {"originals": class_counts(fit), "copies": class_counts(records),
                   "inserted": class_counts(inserted), "dropped": dropped, "kept": class_counts(kept)},
        "filter": filt, "render_seconds": round(render_s, 1), "seconds": round(time.time() - start, 1),
        "contact_sheet": str(layout.contact_sheet),
    }
    write_json(layout.augment_report, report)

    print(count_table({"train": fit, "copies": records, "inserted": inserted, "dropped": lost, "kept": kept}))
    print("dropped by the consistency filter: "
          + (", ".join(f"{label} {n}" for label, n in dropped.items()) if filt["applied"] else "filter not run"))
    print(f"wrote {layout.augmented_dir} (contact sheet {layout.contact_sheet.name})")
    return report


def parse_hues(text: str) -> list[float]:
    try:
        return [float(v) for v in text.replace("，", ",").split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected hues in degrees, e.g. 0,27,50,223; got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    ap = cli.parser("tools.augment.run", __doc__)
    ap.add_argument("--output-dir", default="outputs", help="pipeline output folder (default: %(default)s)")
    ap.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                    help="the model's image size, the recipe's MAX_PIXELS (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=None, help="default: the split's seed (split.json)")
    ap.add_argument("--cutouts", help="folder of RGBA PNG hazard cut-outs; without it, no insertion")
    ap.add_argument("--multipliers", type=parse_label_numbers, default={},
                    help="extra copies per original, e.g. 高风险=10,非楼道=4 (defaults: "
                         + ",".join(f"{k}={v:g}" for k, v in DEFAULT_MULTIPLIERS.items()) + ")")
    ap.add_argument("--targets", type=partial(parse_label_numbers, kind=int), default={},
                    help="total images per label instead, e.g. 高风险=400 (overrides that label's multiplier)")
    ap.add_argument("--insert", type=int, default=None,
                    help=f"insertion copies (new 高风险 from {'/'.join(INSERT_SOURCES)} images); default "
                         f"{INSERT_PER_HIGH:g}× the 高风险 originals with --cutouts, else 0")
    ap.add_argument("--hazard-hues", type=parse_hues, default=None,
                    help="hues (degrees) the colour jitter keeps, e.g. 0,27.3,50.2,223.3 (default: "
                         + ",".join(f"{h:g}" for h in AugmentConfig().hazard_hues_deg) + ")")
    ap.add_argument("--filter", choices=F.FILTER_MODES, default="auto", help="consistency filter (default: auto)")
    ap.add_argument("--filter-ratio", type=float, default=F.DEFAULT_RATIO,
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
    return cli.run(lambda: augment(args), errors=(DataError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
