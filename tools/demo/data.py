"""The demo dataset: procedurally drawn corridors in the official layout, and hazard cut-outs.

`train.txt` + `train/`, `B.txt` (with a label column, so test.sh can score) + `B/`, and `cutouts/` (RGBA
e-bikes and batteries, for hazard-region insertion). Images are named by their md5, as the official ones are.
Same seed, same bytes.
"""
from __future__ import annotations

import hashlib
import io
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tools.demo import scenes
from tools.fileio import atomic_open, write_text
from tools.task import LABELS, TEST_IMAGES, TEST_LIST, TRAIN_IMAGES, TRAIN_LIST

# Class shares like the official training set (无风险 is the majority; 高风险 and 非楼道 are rare).
CLASS_SHARES = {"无风险": 0.59, "中风险": 0.19, "低风险": 0.14, "高风险": 0.05, "非楼道": 0.03}
IMAGE_SIZE = 168  # square demo images; 168² = 144 patches = 36 visual tokens after the 2×2 merge
JPEG_QUALITY = 90


# --------------------------------------------------------------------------- dataset
def risk_scene(rng: np.random.Generator, label: str, size: int = IMAGE_SIZE) -> scenes.Scene:
    """An image whose content defines `label`, by the competition's definitions."""
    if label == "非楼道":
        return (scenes.outdoor_scene if rng.random() < 0.5 else scenes.room_scene)(rng, size, size)
    if label == "高风险":
        hazard = "ebike" if rng.random() < 0.65 else "battery"
        objects = [(hazard, "any")] + [(str(rng.choice(scenes.TIDY)), "side") for _ in range(rng.integers(0, 3))]
        return scenes.corridor_scene(rng, size, size, objects, cable=hazard == "battery" or rng.random() < 0.7)
    if label == "中风险":
        objects = [(str(rng.choice(scenes.CLUTTER)), "any") for _ in range(rng.integers(5, 10))]
        return scenes.corridor_scene(rng, size, size, objects)
    if label == "低风险":
        objects = [(str(rng.choice(scenes.TIDY)), "side") for _ in range(rng.integers(1, 3))]
        return scenes.corridor_scene(rng, size, size, objects)
    if label == "无风险":
        return scenes.corridor_scene(rng, size, size, [])
    raise ValueError(f"unknown label {label!r}")


def label_plan(n: int, rng: np.random.Generator) -> list[str]:
    """Exactly round(n * share) images of each class (rare classes at least 2), in shuffled order."""
    counts = {label: max(2, round(n * share)) for label, share in CLASS_SHARES.items()}
    counts["无风险"] += n - sum(counts.values())
    labels = [label for label in LABELS for _ in range(counts[label])]
    rng.shuffle(labels)
    return labels


def image_seed(seed: int, split: str, index: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, *split.encode(), index])


def encode_jpeg(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _render_risk(job: tuple[int, str, int, str]) -> tuple[str, bytes]:
    seed, split, index, label = job
    rng = np.random.default_rng(image_seed(seed, split, index))
    img = scenes.finish(rng, risk_scene(rng, label).image)
    data = encode_jpeg(img)
    return hashlib.md5(data).hexdigest() + ".jpg", data  # official names are the image's md5


def pool_map(fn, jobs: list, workers: int, desc: str) -> list:
    if workers <= 1:
        return [fn(j) for j in tqdm(jobs, desc=desc)]
    with ProcessPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(fn, jobs, chunksize=16), total=len(jobs), desc=desc))


def write_split(data_dir: Path, split: str, list_name: str, image_folder: str, n: int, seed: int,
                workers: int, with_labels: bool) -> None:
    labels = label_plan(n, np.random.default_rng(image_seed(seed, split + "/plan", 0)))
    results = pool_map(_render_risk, [(seed, split, i, label) for i, label in enumerate(labels)], workers,
                        f"demo {split}")
    folder = data_dir / image_folder
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for (name, data), label in zip(results, labels):
        path = folder / name  # named by its md5: an existing file of that name already holds these bytes
        if not path.exists() or path.stat().st_size != len(data):
            path.write_bytes(data)  # unchanged files keep their time, so a rebuilt demo is not new data
        lines.append(f"{name}\t{label}" if with_labels else name)
    write_text(data_dir / list_name, "\n".join(lines) + "\n")


def write_cutouts(folder: Path, seed: int, n: int = 24) -> None:
    """RGBA hazard cut-outs (e-bikes, batteries, some with their cable), cropped to their alpha box."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng(image_seed(seed, "cutout", i))
        kind = "ebike" if i % 3 else "battery"
        layer = scenes.draw_object(rng, kind, IMAGE_SIZE, IMAGE_SIZE, IMAGE_SIZE / 2, IMAGE_SIZE * 0.9, 1.0)
        layer = layer.crop(layer.getbbox())
        with atomic_open(folder / f"{kind}_{i:03d}.png", "wb") as f:
            layer.save(f, format="PNG")


def make_dataset(data_dir: str | Path, seed: int = 0, n_train: int = 600, n_test: int = 300,
                 workers: int | None = None) -> Path:
    data_dir = Path(data_dir)
    workers = workers or os.cpu_count() or 1
    write_split(data_dir, "train", TRAIN_LIST, TRAIN_IMAGES, n_train, seed, workers, with_labels=True)
    write_split(data_dir, "test", TEST_LIST, TEST_IMAGES, n_test, seed, workers, with_labels=True)
    write_cutouts(data_dir / "cutouts", seed)
    return data_dir

