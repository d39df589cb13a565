"""Read and validate the official data: `train.txt`, test list files, image folders.

`train.txt` lines are `<image>\t<label>`; a test list has one image name a line, optionally followed by a
tab and a label. A UTF-8 BOM, CRLF line ends, blank lines and trailing blanks are tolerated. Everything else
that is wrong is collected and raised as one DataError whose lines each name the file and line number, so
nothing downstream ever runs on bad data.

    python -m tools.data.lists --list /data/ele/train.txt --images /data/ele/train
"""
from __future__ import annotations

import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from tools import cli
from tools.fileio import DataError, write_text
from tools.task import LABELS, LABEL_TO_INDEX

MAX_ERRORS_SHOWN = 20

@dataclass(frozen=True)
class Sample:
    name: str  # as written in the list file
    path: Path  # absolute image path
    label: str | None  # None for an unlabelled test list
    source: str  # "file:line", for messages

    @property
    def label_index(self) -> int:
        assert self.label is not None
        return LABEL_TO_INDEX[self.label]


def _lines(list_path: Path) -> list[tuple[int, str]]:
    try:
        raw = list_path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{list_path}: list file not found") from None
    try:
        text = raw.decode("utf-8-sig")  # strips a BOM if present
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{list_path}:{line}: not valid UTF-8") from None
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):  # handles \n, \r\n, \r
        line = line.strip()
        if line:
            out.append((lineno, line))
    return out


def check_image(path: str | os.PathLike) -> str | None:
    """Fully decode an image; return None when it is fine, else the reason it is not."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()  # verify() misses truncated files; a full decode does not
            if img.width < 1 or img.height < 1:
                return "empty image"
    except FileNotFoundError:
        return "image not found"
    except Exception as e:  # PIL raises many types for corrupt data
        return f"unreadable image ({type(e).__name__}: {e})"
    return None


def parse_list(list_path: str | Path, image_dir: str | Path, *, labelled: bool | None
               ) -> tuple[list[Sample], list[str], list[str]]:
    """Parse a list file without touching the images.

    labelled=True requires a label column, False forbids one, None accepts either (but not a mix).
    Returns the samples, the error messages and the warnings: an image listed again with the same label is
    kept once, at its first line, and each repeat is a warning naming both lines (never dropped silently).
    """
    list_path = Path(list_path)
    image_dir = Path(image_dir).resolve()
    samples: list[Sample] = []
    errors: list[str] = []
    warnings: list[str] = []
    seen: dict[str, Sample] = {}
    for lineno, line in _lines(list_path):
        where = f"{list_path}:{lineno}"
        fields = [f.strip() for f in line.split("\t")]
        if len(fields) == 1 and labelled is not True:
            name, label = fields[0], None
        elif len(fields) == 2 and labelled is not False:
            name, label = fields
            if label not in LABEL_TO_INDEX:
                errors.append(f"{where}: unknown label {label!r} (expected one of {', '.join(LABELS)})")
                continue
        else:
            want = {True: "<image>\\t<label>", False: "<image>", None: "<image> or <image>\\t<label>"}[labelled]
            errors.append(f"{where}: expected {want}, got {len(fields)} tab-separated fields")
            continue
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            errors.append(f"{where}: invalid image name {name!r}")
            continue
        if name in seen:
            first = seen[name]
            if first.label != label:
                errors.append(f"{where}: {name} listed again with label {label!r}, but {first.source} says {first.label!r}")
            else:
                warnings.append(f"{where}: {name} listed again (first on {first.source}): kept once")
            continue
        sample = Sample(name=name, path=image_dir / name, label=label, source=where)
        seen[name] = sample
        samples.append(sample)
    if samples and labelled is None and len({s.label is None for s in samples}) > 1:
        errors.append(f"{list_path}: some lines have a label column and some do not")
    if not samples and not errors:
        errors.append(f"{list_path}: no entries")
    return samples, errors, warnings


def read_list(list_path: str | Path, image_dir: str | Path, *, labelled: bool | None,
              check_images: bool = True, workers: int | None = None, progress: bool = True) -> list[Sample]:
    """Parse a list file and check every image it names; raise DataError listing every problem."""
    samples, errors, warnings = parse_list(list_path, image_dir, labelled=labelled)
    for warning in warnings[:MAX_ERRORS_SHOWN]:
        print(f"warning: {warning}", file=sys.stderr)
    if len(warnings) > MAX_ERRORS_SHOWN:
        print(f"warning: ... and {len(warnings) - MAX_ERRORS_SHOWN} more repeated names in {list_path}", file=sys.stderr)
    if check_images and samples:
        workers = workers or min(len(samples) // 64 + 1, os.cpu_count() or 1)
        paths = [s.path for s in samples]
        desc = f"checking {Path(image_dir).name}/"
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                problems = list(tqdm(pool.map(check_image, paths, chunksize=32), total=len(paths), desc=desc,
                                     disable=not progress, leave=False))
        else:
            problems = [check_image(p) for p in tqdm(paths, desc=desc, disable=not progress, leave=False)]
        errors += [f"{s.source}: {problem}: {s.path}" for s, problem in zip(samples, problems) if problem]
    if errors:
        shown = errors[:MAX_ERRORS_SHOWN]
        more = f"\n... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
        raise DataError(f"{len(errors)} problem(s) in {list_path}:\n" + "\n".join(shown) + more)
    return samples


def write_list(path: str | Path, samples) -> None:
    """`<image>\t<label>` a line, the format read_list reads back (written atomically)."""
    write_text(path, "".join(f"{s.name}\t{s.label}\n" for s in samples))


def class_counts(samples: list[Sample]) -> dict[str, int]:
    counts = {label: 0 for label in LABELS}
    for s in samples:
        if s.label is not None:
            counts[s.label] += 1
    return counts


def count_table(columns: dict[str, list[Sample]]) -> str:
    """A per-class count table, one column per named list."""
    counts = {name: class_counts(items) for name, items in columns.items()}
    width = max(8, *(len(n) for n in columns))
    lines = ["label     " + "".join(f"{n:>{width + 1}}" for n in columns)]
    for label in LABELS:
        lines.append(f"{label:<7}" + "".join(f"{counts[n][label]:>{width + 1}}" for n in columns))
    lines.append("total     " + "".join(f"{len(items):>{width + 1}}" for items in columns.values()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser("tools.data.lists", __doc__)
    ap.add_argument("--list", required=True, help="list file (train.txt or a test list)")
    ap.add_argument("--images", required=True, help="folder holding the images the list names")
    ap.add_argument("--labels", choices=["required", "forbidden", "optional"], default="optional")
    args = ap.parse_args(argv)
    labelled = {"required": True, "forbidden": False, "optional": None}[args.labels]
    try:
        samples = read_list(args.list, args.images, labelled=labelled)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.list}: {len(samples)} images OK")
    for label, n in class_counts(samples).items():
        if n:
            print(f"  {label}\t{n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
