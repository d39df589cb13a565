r"""Out-of-fold predictions (FOLDS > 1): each fold's held-out images scored by the models that did not train on
them, pooled with the validation split's predictions into one set for tools.decide.search.

    python -m tools.decide.oof --output-dir outputs [--folds 3]          # test.sh, after scoring the held-out folds
    python -m tools.decide.oof --output-dir outputs --folds 3 --check    # train.sh/test.sh: is the split in 3 folds?

Reads <output-dir>/data/manifest.json (the number of folds data-pre.sh made), data/split/folds/<i>.txt (fold
i's images and labels), folds/<i>/stage{1,2}/heldout_probs.csv (fold i's models on those images,
tools.model.score) and, unless --no-val, stage{1,2}/val_probs.csv with data/split/val.txt (the final models on
the validation split).
Writes, each file atomically:
  folds/oof_stage1.csv, folds/oof_stage2.csv  probability CSVs: fold 0's held-out rows, fold 1's, ..., then
                                              the validation rows
  folds/oof_gold.txt                          <image>\t<label> for the same rows, for tools.decide.search

Every training-split image appears exactly once: a fold's CSV must hold exactly the images of its held-out list,
and no image may come from two parts. Errors name the file and line.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from tools import cli
from tools.data.lists import read_list
from tools.fileio import DataError, read_json, write_text
from tools.probs import read_probs, write_probs
from tools.task import STAGES, Layout

Part = tuple[Path, list[str], np.ndarray]  # (CSV it came from, image names, probabilities [n, 5])


def union(parts: Sequence[Part]) -> tuple[list[str], np.ndarray]:
    """The parts' rows, in order, as one (names, probs); an image in two places is an error naming both."""
    if not parts:
        raise DataError("no predictions to pool")
    seen: dict[str, tuple[Path, int]] = {}
    for path, names, probs in parts:
        if len(names) != len(probs):
            raise DataError(f"{path}: {len(names)} names but {len(probs)} probability rows")
        for row, name in enumerate(names):
            if name in seen:  # CSV line = row + 2 (line 1 is the header)
                first, first_row = seen[name]
                raise DataError(f"{path}:{row + 2}: {name} already on {first}:{first_row + 2}")
            seen[name] = (path, row)
    names = [name for _, part_names, _ in parts for name in part_names]
    probs = np.concatenate([np.asarray(p, dtype=np.float64).reshape(len(n), -1) for _, n, p in parts])
    return names, probs


def check_covers(path: Path, names: Sequence[str], listed: Sequence[str], list_path: Path) -> None:
    """A CSV must hold exactly the images of the list it was scored from (a stale or partial file is an error)."""
    wanted = set(listed)
    for row, name in enumerate(names):
        if name not in wanted:
            raise DataError(f"{path}:{row + 2}: {name} is not in {list_path}")
    missing = wanted - set(names)
    if missing:
        raise DataError(f"{path}: no row for {len(missing)} image(s) of {list_path}, e.g. {sorted(missing)[0]}")


def split_folds(layout: Layout, folds: int | None = None) -> int:
    """The number of folds data-pre.sh made (manifest.json); `folds` (the FOLDS knob) must agree with it."""
    if not layout.manifest.exists():
        raise DataError(f"{layout.manifest}: not found: run data-pre.sh first")
    made = int(read_json(layout.manifest).get("folds", 1))
    if folds is not None and folds != made:
        raise DataError(f"FOLDS={folds}, but data-pre.sh split the training data into {made} fold(s) "
                        f"({layout.manifest}): run FOLDS={folds} bash data-pre.sh, or leave FOLDS unset")
    return made


def check_split(layout: Layout, folds: int | None = None) -> int:
    """split_folds, and every fold's files from data-pre.sh are there."""
    made = split_folds(layout, folds)
    for i in range(made if made > 1 else 0):
        for path in (*(layout.train_jsonl(s, i) for s in STAGES), layout.heldout_jsonl(i), layout.fold_list(i)):
            if not path.exists():
                raise DataError(f"{path}: not found: run data-pre.sh again")
    return made


def _read(path: Path) -> Part:
    names, probs = read_probs(path)
    return path, names, probs


def _labels(path: Path) -> list[tuple[str, str]]:
    return [(s.name, s.label) for s in read_list(path, ".", labelled=True, check_images=False, progress=False)]


def pool(layout: Layout, folds: int | None = None, with_val: bool = True) -> dict[str, int]:
    """Write oof_stage{1,2}.csv and oof_gold.txt; returns the row counts (held-out folds, validation)."""
    made = split_folds(layout, folds)
    if made < 2:
        raise DataError(f"{layout.manifest}: the split has no folds (FOLDS=1): nothing to pool")
    lists = [(layout.fold_list(i), _labels(layout.fold_list(i))) for i in range(made)]
    has_val = with_val and layout.val_list.exists() and layout.val_list.read_text(encoding="utf-8").strip()
    val = _labels(layout.val_list) if has_val else []
    gold = [pair for _, pairs in lists for pair in pairs] + val
    for stage in STAGES:
        parts = []
        for i, (list_path, pairs) in enumerate(lists):
            part = _read(layout.probs(stage, "heldout", i))
            check_covers(part[0], part[1], [name for name, _ in pairs], list_path)
            parts.append(part)
        if val:
            part = _read(layout.probs(stage, "val"))
            check_covers(part[0], part[1], [name for name, _ in val], layout.val_list)
            parts.append(part)
        names, probs = union(parts)
        write_probs(layout.oof_probs(stage), names, probs)
    write_text(layout.oof_gold, "".join(f"{name}\t{label}\n" for name, label in gold))
    return {"heldout": len(gold) - len(val), "val": len(val)}


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser("tools.decide.oof", __doc__)
    ap.add_argument("--output-dir", default="outputs", help="pipeline output folder (default: %(default)s)")
    ap.add_argument("--folds", type=int, default=None,
                    help="the FOLDS knob; must match the split data-pre.sh made (default: the split's)")
    ap.add_argument("--check", action="store_true", help="only check the split's folds and files; write nothing")
    ap.add_argument("--no-val", dest="with_val", action="store_false",
                    help="out-of-fold rows only, without the final models' validation rows")
    args = ap.parse_args(argv)
    layout = Layout(args.output_dir)
    try:
        if args.check:
            check_split(layout, args.folds)
            return 0
        counts = pool(layout, args.folds, args.with_val)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"pooled {counts['heldout']} out-of-fold and {counts['val']} validation predictions -> "
          f"{layout.oof_probs('stage1')}, {layout.oof_probs('stage2')}, {layout.oof_gold}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
