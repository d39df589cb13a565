"""Build the embedded demo: a synthetic corridor dataset in the official layout, hazard cut-outs, and two tiny
Qwen2.5-VL base models (stage 1 and stage 2) that already know something about such images.

    python -m tools.demo.make --data-dir data/demo --models-dir .cache/demo-models

The dataset (tools.demo.data) is written every time; same seed, same bytes. The models (tools.demo.models) are
built and pre-trained (tools.demo.pretrain) once and cached under `<models-dir>/v<VERSION>-seed<SEED>/`; the
pipeline's stages then use LoRA on them exactly as with real weights.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

from tools import cli
from tools.demo.data import make_dataset
from tools.demo.models import SPECS, VERSION, build_tiny_model, cached_models_dir, quick_spec
from tools.demo.pretrain import pretrain_model
from tools.fileio import write_text


def make_models(models_dir: str | Path, seed: int = 0, workers: int | None = None, stages=tuple(SPECS),
                quick: bool = False) -> Path:
    """Build and pre-train the demo base models once; later calls return the cached directory."""
    root = cached_models_dir(models_dir, seed, quick)
    workers = workers or os.cpu_count() or 1
    for stage in stages:
        final = root / stage
        if (final / "config.json").exists() and (final / "DONE").exists():
            print(f"demo model {stage}: cached at {final}")
            continue
        spec = quick_spec(SPECS[stage]) if quick else SPECS[stage]
        start = time.time()
        tmp = root / f".{stage}.building"
        shutil.rmtree(tmp, ignore_errors=True)
        model_dir = build_tiny_model(tmp / "model", spec, seed)
        stats = pretrain_model(model_dir, tmp / "pretrain", spec, seed, workers)
        write_text(model_dir / "DONE", json.dumps({"version": VERSION, "seed": seed, "spec": asdict(spec),
                                                   "seconds": round(time.time() - start, 1), **stats}) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(model_dir, final)  # the cache entry appears only when complete
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"demo model {stage}: built and pre-trained in {time.time() - start:.0f} s -> {final}")
    return root



def main(argv: list[str] | None = None) -> int:
    ap = cli.parser("tools.demo.make", __doc__)
    ap.add_argument("--data-dir", default="data/demo", help="where to write the dataset (default: %(default)s)")
    ap.add_argument("--models-dir", default=".cache/demo-models",
                    help="model cache root (default: %(default)s); models go to <dir>/v<VERSION>-seed<SEED>/")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=600, help="training images (default: %(default)s)")
    ap.add_argument("--test", type=int, default=300, help="test images (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    ap.add_argument("--skip-data", action="store_true", help="only build the models")
    ap.add_argument("--skip-models", action="store_true", help="only write the dataset")
    ap.add_argument("--quick", action="store_true",
                    help="token pre-training only (for testing the plumbing; the models will not learn the task)")
    ap.add_argument("--print-model", choices=list(SPECS), help="print where that demo model is cached and exit")
    args = ap.parse_args(argv)
    if args.print_model:
        print((cached_models_dir(args.models_dir, args.seed, args.quick) / args.print_model).resolve())
        return 0
    if not args.skip_data:
        start = time.time()
        out = make_dataset(args.data_dir, args.seed, args.train, args.test, args.workers)
        print(f"demo dataset: {args.train} train + {args.test} test images in {time.time() - start:.0f} s -> {out}")
    if not args.skip_models:
        make_models(args.models_dir, args.seed, args.workers, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
