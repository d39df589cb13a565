"""Find a swift run's final checkpoint and record it where test.sh looks.

    python -m tools.model.checkpoint --run-dir outputs/stage1

Prefers the best checkpoint by the run's metric (trainer_state.json's best_model_checkpoint, set when swift
evaluated on a validation split), else the newest checkpoint-N. Writes <run-dir>/final_checkpoint.txt.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from tools import cli
from tools.fileio import write_text
from tools.task import POINTER


def find_checkpoint(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    checkpoints = sorted((p for p in run_dir.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)),
                         key=lambda p: int(p.name.split("-")[1]))
    if not checkpoints:
        raise FileNotFoundError(f"{run_dir}: no checkpoint-N folder (did training finish?)")
    state = checkpoints[-1] / "trainer_state.json"
    if state.exists():
        best = json.loads(state.read_text(encoding="utf-8")).get("best_model_checkpoint")
        if best and Path(best).exists():
            return Path(best).resolve()
    return checkpoints[-1].resolve()


def pointer_of(run_dir: str | Path) -> Path:
    """A run folder's checkpoint pointer (tools.task.Layout.checkpoint_pointer)."""
    return Path(run_dir) / POINTER


def write_pointer(run_dir: str | Path) -> Path:
    ckpt = find_checkpoint(run_dir)
    write_text(pointer_of(run_dir), f"{ckpt}\n")
    return ckpt


def read_pointer(run_dir: str | Path) -> Path:
    pointer = pointer_of(run_dir)
    if not pointer.exists():
        raise FileNotFoundError(f"{pointer} not found: run train.sh first")
    ckpt = Path(pointer.read_text(encoding="utf-8").strip())
    if not ckpt.is_dir():
        raise FileNotFoundError(f"{pointer} names {ckpt}, which does not exist")
    return ckpt


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser("tools.model.checkpoint", __doc__)
    ap.add_argument("--run-dir", required=True, help="a swift --output_dir")
    ap.add_argument("--read", action="store_true", help="print the recorded checkpoint instead of choosing one")
    args = ap.parse_args(argv)
    try:
        print(read_pointer(args.run_dir) if args.read else write_pointer(args.run_dir))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
