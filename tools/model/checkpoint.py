"""Step 4's bookkeeping: the checkpoint a swift run keeps, recorded where test.sh looks.

    python -m tools.model.checkpoint --finish outputs/stage1.training --run-dir outputs/stage1 --output-dir outputs
    python -m tools.model.checkpoint --run-dir outputs/stage1 --read          # the recorded checkpoint
    python -m tools.model.checkpoint --latest outputs/stage1.training         # where RESUME=1 continues

train.sh trains into a work folder (tools.task.Layout.run_work_dir). `--finish` chooses its checkpoint (the best
by the run's metric, trainer_state.json's best_model_checkpoint, else the newest checkpoint-N), writes the
pointer (final_checkpoint.txt, relative to the run folder) and the data fingerprint the run trained on
(trained_on.json, from the manifest), and only then replaces the run folder with the work folder: a run that
saved nothing fails here, and the previous model stays. A pointer never leads outside its run folder, so a copied
output folder uses its own checkpoints.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

from tools import cli
from tools.fileio import DataError, write_text
from tools.state import check_data, record_trained_on
from tools.task import POINTER, TRAINED_ON, Layout


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


def latest(work_dir: str | Path) -> Path | None:
    """The newest checkpoint of an unfinished run (what RESUME=1 continues from), or None."""
    found = checkpoints(work_dir)
    return found[-1].resolve() if found else None


def finish(work_dir: str | Path, run_dir: str | Path, layout: Layout) -> Path:
    """Record the work folder's checkpoint and the data it trained on, then make it the run folder. Returns the
    checkpoint's path in the run folder."""
    work_dir, run_dir = Path(work_dir), Path(run_dir)
    manifest = check_data(layout)
    ckpt = write_pointer(work_dir)
    record_trained_on(work_dir / TRAINED_ON, manifest)
    old = run_dir.with_name(run_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if run_dir.exists():
        os.replace(run_dir, old)
    os.replace(work_dir, run_dir)
    shutil.rmtree(old, ignore_errors=True)
    return run_dir / ckpt.name


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser("tools.model.checkpoint", __doc__)
    ap.add_argument("--run-dir", help="a run folder (with --read, or the target of --finish)")
    ap.add_argument("--read", action="store_true", help="print the recorded checkpoint")
    ap.add_argument("--finish", metavar="WORK_DIR", help="record WORK_DIR's checkpoint and make it --run-dir")
    ap.add_argument("--output-dir", default="outputs", help="with --finish: the pipeline output folder")
    ap.add_argument("--latest", metavar="WORK_DIR", help="print WORK_DIR's newest checkpoint, or nothing")
    args = ap.parse_args(argv)
    if sum(map(bool, (args.read, args.finish, args.latest))) != 1 or (not args.latest and not args.run_dir):
        ap.error("give one of --run-dir DIR --read, --finish WORK_DIR --run-dir DIR, --latest WORK_DIR")

    def step() -> None:
        if args.latest:
            found = latest(args.latest)
            if found:
                print(found)
        elif args.finish:
            print(finish(args.finish, args.run_dir, Layout(args.output_dir)))
        else:
            print(read_pointer(args.run_dir))

    return cli.run(step, errors=(DataError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
