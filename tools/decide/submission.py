"""Write the submission file: `image<TAB>label` per line, the test list's order, UTF-8 without BOM."""
from __future__ import annotations

from pathlib import Path

from tools.fileio import atomic_open
from tools.task import LABELS


def write_submission(path: str | Path, names: list[str], labels: list[str]) -> None:
    if len(names) != len(labels):
        raise ValueError(f"{len(names)} images but {len(labels)} labels")
    if len(set(names)) != len(names):
        raise ValueError("an image appears more than once")
    bad = [label for label in labels if label not in LABELS]
    if bad:
        raise ValueError(f"not a label: {bad[0]!r}")
    with atomic_open(path) as f:  # newline="" there: "\n" stays "\n" on every platform
        for name, label in zip(names, labels):
            f.write(f"{name}\t{label}\n")
