#!/usr/bin/env python3
"""Several GPUs (issue 16), on the 2-GPU machine: stage-1 (7B) and stage-2 (3B, amplifier + weighted loss) training
samples/s with 1 and 2 GPUs at the recipe's global batch (4 x 4 = 16) under DDP, ZeRO-2 and ZeRO-3, with each
process's peak memory, and test.sh's scoring on 1 and 2 GPUs. Full-size random Qwen2.5-VL-7B/3B, the real tokenizer
and 1120x896 JPEGs (1,280 visual tokens) from bench/gpu_bench.py's builders, prepared by data-pre.sh (recipe real, no
augmentation).

    python3 bench/multi_gpu.py --work /tmp/mg --out DIR                                   # everything
    python3 bench/multi_gpu.py --work /tmp/mg --configs s1-1gpu,s1-ddp,s1-zero2,s1-zero3  # run 1 of 2 (setup too)
    python3 bench/multi_gpu.py --work /tmp/mg --configs s2-1gpu,s2-ddp,s2-zero2,s2-zero3,score-1gpu,score-2gpu
    python3 bench/multi_gpu.py --work /tmp/mgt --tiny     # CPU smoke test: tiny models, demo recipe, 2 CPU processes

Training runs `bash train.sh` exactly as a team would (STAGES=stage1|stage2, NPROC_PER_NODE=2 and CUDA_VISIBLE_DEVICES
0,1 for two GPUs, DEEPSPEED=zero2|zero3), so swift's CLI starts torchrun and train.sh divides the accumulation (4 ->
2 per GPU); each run is bounded: --max_steps WARMUP+STEPS, no evaluation, one save at the end (a DeepSpeed
checkpoint under ZeRO). bench/_bench_timer.py, passed as one more plugin, times every optimizer step on every process
(samples/s over the steps after the warm-up, global batch counted; peak memory per process). ZeRO-3 stage 1 runs with
USE_LIGER_KERNEL_STAGE1=false (the preflight refuses liger's fused loss under ZeRO-3). Scoring runs
`python -m tools.model.score --checkpoint <stage 1's> --dataset test.jsonl` with CUDA_VISIBLE_DEVICES=0 and then 0,1
(tools/model/shards.py: one process per GPU), both on the same images; reported: the scoring loop's images/s (from
the scorer's own lines; the slower shard for two GPUs), the whole command's wall time, and the largest difference
between the two CSVs.

--tiny runs every configuration with tiny models on CPU processes (gloo; the real recipe in float32, liger off): the
DDP ones train; the DeepSpeed ones are refused by train.sh's preflight (DeepSpeed needs CUDA) and show it; scoring on
two CPU processes goes through the same sharding (tools.model.shards with CPU devices). Results:
WORK/mg-results/*.json and multi_gpu.md, written after every configuration (and copied to --out).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a bench script, run by path: the project's own modules
sys.path.insert(0, str(ROOT / "bench"))

import gpu_bench  # noqa: E402  (reads --tiny itself: TINY_MODE, RECIPE, IMAGE_SIZE, MAX_PIXELS)
from tools.task import Layout  # noqa: E402

TINY = gpu_bench.TINY_MODE
CONFIGS: dict[str, dict] = {
    **{f"s{n}-{kind}": {"kind": "train", "stage": f"stage{n}", "gpus": 1 if kind == "1gpu" else 2,
                        "deepspeed": kind if kind.startswith("zero") else ""}
       for n in (1, 2) for kind in ("1gpu", "ddp", "zero2", "zero3")},
    **{f"s{n}-{zero}-1gpu": {"kind": "train", "stage": f"stage{n}", "gpus": 1, "deepspeed": zero}
       for n in (1, 2) for zero in ("zero2", "zero3")},  # DeepSpeed in one process (a one-GPU machine's check)
    "score-1gpu": {"kind": "score", "gpus": 1}, "score-2gpu": {"kind": "score", "gpus": 2},
}
DEFAULT = ",".join(c for c in CONFIGS if not c.endswith("-1gpu") or c.count("-") == 1)


def log(msg: str) -> None:
    print(f"[multi_gpu {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bin_dir(work: Path) -> Path:
    """`python` and `swift` on PATH as this interpreter's (the real swift CLI, so NPROC_PER_NODE starts torchrun)."""
    d = work / "mg-bin"
    d.mkdir(parents=True, exist_ok=True)
    py = shlex.quote(sys.executable)
    for name, text in (("python", f'#!/bin/sh\nexec {py} "$@"\n'),
                       ("swift", f'#!/bin/sh\nexec {py} -m swift.cli.main "$@"\n')):
        (d / name).write_text(text)
        (d / name).chmod(0o755)
    return d


def setup(a) -> None:
    """gpu_bench's models and synthetic data, then data-pre.sh with the real recipe (no augmentation: not measured
    here, and its filter would load a model); --tiny: tiny models and images, the recipe's CPU-able values."""
    tok = gpu_bench.tokenizer_dir(a.work)
    for size in sorted({a.stage1_size, "3b"}):
        gpu_bench.build_model(size, a.work / "models" / size, tok)
    gpu_bench.make_data(a.work / "data", a.n_train, a.n_test)
    if Layout(a.work / "pipeline").manifest.exists():
        return
    env = base_env(a, "setup")
    env.update(DATA_DIR=str(a.work / "data"), AUGMENT="0", MODEL_STAGE1=str(a.work / "models" / a.stage1_size),
               MODEL_STAGE2=str(a.work / "models" / "3b"))
    rc, wall = run(["bash", "data-pre.sh"], env, a.work / "mg-logs" / "data-pre.log", a.timeout)
    if rc != 0:
        raise SystemExit(f"data-pre.sh failed (rc {rc}):\n{tail(a.work / 'mg-logs' / 'data-pre.log')}")
    log(f"data-pre.sh: {wall:.0f} s")


def base_env(a, name: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "DEEPSPEED", "CUDA_VISIBLE_DEVICES",
                                                            "SCORE_GPUS")}
    env.update(PATH=f"{bin_dir(a.work)}:{os.environ['PATH']}", VENV="/nonexistent", PYTHONUNBUFFERED="1",
               OUTPUT_DIR=str(a.work / "pipeline"), RECIPE="real", MAX_PIXELS=str(gpu_bench.MAX_PIXELS),
               ALLOW_STALE="1",  # one stage at a time: the other need not have trained
               BENCH_RESULT=str(a.results / name), BENCH_WARMUP=str(a.warmup),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if TINY:  # the real recipe as a CPU runs it (as bench/rehearsal.py --tiny)
        env.update(TORCH_DTYPE="float32", USE_LIGER_KERNEL_STAGE1="false",
                   OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // 2)))
    return env


def run(cmd: list[str], env: dict, logf: Path, timeout: int) -> tuple[int | str, float]:
    logf.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(logf, "w") as f:
        f.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        f.flush()
        try:
            rc: int | str = subprocess.run(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                           timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return rc, time.time() - start


def tail(logf: Path, n: int = 1500) -> str:
    return logf.read_text(errors="replace")[-n:] if logf.exists() else ""


# --------------------------------------------------------------------------- training
def train_config(a, name: str, cfg: dict) -> dict:
    from swift_plugins import plugin_files

    stage = cfg["stage"]
    env = base_env(a, name)
    env.update(STAGES=stage, MASTER_PORT=str(free_port()))
    if not TINY:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(cfg["gpus"]))
    if cfg["gpus"] > 1 or cfg["deepspeed"]:  # torchrun, as swift's DeepSpeed examples (one process too)
        env["NPROC_PER_NODE"] = str(cfg["gpus"])
    changed = {}
    if cfg["deepspeed"]:
        env["DEEPSPEED"] = cfg["deepspeed"]
        if cfg["deepspeed"] == "zero3" and stage == "stage1":  # refused under ZeRO-3: liger's fused loss reads
            changed["USE_LIGER_KERNEL_STAGE1"] = "false"      # lm_head.weight outside lm_head's forward
    env.update(changed)
    steps = a.warmup + a.steps
    callbacks = ["amplifier_stats", "bench_timer"] if stage == "stage2" else ["bench_timer"]
    extra = ["--external_plugins", *map(str, plugin_files()), str(ROOT / "bench" / "_bench_timer.py"),
             "--callbacks", *callbacks, *gpu_bench.bench_flags(a, steps)]
    for old in a.results.glob(f"{name}.rank*.json"):
        old.unlink()
    logf = a.work / "mg-logs" / f"{name}.log"
    log(f"{name}: {stage}, {cfg['gpus']} {'GPU' if not TINY else 'process'}(es), DEEPSPEED={cfg['deepspeed'] or '-'}")
    rc, wall = run(["bash", "train.sh", *extra], env, logf, a.timeout)
    ranks = [json.loads(p.read_text()) for p in sorted(a.results.glob(f"{name}.rank*.json"))]
    out = {"name": name, "kind": "train", **cfg, "rc": rc, "wall_s": round(wall, 1), "ranks": len(ranks),
           "extra_env": {**{k: env[k] for k in ("NPROC_PER_NODE", "DEEPSPEED", "CUDA_VISIBLE_DEVICES") if k in env},
                         **changed}}
    text = logf.read_text(errors="replace") if logf.exists() else ""
    batch = re.search(r"global batch \d+ x \d+ x \d+ = \d+[^\n]*", text)
    if batch:
        out["train_sh_says"] = batch.group(0)
    if ranks:
        r0 = next((r for r in ranks if r["rank"] == 0), ranks[0])
        out.update({k: r0[k] for k in ("global_batch", "batch_size", "grad_accum", "world_size", "s_per_step",
                                       "samples_per_s", "measured_steps", "step_times") if k in r0})
        out["deepspeed_active"] = r0.get("deepspeed")  # what the trainer ran with; cfg's "deepspeed" names the stage
        peaks = [r["peak_reserved_gib"] for r in ranks if "peak_reserved_gib" in r]
        if peaks:
            out.update(peak_reserved_gib=max(peaks), peak_reserved_per_gpu=peaks,
                       peak_allocated_gib=max(r["peak_allocated_gib"] for r in ranks if "peak_allocated_gib" in r))
    if stage == "stage2" and rc == 0:
        out["amplifier"] = amplifier_saved(Layout(a.work / "pipeline"))
    if rc != 0:
        refused = re.search(r"this machine cannot train with these settings:\n((?:  .*\n)+)", text)
        out["error"] = refused.group(0) if refused else tail(logf)
        log(f"{name}: rc {rc} after {wall:.0f} s:\n{out['error'][-1200:]}")
    else:
        log(f"{name}: {out.get('samples_per_s')} samples/s, {out.get('s_per_step')} s/step, global batch "
            f"{out.get('global_batch')}, peak {out.get('peak_reserved_per_gpu')} GiB ({wall:.0f} s)")
    return out


def amplifier_saved(layout: Layout) -> dict:
    """The amplifier's weights in the stage-2 checkpoint just written: present, full-size, moved from identity."""
    try:
        from tools.model.checkpoint import read_pointer

        ckpt = read_pointer(layout.run_dir("stage2"))
        import safetensors.torch

        w = safetensors.torch.load_file(str(ckpt / "amplifier.safetensors"))
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        return {"error": f"{type(e).__name__}: {e}"}
    return {"tensors": len(w), "empty": [k for k, v in w.items() if v.numel() == 0],
            "attn_bias_absmax": max((float(v.abs().max()) for k, v in w.items() if k.startswith("attn_bias")),
                                    default=0.0),
            "deepspeed_checkpoint": any(ckpt.glob("global_step*"))}


# --------------------------------------------------------------------------- scoring
def score_config(a, name: str, cfg: dict) -> dict:
    pipe = Layout(a.work / "pipeline")
    env = base_env(a, name)
    ckpt = stage1_checkpoint(a)
    csv = a.work / f"{name}.csv"
    for p in [csv, csv.with_suffix(".json"), *csv.parent.glob(f"{csv.stem}.partial*.csv")]:
        p.unlink(missing_ok=True)  # scored before: it would be kept
    args = ["--checkpoint", ckpt, "--dataset", str(pipe.test_jsonl), "--output", str(csv), "--batch-size",
            str(a.score_batch_size), "--", "--max_pixels", str(gpu_bench.MAX_PIXELS)]
    if TINY and cfg["gpus"] > 1:  # no GPU: the same sharding on CPU processes
        cmd = [sys.executable, __file__, "score-cpu-shards", str(cfg["gpus"]), *args]
    else:
        cmd = [sys.executable, "-m", "tools.model.score", *args]
        if not TINY:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(cfg["gpus"]))
    logf = a.work / "mg-logs" / f"{name}.log"
    log(f"{name}: scoring {pipe.test_jsonl.name} with {ckpt} on {cfg['gpus']} {'GPU' if not TINY else 'process'}(es)")
    rc, wall = run(cmd, env, logf, a.timeout)
    text = logf.read_text(errors="replace") if logf.exists() else ""
    out = {"name": name, "kind": "score", **cfg, "rc": rc, "wall_s": round(wall, 1), "csv": str(csv)}
    shards = re.findall(r"\[shard (\d+)/(\d+), [^\]]*\] scored (\d+) images in ([\d.]+) s", text)
    single = re.findall(r"^scored (\d+) images in ([\d.]+) s \(", text, re.M)
    if shards:
        images, loop = sum(int(s[2]) for s in shards), max(float(s[3]) for s in shards)
        out["per_shard"] = [{"shard": int(s[0]), "images": int(s[2]), "loop_s": float(s[3])} for s in shards]
    elif single:
        images, loop = sum(int(s[0]) for s in single), sum(float(s[1]) for s in single)
    else:
        images = loop = 0
    if images:
        out.update(images=images, loop_s=round(loop, 2), images_per_s=round(images / loop, 2),
                   images_per_s_wall=round(images / wall, 2))
    if rc != 0:
        out["error"] = tail(logf)
        log(f"{name}: rc {rc}:\n{out['error'][-1200:]}")
    else:
        log(f"{name}: {out.get('images')} images, loop {out.get('images_per_s')} images/s, wall {wall:.0f} s")
    return out


def stage1_checkpoint(a) -> str:
    try:
        return gpu_bench.checkpoint(a, "stage1")
    except subprocess.CalledProcessError:  # no stage-1 run yet: one short one
        train_config(a, "prep-stage1", {"kind": "train", "stage": "stage1", "gpus": 1, "deepspeed": ""})
        return gpu_bench.checkpoint(a, "stage1")


def score_cpu_shards(argv: list[str]) -> None:
    """tools.model.score's --checkpoint form on N CPU processes (tools.model.shards with CPU devices)."""
    from tools.model.shards import score_jobs_on_gpus

    n, rest = int(argv[0]), argv[1:]
    ours, swift_argv = rest[:rest.index("--")], rest[rest.index("--") + 1:]
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint")
    ap.add_argument("--dataset")
    ap.add_argument("--output")
    ap.add_argument("--batch-size", type=int)
    o = ap.parse_args(ours)
    score_jobs_on_gpus([(Path(o.checkpoint), [(Path(o.dataset), Path(o.output))])], swift_argv, o.batch_size,
                       devices=[None] * n)


def csv_agreement(res: dict) -> dict | None:
    one, two = res.get("score-1gpu", {}), res.get("score-2gpu", {})
    if one.get("rc") != 0 or two.get("rc") != 0:
        return None
    from tools.probs import read_probs

    n1, p1 = read_probs(one["csv"])
    n2, p2 = read_probs(two["csv"])
    import numpy as np

    return {"same_rows_in_order": n1 == n2, "max_abs_diff": float(np.abs(p1 - p2).max()) if n1 == n2 else None,
            "argmax_agreement": float((p1.argmax(1) == p2.argmax(1)).mean()) if n1 == n2 else None}


# --------------------------------------------------------------------------- the table
def table(a, quiet: bool = False) -> str:
    res = {p.stem: json.loads(p.read_text()) for p in sorted(a.results.glob("*.json")) if ".rank" not in p.name}
    unit, units = ("process", "processes") if TINY else ("GPU", "GPUs")
    lines = [f"{'CPU smoke test: tiny models, float32, liger off' if TINY else 'device: ' + gpu_bench.device_name()}; "
             f"recipe real; {gpu_bench.IMAGE_SIZE[0]}x{gpu_bench.IMAGE_SIZE[1]} JPEGs, MAX_PIXELS "
             f"{gpu_bench.MAX_PIXELS}; {a.warmup} warm-up + {a.steps} timed optimizer steps per run", "",
             f"| training | {units} | DeepSpeed | batch x accum x {units} = global | s/step | samples/s | x 1 {unit} "
             f"| peak GiB reserved per {unit} (allocated max) |", "|---|---:|---|---|---:|---:|---:|---|"]
    for name, d in res.items():
        if d.get("kind") != "train" or name.startswith("prep"):
            continue
        label = name + (" (liger off)" if d.get("extra_env", {}).get("USE_LIGER_KERNEL_STAGE1") == "false" else "")
        if "samples_per_s" not in d:
            why = (d.get("error") or "").strip().splitlines()
            reason = next((w.strip() for w in why if "DEEPSPEED" in w or "error" in w.lower()), why[-1] if why else "")
            lines.append(f"| {label} | {d.get('gpus')} | {d.get('deepspeed') or '-'} | | | FAILED (rc {d.get('rc')}): "
                         f"{reason[:160]} | | |")
            continue
        base = res.get(f"{name.split('-')[0]}-1gpu", {}).get("samples_per_s")
        ratio = f"{d['samples_per_s'] / base:.2f}x" if base else ""
        peak = ", ".join(f"{p:.1f}" for p in d.get("peak_reserved_per_gpu", [])) or "–"
        alloc = f" ({d['peak_allocated_gib']:.1f})" if d.get("peak_allocated_gib") is not None else ""
        amp = d.get("amplifier", {})
        if amp.get("tensors"):
            label += f"; amplifier saved: {amp['tensors']} tensors, |β| max {amp['attn_bias_absmax']:.3f}"
        lines.append(f"| {label} | {d['gpus']} | {d.get('deepspeed') or '-'} | {d['batch_size']} x {d['grad_accum']} x "
                     f"{d['world_size']} = {d['global_batch']} | {d['s_per_step']:.2f} | {d['samples_per_s']:.2f} | "
                     f"{ratio} | {peak}{alloc} |")
    lines += ["", f"| scoring (stage 1's checkpoint) | {units} | images | images/s (loop) | x 1 {unit} "
              "| command wall s | images/s (wall) |", "|---|---:|---:|---:|---:|---:|---:|"]
    base = res.get("score-1gpu", {}).get("images_per_s")
    for name, d in res.items():
        if d.get("kind") != "score":
            continue
        if "images_per_s" not in d:
            lines.append(f"| {name} | {d.get('gpus')} | | FAILED (rc {d.get('rc')}) | | | |")
            continue
        ratio = f"{d['images_per_s'] / base:.2f}x" if base else ""
        lines.append(f"| {name} | {d['gpus']} | {d['images']} | {d['images_per_s']:.2f} | {ratio} | "
                     f"{d['wall_s']:.0f} | {d['images_per_s_wall']:.2f} |")
    agree = csv_agreement(res)
    if agree:
        lines += ["", f"1 vs 2 {units}, same images: rows in the same order {agree['same_rows_in_order']}, "
                  f"largest probability difference {agree['max_abs_diff']:.2e}, argmax agreement "
                  f"{agree['argmax_agreement']:.3f}"]
    text = "\n".join(lines)
    (a.results / "multi_gpu.md").write_text(text + "\n")
    (a.results / "multi_gpu.json").write_text(json.dumps(res, indent=1))
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        logs = sorted((a.work / "mg-logs").glob("*.log"))
        for p in [a.results / "multi_gpu.md", a.results / "multi_gpu.json", *logs]:
            shutil.copy(p, a.out / p.name)
    if not quiet:
        print(text, flush=True)
    return text


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "score-cpu-shards":
        score_cpu_shards([x for x in sys.argv[2:] if x != "--tiny"])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("BENCH_WORK", "/tmp/mg")))
    ap.add_argument("--out", type=Path, default=None, help="copy the table, JSON and logs here (e.g. $OUT)")
    ap.add_argument("--configs", default=DEFAULT, help=f"comma-separated, in order (default: {DEFAULT})")
    ap.add_argument("--no-setup", action="store_true", help="the models, data and pipeline exist already")
    ap.add_argument("--warmup", type=int, default=2, help="optimizer steps not timed (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps timed (default: %(default)s)")
    ap.add_argument("--n-train", type=int, default=160)
    ap.add_argument("--n-test", type=int, default=512, help="images scored (default: %(default)s)")
    ap.add_argument("--score-batch-size", type=int, default=8, help="recipes/real.env's SCORE_BATCH_SIZE")
    ap.add_argument("--stage1-size", choices=["7b", "3b"], default="7b",
                    help="stage 1's model (3b: a quicker check of the code paths, not the benchmark)")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per configuration (default: %(default)s)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny models, demo recipe, CPU processes")
    a = ap.parse_args()
    a.work = a.work.resolve()
    a.results = a.work / "mg-results"
    a.results.mkdir(parents=True, exist_ok=True)
    configs = [c for c in a.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown configurations {unknown}; known: {', '.join(CONFIGS)}")
    if not a.no_setup:
        setup(a)
    for name in configs:
        cfg = CONFIGS[name]
        result = train_config(a, name, cfg) if cfg["kind"] == "train" else score_config(a, name, cfg)
        (a.results / f"{name}.json").write_text(json.dumps(result, indent=1))
        table(a, quiet=True)  # after each configuration: a run cut short still brings back what it measured
    table(a)


if __name__ == "__main__":
    main()
