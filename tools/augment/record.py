"""What the augmentation step leaves behind, and how later steps read it: the index of copies (each with its
source image) and the report. Light imports: tools.compose reads these without loading OpenCV."""
from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from typing import Sequence

from tools.data.lists import Sample, read_list
from tools.fileio import DataError, atomic_open, read_json
from tools.task import Layout

INDEX_COLUMNS = ["image", "label", "source", "source_label", "transforms", "kept"]


def split_digest(layout: Layout) -> str:
    """sha256 of the training split the copies were made from: a copy is only valid for that split."""
    return hashlib.sha256(layout.train_split.read_bytes()).hexdigest()


def write_index(path: Path, rows: Sequence[tuple[str, str, str, str, str, bool]]) -> None:
    """rows: (copy, its label, source image, source label, transforms joined by +, kept)."""
    with atomic_open(path) as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(INDEX_COLUMNS)
        for image, label, source, source_label, transforms, kept in rows:
            w.writerow([image, label, source, source_label, transforms, int(kept)])


def read_index(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def kept_copies(layout: Layout) -> tuple[list[Sample], dict[str, str], dict]:
    """(the kept copies, copy name -> source image name, the step's report) for the current training split.

    Refuses copies made from another split (data-pre.sh re-run with other data or settings without AUGMENT)."""
    if not layout.augment_report.exists():
        raise DataError(f"{layout.augment_report}: not found: run the augmentation step (AUGMENT=1 bash "
                        "data-pre.sh), or compose without copies (AUGMENT=0)")
    report = read_json(layout.augment_report)
    if report.get("split_sha256") != split_digest(layout):
        raise DataError(f"{layout.augmented_dir}: the copies were made from another training split than "
                        f"{layout.train_split}: run the augmentation step again (AUGMENT=1 bash data-pre.sh)")
    copies = read_list(layout.augmented_list, layout.augmented_images, labelled=True, check_images=False,
                       progress=False) if layout.augmented_list.read_text(encoding="utf-8").strip() else []
    sources = {row["image"]: row["source"] for row in read_index(layout.augmented_index)}
    return copies, sources, report
