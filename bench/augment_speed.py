"""Augmentation speed: end-to-end images/s of tools.augment.render.run_plan, and a per-stage breakdown.

    .venv/bin/python bench/augment_speed.py [--n-images 40] [--copies 8] [--workers 2] [--max-pixels 1003520]

Source images: demo corridor scenes (tools.demo.data.risk_scene) upscaled to 1280×960 and passed through
the demo's camera model (exposure, sensor noise, some blur), saved as JPEG quality 92 in a temporary folder,
with the demo's hazard cut-outs. End to end = run_plan over n_images × copies jobs (decode, resize to the
max_pixels rule, the job's transforms, JPEG q90 encode, write), with the planner's default transform mix
and insertion jobs, wall clock including the worker processes' start. The breakdown runs every stage on
every image in this process with one OpenCV thread (ms per image, mean over --repeat passes).
CPU s is the user + system time of this process and its workers during the run; on a shared machine
`jobs / CPU s × cores` is what the machine's cores would give if they were free (a projection, printed as
such; one worker runs in this process, where OpenCV itself uses every core).
Prints a Markdown table (for bench/README.md).
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from tools.augment import images as IMG  # noqa: E402
from tools.augment import plan as P  # noqa: E402
from tools.augment import transforms as T  # noqa: E402
from tools.augment.render import run_plan  # noqa: E402
from tools.data.images import model_size  # noqa: E402
from tools.data.lists import Sample  # noqa: E402
from tools.demo import data as demo_data, scenes  # noqa: E402
from tools.task import LABELS  # noqa: E402

CORRIDOR_LABELS = ("无风险", "低风险", "中风险", "高风险")


def make_sources(folder: Path, n: int, width: int, height: int, seed: int) -> list[Sample]:
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n):
        label = CORRIDOR_LABELS[i % len(CORRIDOR_LABELS)]
        rng = np.random.default_rng([seed, i])
        small = np.asarray(demo_data.risk_scene(rng, label).image)
        big = Image.fromarray(cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC))
        path = folder / f"src{i:03d}.jpg"
        scenes.finish(rng, big).save(path, format="JPEG", quality=92)
        samples.append(Sample(path.name, path, label, f"bench:{i}"))
    return samples


def breakdown(samples: list[Sample], cutouts: list[Path], cfg: T.AugmentConfig, max_pixels: int,
              repeat: int) -> dict[str, tuple[float, float]]:
    """Mean (wall ms, CPU ms) per image of each stage, every stage on every image, one process, one OpenCV
    thread. The CPU time (time.thread_time) does not count time the stage waited for a shared core."""
    cv2.setNumThreads(1)
    cuts = [IMG.load_cutout(p) for p in cutouts]
    stages = ("decode", "resize", "geometric", "colour", "padding", "insertion", "encode")
    wall, cpu = dict.fromkeys(stages, 0.0), dict.fromkeys(stages, 0.0)
    count = 0
    for r in range(repeat):
        for i, s in enumerate(samples):
            rng = np.random.default_rng([r, i])
            raw = img = None
            steps = {
                "decode": lambda: IMG.decode_image(s.path, max_pixels),
                "resize": lambda: IMG.resize_for_model(raw, max_pixels),
                "geometric": lambda: T.random_geometric(img, rng, cfg),
                "colour": lambda: T.random_colour(img, rng, cfg),
                "padding": lambda: T.random_padding(img, rng, cfg, max_pixels),  # straight to the model's size
                "insertion": lambda: T.insert_hazard(img, cuts[i % len(cuts)], rng, cfg),
                "encode": lambda: IMG.encode_jpeg(img, cfg.jpeg_quality),
            }
            for name in stages:
                t, c = time.perf_counter(), time.thread_time()
                result = steps[name]()
                wall[name] += time.perf_counter() - t
                cpu[name] += time.thread_time() - c
                if name == "decode":
                    raw = result
                elif name == "resize":
                    img = result
            count += 1
    cv2.setNumThreads(-1)
    return {k: (1000 * wall[k] / count, 1000 * cpu[k] / count) for k in stages}


def cpu_seconds() -> float:
    """User + system time of this process and of its finished children (the worker processes)."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def end_to_end(samples: list[Sample], cutouts: Path, out: Path, copies: int, workers: int, max_pixels: int,
               all_transforms: bool) -> tuple[int, float, float, dict[str, int]]:
    cfg = T.AugmentConfig(p_geometric=1, p_colour=1, p_padding=1) if all_transforms else T.AugmentConfig()
    n_insert = sum(s.label in P.INSERT_SOURCES for s in samples)  # one insertion copy per eligible source
    jobs = P.plan_augmentation(samples, {label: copies for label in LABELS}, seed=0, config=cfg, cutouts=cutouts,
                               n_insert=n_insert)
    shutil.rmtree(out, ignore_errors=True)
    t, c = time.perf_counter(), cpu_seconds()
    run_plan(jobs, out, config=cfg, max_pixels=max_pixels, workers=workers, progress=False)
    wall, cpu = time.perf_counter() - t, cpu_seconds() - c
    mix = {name: sum(name in j.transforms for j in jobs) for name in T.TRANSFORMS}
    return len(jobs), wall, cpu, mix


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-images", type=int, default=40)
    ap.add_argument("--copies", type=int, default=8, help="augmented copies per source image (end to end)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-pixels", type=int, default=IMG.DEFAULT_MAX_PIXELS)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=960)
    ap.add_argument("--repeat", type=int, default=3, help="passes over the images for the breakdown")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="augment-bench-"))
    try:
        load_before = os.getloadavg()
        samples = make_sources(tmp / "src", args.n_images, args.width, args.height, args.seed)
        demo_data.write_cutouts(tmp / "cutouts", args.seed)
        cutouts = IMG.list_cutouts(tmp / "cutouts")
        h, w = model_size(args.height, args.width, args.max_pixels)
        cfg = T.AugmentConfig()

        stages = breakdown(samples, cutouts, cfg, args.max_pixels, args.repeat)
        runs = []
        for workers, all_t in ((args.workers, False), (1, False), (args.workers, True)):
            n, wall, cpu, mix = end_to_end(samples, tmp / "cutouts", tmp / "out", args.copies, workers,
                                           args.max_pixels, all_t)
            runs.append((workers, all_t, n, wall, cpu, mix))
        load_after = os.getloadavg()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"machine: {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, "
          f"OpenCV {cv2.__version__}, numpy {np.__version__}; load average before {load_before[0]:.2f}, "
          f"after {load_after[0]:.2f}")
    print(f"source: {args.n_images} JPEGs {args.width}×{args.height} → model size {w}×{h} "
          f"(max_pixels {args.max_pixels})\n")
    print("| end to end | workers | jobs | transforms applied (geometric / colour / padding / insert) "
          f"| wall s | images/s | CPU s | ms CPU / image | images/s if the {os.cpu_count()} cores were free |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for workers, all_t, n, wall, cpu, mix in runs:
        kind = "every transform on every job" if all_t else "default plan mix"
        applied = " / ".join(str(mix[t]) for t in ("geometric", "colour", "padding", "insert"))
        print(f"| {kind} | {workers} | {n} | {applied} | {wall:.2f} | **{n / wall:.1f}** | {cpu:.2f} | "
              f"{1000 * cpu / n:.1f} | {(os.cpu_count() or 1) * n / cpu:.1f} (projection) |")
    print("\n| stage (1 process, 1 OpenCV thread) | wall ms / image | CPU ms / image |\n|---|---:|---:|")
    for name, (ms, cpu_ms) in stages.items():
        print(f"| {name} | {ms:.2f} | {cpu_ms:.2f} |")
    print(f"| sum (every stage once) | {sum(v[0] for v in stages.values()):.2f} | "
          f"{sum(v[1] for v in stages.values()):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
