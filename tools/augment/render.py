"""Render an augmentation plan into JPEG files, in worker processes."""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Sequence

import cv2
from tqdm import tqdm

from tools.augment.images import DEFAULT_MAX_PIXELS, encode_jpeg, load_cutout, load_image
from tools.augment.plan import AugmentJob
from tools.augment.transforms import AugmentConfig, apply_transforms
from tools.data.lists import Sample
from tools.fileio import put_bytes


def render_job(job: AugmentJob, cfg: AugmentConfig = AugmentConfig(), max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """The JPEG bytes of one job: decode, resize to the model's size, transforms, encode."""
    img = load_image(job.sample.path, max_pixels)
    cutout = load_cutout(job.cutout) if "insert" in job.transforms else None
    out = apply_transforms(img, job.transforms, job.seed, cfg, cutout, max_pixels)
    return encode_jpeg(out, cfg.jpeg_quality)


def _run_one(job: AugmentJob, out_dir: str, cfg: AugmentConfig, max_pixels: int) -> Sample:
    path = Path(out_dir) / job.out_name
    try:
        data = render_job(job, cfg, max_pixels)
    except Exception as e:
        raise RuntimeError(f"augmenting {job.sample.path} (copy {job.copy}, {'+'.join(job.transforms)}): "
                           f"{type(e).__name__}: {e}") from e
    put_bytes(path, data)
    return Sample(name=job.out_name, path=path, label=job.label, source=f"augment:{job.sample.source}")


def _worker_init() -> None:
    cv2.setNumThreads(1)  # one process per core already
    # glibc: keep freed image buffers in the heap. By default a fresh process hands each 3-5 MB buffer back
    # to the kernel and faults it in again on the next job: measured ~10 ms of system time per 1-MP job,
    # ~1 ms with this (~30 % of a job's CPU). Only the worker processes are tuned; elsewhere it is a no-op.
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: the glibc maximum (32 MiB)
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def run_plan(jobs: Sequence[AugmentJob], out_dir: str | os.PathLike, *, config: AugmentConfig = AugmentConfig(),
             max_pixels: int = DEFAULT_MAX_PIXELS, workers: int | None = None, chunksize: int = 8,
             progress: bool = True) -> list[Sample]:
    """Render every job into out_dir/<stem>_aug<k>.jpg; returns one Sample per job, in job order, with the
    new label and source "augment:<original source>". Bytes depend on the jobs only, not on `workers`."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    names = [j.out_name for j in jobs]
    if len(set(names)) != len(names):
        raise ValueError("two jobs write the same file: plan each original once")
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    fn = partial(_run_one, out_dir=str(out), cfg=config, max_pixels=max_pixels)
    bar = dict(total=len(jobs), desc="augmenting", disable=not progress, leave=False)
    if workers == 1:
        return [fn(j) for j in tqdm(jobs, **bar)]
    # spawn, not fork: a forked child can inherit OpenCV's thread pool in a bad state
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init) as pool:
        return list(tqdm(pool.map(fn, jobs, chunksize=chunksize), **bar))

