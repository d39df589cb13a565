"""Step 4's bookkeeping: the checkpoint a swift run keeps, recorded where test.sh looks.

    python -m tools.model.checkpoint read --output-dir outputs --stage stage1      # the recorded checkpoint
    python -m tools.model.checkpoint start --output-dir outputs --stage stage1 --run final    # before swift sft
    python -m tools.model.checkpoint latest --output-dir outputs --stage stage1    # where RESUME=1 continues
    python -m tools.model.checkpoint finish --output-dir outputs --stage stage1    # after swift sft

train.sh trains each run into a work folder (tools.task.Layout.run_work_dir). `start` records there what the run
trains on (trained_on.json: its rows, images, base model and recipe; tools.state.run_fingerprint); `latest` gives
the newest checkpoint to continue from, only for a run begun on the current data; `finish` chooses the checkpoint
(the best by the run's metric, trainer_state.json's best_model_checkpoint, else the newest checkpoint-N), writes
the pointer (final_checkpoint.txt, relative to the run folder), and only then replaces the run folder with the
work folder: a run that saved nothing fails here, and the previous model stays. A pointer never leads outside its
run folder, so a copied output folder uses its own checkpoints.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

from tools import cli
from tools.fileio import DataError, read_json, write_text
from tools.state import check_data, class_shares, own_train_set, record_trained_on, run_fingerprint, stage_target
from tools.task import FINAL, POINTER, STAGES, TARGETS, TASKS, TRAINED_ON, Layout


def checkpoints(run_dir: str | Path) -> list[Path]:
    """The checkpoint-N folders of a swift run, oldest first (numeric order)."""
    found = [p for p in Path(run_dir).glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def find_checkpoint(run_dir: str | Path) -> Path:
    """The best checkpoint by the run's metric, else the newest. trainer_state.json names the best with the path
    the run had then (possibly another folder's: a work folder, a copied output folder): it is looked up here by
    its name."""
    run_dir = Path(run_dir)
    found = checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"{run_dir}: no checkpoint-N folder (did training finish? swift saved nothing)")
    state = found[-1] / "trainer_state.json"
    if state.exists():
        best = json.loads(state.read_text(encoding="utf-8")).get("best_model_checkpoint")
        if best and (run_dir / Path(best).name).is_dir():
            return (run_dir / Path(best).name).resolve()
    return found[-1].resolve()


def pointer_of(run_dir: str | Path) -> Path:
    """A run folder's checkpoint pointer (tools.task.Layout.checkpoint_pointer)."""
    return Path(run_dir) / POINTER


def write_pointer(run_dir: str | Path) -> Path:
    ckpt = find_checkpoint(run_dir)
    write_text(pointer_of(run_dir), f"{ckpt.name}\n")
    return ckpt


def read_pointer(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir).resolve()
    pointer = pointer_of(run_dir)
    if not pointer.exists():
        raise FileNotFoundError(f"{pointer} not found: run train.sh first")
    name = pointer.read_text(encoding="utf-8").strip()
    ckpt = (run_dir / name).resolve()
    if not re.fullmatch(r"checkpoint-\d+", name) or ckpt.parent != run_dir:
        raise FileNotFoundError(f"{pointer} names {name!r}, not a checkpoint-N folder of {run_dir}: run train.sh again")
    if not ckpt.is_dir():
        raise FileNotFoundError(f"{pointer} names {ckpt}, which does not exist")
    return ckpt


def _fingerprints(layout: Layout, stage: str, run: str | int, work_dir: Path,
                  model: str | None = None) -> tuple[dict | None, dict | None]:
    """(the fingerprint the run recorded when it began; the one the current data gives for the task it recorded and
    `model`, default the base model it recorded), one read of its trained_on.json; (None, None) when nothing is
    recorded."""
    path = work_dir / TRAINED_ON
    record = read_json(path) if path.exists() else {}
    recorded = record.get("fingerprint")
    if recorded is None:
        return None, None
    parts = recorded.get("parts") if isinstance(recorded, dict) else None  # a record of another shape: no model
    model = model or (parts.get("model") if isinstance(parts, dict) else None)
    current = run_fingerprint(layout, check_data(layout), stage, run, record.get("task", "causal_lm"), model,
                              record.get("train_set"))
    return recorded, current


def start(layout: Layout, stage: str, run: str | int, task: str = "causal_lm", model: str | None = None,
          train_set: str | Path | None = None) -> Path:
    """Record, in the run's work folder, what the run is about to train on (so RESUME=1 continues it only on the
    same data, and finish() can tell) and what its model will be: the task (a text answer or a head), the
    labels and prompt of its target, the class shares of its rows and of the data (prior correction,
    tools.model.score). `train_set`: the rows swift gets, when not the composed set (stage 2 with hard
    negatives); recorded relative to the output folder. Returns the work folder."""
    work_dir = layout.run_work_dir(stage, run)
    work_dir.mkdir(parents=True, exist_ok=True)
    manifest = check_data(layout)
    labels, prompt = TARGETS[stage_target(manifest, stage)]
    own = own_train_set(layout, stage, run, task, train_set)
    if own is not None and not own.is_relative_to(layout.root):
        raise DataError(f"{own}: a run's own training rows must lie in the output folder {layout.root}")
    extra = {"train_set": str(own.relative_to(layout.root))} if own is not None else {}
    record_trained_on(work_dir / TRAINED_ON, run_fingerprint(layout, manifest, stage, run, task, model, own),
                      task=task, labels=list(labels), prompt=prompt,
                      class_shares=class_shares(layout, manifest, stage, run, task, own), **extra)
    return work_dir


def latest(layout: Layout, stage: str, run: str | int, model: str | None = None) -> Path | None:
    """The newest checkpoint of the run's unfinished work folder, if that run began on the current data and on
    `model`, the base model this training will use (default: the one it began on); what RESUME=1 continues from.
    None otherwise."""
    work_dir = layout.run_work_dir(stage, run)
    found = checkpoints(work_dir)
    if not found:
        return None
    recorded, current = _fingerprints(layout, stage, run, work_dir, model)
    if recorded is None or recorded != current:
        print(f"{work_dir}: began on other data than the current (or unrecorded): not continued", file=sys.stderr)
        return None
    return found[-1].resolve()


def finish(layout: Layout, stage: str, run: str | int) -> Path:
    """Record the work folder's checkpoint, then make the work folder the run folder. Returns the checkpoint's
    path in the run folder. Refuses a run whose data changed while it trained."""
    work_dir, run_dir = layout.run_work_dir(stage, run), layout.run_dir(stage, run)
    recorded, current = _fingerprints(layout, stage, run, work_dir)
    if recorded is None:
        raise DataError(f"{work_dir}: no record of what this run trained on ({TRAINED_ON}; `start` writes it before "
                        "swift, as train.sh does): train again")
    if recorded != current:
        raise DataError(f"{work_dir}: the data changed while this run trained (data-pre.sh ran meanwhile?): train again")
    ckpt = write_pointer(work_dir)
    old = run_dir.with_name(run_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if run_dir.exists():
        os.replace(run_dir, old)
    os.replace(work_dir, run_dir)
    shutil.rmtree(old, ignore_errors=True)
    return run_dir / ckpt.name


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser("tools.model.checkpoint", __doc__)
    ap.add_argument("action", choices=["read", "start", "latest", "finish"])
    ap.add_argument("--run-dir", help="read: a run folder (or give --output-dir, --stage and --run)")
    ap.add_argument("--output-dir", default="outputs", help="the pipeline output folder (default: %(default)s)")
    ap.add_argument("--stage", choices=list(STAGES))
    ap.add_argument("--run", default=FINAL, help="final (default) or a fold number")
    ap.add_argument("--task", choices=list(TASKS), default="causal_lm", help="start: the run's --task_type")
    ap.add_argument("--train-set", help="start: the training rows swift gets, when not data-pre.sh's set for the "
                                        "stage (stage 2 with hard negatives)")
    ap.add_argument("--model", help="start, latest: the base model the run trains (default: start the one data-pre.sh "
                                    "recorded, latest the one the run began on)")
    args = ap.parse_args(argv)
    if not args.stage and not (args.action == "read" and args.run_dir):
        ap.error("give --stage (and --run), or --run-dir with read")

    def step() -> None:
        layout = Layout(args.output_dir)
        if args.action == "read":
            print(read_pointer(args.run_dir or layout.run_dir(args.stage, args.run)))
        elif args.action == "start":
            print(start(layout, args.stage, args.run, args.task, args.model, args.train_set))
        elif args.action == "latest":
            found = latest(layout, args.stage, args.run, args.model)
            if found:
                print(found)
        else:
            print(finish(layout, args.stage, args.run))

    return cli.run(step, errors=(DataError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
