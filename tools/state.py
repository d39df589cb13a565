"""The state between the four scripts: what data-pre.sh prepared, what each model was trained on, and checks
that refuse a stale or half-written mix before any work starts.

    python -m tools.state --output-dir outputs data                    # data-pre.sh finished, nothing changed since
    python -m tools.state --output-dir outputs models --stages "stage1 stage2" --runs "final"
    python -m tools.state --output-dir outputs settings                # for the scripts: NUL-separated values

The fingerprint of the prepared data is made of parts (the lists and labels, the images' sizes and modification
times, the split and composition settings, the augmentation, the recipe and the base models), each a digest, so
a mismatch says which part changed. tools.compose.stage_sets records it in the manifest together with a digest of
every file the three data-pre.sh steps wrote; train.sh records, beside each checkpoint, the fingerprint it trained
on (trained_on.json). `data` fails when a data file changed after the manifest was written (an interrupted or a
concurrent data-pre.sh); `models` fails when a model was trained on other data than the current manifest's.
ALLOW_STALE=1 in the scripts (--allow-stale here) turns a model mismatch into a warning. `settings` prints what
data-pre.sh recorded for train.sh and test.sh (recipe, models, test list, whether it has labels, folds) as plain
values, each followed by a NUL byte, in SETTINGS order: the scripts read them with `read -d ''`, so any value
(spaces, quotes, `$`, non-ASCII) arrives as it was given and nothing is run as shell code.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Iterable, Sequence

from tools import cli
from tools.fileio import DataError, read_json, read_jsonl, write_json
from tools.task import FINAL, NOT_HIGH_RISK, STAGES, TARGETS, Layout

SETTINGS = ("recipe", "model_stage1", "model_stage2", "test_list", "test_labelled", "folds", "stage2_target")


def digest(data: bytes | str) -> str:
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def images_digest(paths: Iterable[str | Path]) -> str:
    """Sizes and modification times of the images (not their bytes: a stat per image, fast on 10k photos)."""
    h = hashlib.sha256()
    for path in paths:
        try:
            st = os.stat(path)
            h.update(f"{path}\t{st.st_size}\t{st.st_mtime_ns}\n".encode("utf-8"))
        except OSError:
            h.update(f"{path}\tmissing\n".encode("utf-8"))
    return h.hexdigest()


def fingerprint(parts: dict[str, str]) -> dict:
    """{'digest': one digest of all parts, 'parts': {name: digest}}."""
    return {"digest": digest(json.dumps(parts, sort_keys=True)), "parts": dict(sorted(parts.items()))}


def changed_parts(old: dict, new: dict) -> list[str]:
    """The names of the parts that differ between two fingerprints (all of them when one has no parts)."""
    a, b = old.get("parts") or {}, new.get("parts") or {}
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)) or ["(unknown)"]


PART_NAMES = {
    "train_list": "the training list or its labels", "test_list": "the test list",
    "train_images": "the training images", "test_images": "the test images",
    "split": "the split settings (VAL_RATIO, SEED, FOLDS)", "composition": "the stage-set settings",
    "augmentation": "the augmented copies", "recipe": "the recipe", "model_stage1": "MODEL_STAGE1",
    "model_stage2": "MODEL_STAGE2", "model": "its base model (MODEL_STAGE1/2)",
    "train_rows": "its training rows (the split, the stage-set settings or the augmented copies)",
    "val_rows": "the validation rows",
    "train_set": "its own training rows (stage 2's hard negatives, mined with stage 1: HARD_NEGATIVES)",
}


def describe(parts: Sequence[str]) -> str:
    return ", ".join(PART_NAMES.get(p, p) for p in parts)


# ---------------------------------------------------------------------------------------------- data
def check_data(layout: Layout) -> dict:
    """The manifest, after checking that data-pre.sh finished and that no file it wrote changed since."""
    if not layout.manifest.exists():
        raise DataError(f"{layout.manifest}: not found: run data-pre.sh first (or again, if it was interrupted)")
    manifest = read_json(layout.manifest)
    files = manifest.get("files")
    if not files or "fingerprint" not in manifest:
        raise DataError(f"{layout.manifest}: written by an older version of this project: run data-pre.sh again")
    for rel, want in files.items():
        path = layout.root / rel
        if not path.exists() or file_digest(path) != want:
            raise DataError(f"{path}: {'missing' if not path.exists() else 'changed'} since data-pre.sh finished "
                            f"({layout.manifest}): data-pre.sh was interrupted or is running now; run it again")
    return manifest


# ---------------------------------------------------------------------------------------------- models
def run_fingerprint(layout: Layout, manifest: dict, stage: str, run: str | int, task: str = "causal_lm",
                    model: str | None = None, train_set: str | Path | None = None) -> dict:
    """What one run trains on, and nothing else: its training and validation rows (the split, composition and
    copies they came from), the training images' bytes (sizes and times), its base model (`model`, default the
    one data-pre.sh recorded) and the recipe. A run trained on rows of its own (`train_set`: stage 2 with hard
    negatives, tools.model.hard_negatives) adds that file's digest to the composed set's. A new test list, or
    folds added beside the final run, leave it as it is."""
    files = manifest["files"]

    def rows(path: Path) -> str:
        return files.get(str(path.relative_to(layout.root)), "missing")

    parts = manifest["fingerprint"]["parts"]
    found = {"train_rows": rows(layout.train_jsonl(stage, run, task)),
             "val_rows": rows(layout.val_jsonl(stage, task)),
             "train_images": parts["train_images"], "model": model or parts[f"model_{stage}"],
             "recipe": parts["recipe"]}
    own = own_train_set(layout, stage, run, task, train_set)
    if own is not None:
        found["train_set"] = file_digest(own) if own.exists() else "missing"
    return fingerprint(found)


def own_train_set(layout: Layout, stage: str, run: str | int, task: str, train_set: str | Path | None) -> Path | None:
    """`train_set` as a path under the output folder when it is not the composed set data-pre.sh wrote (None then).
    trained_on.json records it relative to the output folder, so a moved output folder keeps its meaning."""
    if not train_set:
        return None
    path = layout.root / train_set if not Path(train_set).is_absolute() else Path(train_set)
    return None if path.resolve() == layout.train_jsonl(stage, run, task).resolve() else path.resolve()


def stage_target(manifest: dict, stage: str) -> str:
    """What a stage answers: stage 1 the five labels, stage 2 what STAGE2_TARGET chose (five or binary)."""
    return manifest.get("composition", {}).get("stage2_target", "five") if stage == "stage2" else "five"


def class_shares(layout: Layout, manifest: dict, stage: str, run: str | int, task: str = "causal_lm",
                 train_set: str | Path | None = None) -> dict:
    """The stage's class shares in its training rows ("trained"; `train_set` when the run has rows of its own) and
    in the training split's images ("real", the data's own shares), over the stage's labels: what prior
    correction turns the one into the other."""
    labels, _ = TARGETS[stage_target(manifest, stage)]
    counts = dict.fromkeys(labels, 0)
    for row in read_jsonl(own_train_set(layout, stage, run, task, train_set) or layout.train_jsonl(stage, run, task)):
        answer = labels[row["label"]] if "label" in row else row["messages"][-1]["content"]
        counts[answer] += 1
    real = dict.fromkeys(labels, 0)
    for label, n in manifest["counts"]["train"].items():
        real[label if label in real else NOT_HIGH_RISK] += n
    total_t, total_r = max(1, sum(counts.values())), max(1, sum(real.values()))
    return {"labels": list(labels), "trained": [counts[x] / total_t for x in labels],
            "real": [real[x] / total_r for x in labels]}


def record_trained_on(path: str | Path, fingerprint_: dict, **model: object) -> None:
    """trained_on.json: the run's fingerprint and what its model is (task, labels, prompt, class shares)."""
    write_json(path, {"fingerprint": fingerprint_, **model})


def trained_on(path: str | Path) -> dict | None:
    return read_json(path)["fingerprint"] if Path(path).exists() else None


def model_record(path: str | Path) -> dict:
    """What trained_on.json says of the model (empty for a run trained before it was recorded)."""
    return {k: v for k, v in read_json(path).items() if k != "fingerprint"} if Path(path).exists() else {}


def stale_models(layout: Layout, manifest: dict, stages: Sequence[str], runs: Sequence[str | int]) -> list[str]:
    """A message for each run × stage whose model is missing or was trained on other data."""
    out = []
    for run in runs:
        for stage in stages:
            run_dir = layout.run_dir(stage, run)
            where = stage if str(run) == FINAL else f"fold {run}'s {stage}"
            record = model_record(layout.trained_on(stage, run))
            current = run_fingerprint(layout, manifest, stage, run, record.get("task", "causal_lm"),
                                      train_set=record.get("train_set"))
            old = trained_on(layout.trained_on(stage, run))
            if old is None:
                out.append(f"{where} ({run_dir}): no trained model recorded; run train.sh"
                           + ("" if str(run) == FINAL else " (its fold runs)"))
            elif old["digest"] != current["digest"]:
                parts = changed_parts(old, current)
                out.append(f"{where} was trained on other data than data-pre.sh prepared since: {describe(parts)} "
                           f"changed ({', '.join(parts)})")
    return out


def runs_of(manifest: dict, runs: Sequence[str]) -> list[str | int]:
    """RUNS (folds, final, or one fold's number) as run ids: fold numbers (FOLDS > 1 only), then final."""
    folds = int(manifest.get("folds", 1))
    out: list[str | int] = []
    for run in runs:
        if run == "folds":
            out += list(range(folds)) if folds > 1 else []
        elif run == FINAL:
            out.append(FINAL)
        elif run.isdigit() and int(run) < folds:
            out.append(int(run))
        else:
            raise DataError(f"RUNS: unknown run {run!r} (expected folds, final or a fold number below {folds})")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser("tools.state", __doc__)
    ap.add_argument("--output-dir", default="outputs", help="pipeline output folder (default: %(default)s)")
    ap.add_argument("what", choices=["data", "models", "settings"],
                    help="data: data-pre.sh's outputs are whole; models: the trained models match them too; "
                         "settings: print the recorded settings (after checking the data)")
    ap.add_argument("--stages", default=" ".join(STAGES), help="with models: the stages to check")
    ap.add_argument("--except-stages", default="", help="with models: leave these out (the ones train.sh retrains)")
    ap.add_argument("--runs", default="folds final", help="with models: folds and/or final")
    ap.add_argument("--allow-stale", type=int, choices=[0, 1], default=0,
                    help="with models: 1 = warn instead of failing (ALLOW_STALE)")
    args = ap.parse_args(argv)

    def step() -> None:
        layout = Layout(args.output_dir)
        manifest = check_data(layout)
        if args.what == "settings":
            sys.stdout.write("".join(f"{manifest['settings'][key]}\0" for key in SETTINGS))
        elif args.what == "models":
            stages = [s for s in args.stages.split() if s not in args.except_stages.split()]
            found = stale_models(layout, manifest, stages, runs_of(manifest, args.runs.split()))
            if found and args.allow_stale:
                for line in found:
                    print(f"warning: {line} (ALLOW_STALE=1: used anyway)", file=sys.stderr)
            elif found:
                raise DataError("\n".join(found) + "\nretrain (bash train.sh), or set ALLOW_STALE=1 to use them anyway")

    return cli.run(step)


if __name__ == "__main__":
    sys.exit(main())
