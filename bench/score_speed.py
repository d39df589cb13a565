"""test.sh's scoring on many phone photos: both stages' checkpoints from a rehearsal (bench/rehearsal.py), each
configuration in its own process, as `tools.model.score` runs inside test.sh.

    python bench/score_speed.py --work /tmp/rehearsal --n 1000 [--configs today,merged] [--out DIR]

Makes N 4032x3024 phone JPEGs (EXIF orientations as in the rehearsal), prepares them as data-pre.sh does
(tools.data.images), and scores them with stage 1 then stage 2 in one process per configuration:
  today    SCORE_MERGE=0: the LoRA adapter applied at every linear layer (the path before merging)
  merged   SCORE_MERGE=1: the adapter folded into the base weights in memory (test.sh's default on a GPU since)
Both with SCORE_COMPILE_LLM=0, so the pair measures merging alone (bench/score_levers.py measures the rest).
Reports per configuration the process wall time (start-up, loading both models, scoring), each stage's scoring
rate, the end-to-end images/s (N / wall), the fraction of the physical floor (~20 images/s for both stages on an
H200 at 1,280 visual tokens), and how far the probabilities move against `today` (argmax agreement, max |diff|).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a bench script, run by path: the project's own modules
sys.path.insert(0, str(ROOT / "bench"))

from tools.data.images import prepare_image  # noqa: E402
from tools.fileio import write_jsonl  # noqa: E402
from tools.model.checkpoint import read_pointer  # noqa: E402
from tools.probs import read_probs  # noqa: E402
from tools.task import LABELS, Layout, sft_row  # noqa: E402

FLOOR_BOTH = 20.0  # images/s for both stages on one H200 (README: ~24 + ~14 TFLOP per image at ~790 TFLOP/s)
CONFIGS = {"today": {"SCORE_MERGE": "0", "SCORE_COMPILE_LLM": "0"},
           "merged": {"SCORE_MERGE": "1", "SCORE_COMPILE_LLM": "0"}}
SCORE = """
import sys, json
from pathlib import Path
from tools.model.infer import score_jobs
jobs = [(Path(c), [(Path(sys.argv[1]), Path(o))]) for c, o in json.loads(sys.argv[2])]
score_jobs(jobs, ["--max_pixels", sys.argv[3]], int(sys.argv[4]))
"""


def _prepare(job: tuple[str, str, int]) -> None:
    prepare_image(*job)


def make_rows(work: Path, n: int, max_pixels: int) -> Path:
    from rehearsal import _photo

    rows = work / "speed" / f"rows{n}.jsonl"
    if rows.exists():
        return rows
    src, prepared = work / "speed" / "src", work / "speed" / "prepared"
    src.mkdir(parents=True, exist_ok=True)
    prepared.mkdir(parents=True, exist_ok=True)
    kinds = ["exif1", "exif3", "exif6", "exif8", "plain"]
    jobs = [(src / f"p{i:05d}.jpg", LABELS[i % len(LABELS)], 10_000 + i, kinds[i % len(kinds)], (4032, 3024))
            for i in range(n)]
    workers = min(16, os.cpu_count() or 1)
    start = time.time()
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_photo, jobs, chunksize=4))
        list(pool.map(_prepare, [(str(j[0]), str(prepared / j[0].name), max_pixels) for j in jobs], chunksize=8))
    write_jsonl(rows, (sft_row(prepared / j[0].name, None) for j in jobs))
    print(f"[score_speed] {n} photos made and prepared in {time.time() - start:.0f} s", flush=True)
    return rows


def run_config(name: str, env_extra: dict, rows: Path, checkpoints: list[Path], out: Path, max_pixels: int,
               batch: int) -> dict:
    outputs = [out / f"{name}_stage{i + 1}.csv" for i in range(len(checkpoints))]
    for o in outputs:
        o.unlink(missing_ok=True)
        o.with_suffix(".json").unlink(missing_ok=True)
    env = {**os.environ, **env_extra, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}",
           "MAX_PIXELS": str(max_pixels), "PYTHONUNBUFFERED": "1"}
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", SCORE, str(rows), json.dumps([[str(c), str(o)] for c, o in
                                                                              zip(checkpoints, outputs)]),
                           str(max_pixels), str(batch)], env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - start
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        print(f"[score_speed] {name} failed:\n{(proc.stdout + proc.stderr)[-3000:]}", flush=True)
        return {"rc": proc.returncode}
    rates = [float(m) for m in re.findall(r"scored \d+ images in [\d.]+ s \(([\d.]+) images/s\)", proc.stdout)]
    n = sum(1 for _ in rows.open())
    return {"rc": 0, "wall_s": round(wall, 1), "stage_images_per_s": rates, "end_to_end_images_per_s": round(n / wall, 2),
            "floor_fraction": round(n / wall / FLOOR_BOTH, 3), "outputs": [str(o) for o in outputs]}


def compare(ref: np.ndarray, probs: np.ndarray) -> dict:
    """How far [N, K] probabilities moved from the reference: argmax agreement, max and mean |diff|."""
    return {"argmax_agreement": round(float((ref.argmax(1) == probs.argmax(1)).mean()), 4),
            "max_abs_diff": round(float(np.abs(ref - probs).max()), 4),
            "mean_abs_diff": round(float(np.abs(ref - probs).mean()), 5)}


def agreement(a: list[str], b: list[str]) -> list[dict]:
    return [compare(read_probs(x)[1], read_probs(y)[1]) for x, y in zip(a, b)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/rehearsal"), help="the rehearsal's work folder")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--configs", default="today,merged")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-pixels", type=int, default=1003520)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    out = a.out or a.work / "report"
    out.mkdir(parents=True, exist_ok=True)
    layout = Layout(a.work / "outputs")
    checkpoints = [read_pointer(layout.run_dir(stage)) for stage in ("stage1", "stage2")]
    rows = make_rows(a.work, a.n, a.max_pixels)
    results = {}
    for name in a.configs.split(","):
        results[name] = run_config(name, CONFIGS[name], rows, checkpoints, out, a.max_pixels, a.batch_size)
        print(f"[score_speed] {name}: {json.dumps(results[name])}", flush=True)
    if "today" in results and results["today"].get("rc") == 0:
        for name, r in results.items():
            if name != "today" and r.get("rc") == 0:
                r["vs_today"] = agreement(results["today"]["outputs"], r["outputs"])
    (out / "score_speed.json").write_text(json.dumps(results, indent=1))
    lines = [f"| configuration ({a.n} photos, both stages) | process wall s | stage 1 img/s | stage 2 img/s | "
             f"end to end img/s | of floor (~{FLOOR_BOTH:g}) | vs today: argmax agreement, max abs diff |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for name, r in results.items():
        if r.get("rc") != 0:
            lines.append(f"| {name} | failed | | | | | |")
            continue
        vs = "; ".join(f"{v['argmax_agreement']:.4f}, {v['max_abs_diff']:.4f}" for v in r.get("vs_today", []))
        s1, s2 = (r["stage_images_per_s"] + [None, None])[:2]
        lines.append(f"| {name} | {r['wall_s']} | {s1} | {s2} | {r['end_to_end_images_per_s']} | "
                     f"{r['floor_fraction']:.0%} | {vs or '–'} |")
    (out / "score_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
