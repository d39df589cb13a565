"""A contact sheet of the augmentation: one row per original, then each transform applied to it."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import cv2

from tools.augment.images import DEFAULT_MAX_PIXELS, list_cutouts, load_cutout, load_image
from tools.augment.plan import INSERT_SOURCES, job_seed
from tools.augment.transforms import AugmentConfig, apply_transforms
from tools.data.lists import Sample
from tools.fileio import atomic_open
from tools.task import HIGH_RISK, LABELS

LABEL_ASCII = {"高风险": "high", "中风险": "medium", "低风险": "low", "无风险": "none", "非楼道": "not-corridor"}


def contact_rows(samples: Sequence[Sample], n: int = 5) -> list[Sample]:
    """Originals for a contact sheet: the first of each label (LABELS order), then the next ones, n in all."""
    first: dict[str, Sample] = {}
    for s in samples:
        first.setdefault(s.label, s)
    rows = [first[label] for label in LABELS if label in first]
    rows += [s for s in samples if s not in rows][: max(0, n - len(rows))]
    return rows[:n]


def contact_sheet(samples: Sequence[Sample], path: str | os.PathLike, *, config: AugmentConfig = AugmentConfig(),
                  cutouts: str | os.PathLike | None = None, seed: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS,
                  thumb_height: int = 160) -> Path:
    """A PNG, one row per original: original | geometric | colour | padding | insert (for 无风险/低风险
    originals when cut-outs are given), each captioned in ASCII with the transform and the label."""
    from PIL import Image, ImageDraw, ImageFont

    cut_paths = list_cutouts(cutouts) if cutouts else []
    font = ImageFont.load_default()
    caption_h, pad = 14, 4
    rows = []
    for i, s in enumerate(samples):
        img = load_image(s.path, max_pixels)
        js = job_seed(seed, s.name, 1)
        cells = [("original", s.label, img)]
        for t in ("geometric", "colour", "padding"):
            cells.append((t, s.label, apply_transforms(img, (t,), js, config, None, max_pixels)))
        if cut_paths and s.label in INSERT_SOURCES:
            cut = load_cutout(cut_paths[i % len(cut_paths)])
            cells.append(("insert", HIGH_RISK, apply_transforms(img, ("insert",), js, config, cut, max_pixels)))
        rows.append(cells)
    col_w = 0
    thumbs = []
    for cells in rows:
        row = []
        for name, label, arr in cells:
            h, w = arr.shape[:2]
            tw = max(1, round(w * thumb_height / h))
            thumb = cv2.resize(arr, (tw, thumb_height), interpolation=cv2.INTER_AREA)
            row.append((name, label, Image.fromarray(thumb)))
            col_w = max(col_w, tw)
        thumbs.append(row)
    ncols = max((len(r) for r in thumbs), default=1)
    sheet = Image.new("RGB", (ncols * (col_w + pad) + pad, len(thumbs) * (thumb_height + caption_h + pad) + pad),
                      (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(thumbs):
        y = pad + r * (thumb_height + caption_h + pad)
        for c, (name, label, im) in enumerate(row):
            x = pad + c * (col_w + pad)
            draw.text((x, y), f"{name}: {LABEL_ASCII.get(label, '?')}", fill=(0, 0, 0), font=font)
            sheet.paste(im, (x, y + caption_h))
    path = Path(path)
    with atomic_open(path, "wb") as f:
        sheet.save(f, format="PNG")
    return path

