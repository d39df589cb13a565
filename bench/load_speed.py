"""How long a stage's model takes to load before scoring, with the page cache warm or cold, with and without the
read-ahead of its weights (tools.model.prefetch, SCORE_PREFETCH).

    python bench/load_speed.py --work /tmp/rh [--stage stage1] [--rounds 2] [--out DIR]
    python bench/load_speed.py --work /tmp/rh --evict-only      # drop both stages' weights from the cache, then exit
    python bench/load_speed.py --checkpoint CKPT [--configs cold,cold-ahead]   # any checkpoint of a local model

Run after bench/rehearsal.py has prepared and trained (its --work). Each load is a fresh Python process doing what
test.sh's scoring does before its first batch: tools.model.infer.load of the stage's final checkpoint (importing
swift, the weights and adapter, the speed-ups). "cold" first drops the base model's weight files and the adapter's
files from the page cache (posix_fadvise DONTNEED: no root needed) and checks with mincore how much of them is still
resident, as after a reboot or on a machine whose memory held other things since training; "warm" reads them
into the cache first. The configurations take
turns, round by round, so a slow period of the host hits each alike. Prints the medians (wall time of the process,
and the three parts the load prints) and writes load_speed.<stage>.json (load_speed.checkpoint.json) under --out.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a bench script, run by path: the project's own modules

from tools.model import prefetch  # noqa: E402
from tools.model.checkpoint import read_pointer  # noqa: E402
from tools.task import FINAL, STAGES, Layout  # noqa: E402

CONFIGS = {"warm": ({"SCORE_PREFETCH": "0"}, False), "cold": ({"SCORE_PREFETCH": "0"}, True),  # name: (env, evict)
           "warm-ahead": ({"SCORE_PREFETCH": "1"}, False), "cold-ahead": ({"SCORE_PREFETCH": "1"}, True)}
LOAD_LINE = re.compile(r"load: importing swift ([\d.]+) s, model and adapter ([\d.]+) s, speed-ups ([\d.]+) s")
CHILD = """
import sys
from tools.model import infer
infer.choose_compile(2000)  # as test.sh's 2,000 photos: the compiled speed-ups are set up
infer.load(sys.argv[1:])
"""


def files_of(checkpoint: Path) -> list[Path]:
    """The base model's weight files and the adapter's files: what a load reads in bulk."""
    folder = prefetch.model_dir(["--adapters", str(checkpoint)])
    return (prefetch.weight_files(folder) if folder else []) + sorted(p for p in checkpoint.iterdir() if p.is_file())


def evict(files: list[Path]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages are not dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_share(files: list[Path]) -> float:
    """The share of the files' pages in the page cache (mincore on a read-only mapping of each)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = os.sysconf("SC_PAGE_SIZE")
    total = resident = 0
    for path in files:
        size = path.stat().st_size
        if not size:
            continue
        pages = (size + page - 1) // page
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"mmap {path}")
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
            libc.munmap(addr, size)
        finally:
            os.close(fd)
        total += pages
        resident += pages - bytes(vec).count(0)
    return resident / max(total, 1)


def read_speed(path: Path) -> float:
    """GB/s of one cold sequential read of path (evicted before and after)."""
    evict([path])
    start = time.perf_counter()
    prefetch.read_ahead([path])
    seconds = time.perf_counter() - start
    evict([path])
    return path.stat().st_size / seconds / 1e9


def load_once(checkpoint: Path, env: dict, max_pixels: str) -> dict:
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", CHILD, "--adapters", str(checkpoint), "--max_pixels", max_pixels],
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                             [str(ROOT), os.environ.get("PYTHONPATH", "")]), "MAX_PIXELS": max_pixels, **env},
                         capture_output=True, text=True)
    wall = time.perf_counter() - start
    if run.returncode:
        raise SystemExit(f"the load failed (rc {run.returncode}):\n{run.stderr[-3000:]}")
    m = LOAD_LINE.search(run.stdout)
    return {"wall_s": round(wall, 2), "import_s": float(m[1]), "weights_s": float(m[2]), "speedups_s": float(m[3])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, help="bench/rehearsal.py's --work (prepared and trained)")
    ap.add_argument("--checkpoint", type=Path, help="or: any swift checkpoint whose args.json names a local model")
    ap.add_argument("--stage", choices=STAGES, default=STAGES[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help="which loads, in turn: warm (files read into the cache first), cold (evicted), each "
                         "with SCORE_PREFETCH=0; warm-ahead and cold-ahead the same with the read-ahead on")
    ap.add_argument("--max-pixels", default="1003520")
    ap.add_argument("--evict-only", action="store_true", help="drop every stage's model files from the cache, exit")
    ap.add_argument("--out", type=Path, default=Path("."))
    a = ap.parse_args(argv)
    configs = a.configs.split(",")
    if unknown := set(configs) - set(CONFIGS):
        ap.error(f"unknown --configs {sorted(unknown)}; choose from {list(CONFIGS)}")
    if bool(a.work) == bool(a.checkpoint):
        ap.error("give --work or --checkpoint")

    layout = Layout(a.work / "outputs") if a.work else None
    if a.evict_only:
        for stage, checkpoint in ([(s, read_pointer(layout.run_dir(s, FINAL))) for s in STAGES] if layout
                                  else [("checkpoint", a.checkpoint)]):
            files = files_of(checkpoint)
            evict(files)
            print(f"{stage}: {sum(f.stat().st_size for f in files) / 1e9:.1f} GB, "
                  f"{resident_share(files):.1%} resident after eviction")
        return 0
    checkpoint = read_pointer(layout.run_dir(a.stage, FINAL)) if layout else a.checkpoint
    label = a.stage if layout else "checkpoint"
    files = files_of(checkpoint)
    size_gb = sum(f.stat().st_size for f in files) / 1e9
    weights = [f for f in files if f.name.endswith(prefetch.WEIGHT_SUFFIXES) and f.parent != checkpoint]
    result = {"stage": label, "checkpoint": str(checkpoint), "gb": round(size_gb, 2),
              "disk_gb_per_s": round(read_speed(max(weights, key=lambda f: f.stat().st_size)), 2), "loads": []}
    for round_ in range(a.rounds):
        for name in configs:
            env, cold = CONFIGS[name]
            if cold:
                evict(files)
            else:
                prefetch.read_ahead(files)
            before = resident_share(files)
            load = {"config": name, "round": round_, "resident_before": round(before, 3),
                    **load_once(checkpoint, env, a.max_pixels)}
            print(json.dumps(load), flush=True)
            result["loads"].append(load)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"load_speed.{label}.json").write_text(json.dumps(result, indent=1))
    print(f"\n{label}: {size_gb:.1f} GB of weights and adapter; "
          f"one cold sequential read {result['disk_gb_per_s']} GB/s")
    print("| load (fresh process) | runs | resident before | wall s | import s | weights and adapter s | speed-ups s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in configs:
        runs = [r for r in result["loads"] if r["config"] == name]
        med = {k: statistics.median(r[k] for r in runs) for k in ("resident_before", "wall_s", "import_s", "weights_s",
                                                                  "speedups_s")}
        print(f"| {name} | {len(runs)} | {med['resident_before']:.0%} | {med['wall_s']:.1f} | {med['import_s']:.1f} | "
              f"{med['weights_s']:.1f} | {med['speedups_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
