#!/usr/bin/env python3
"""Scoring levers (tools.model.speedups) one after another on one loaded model, against today's path: forward
passes only, on batches encoded once, so the table shows what each lever does to the GPU's work per image.

    python3 bench/score_levers.py --work /tmp/sl --out "$OUT"              # H200: full-size random 7B and 3B
    python3 bench/score_levers.py --work /tmp/slt --tiny --n 24            # CPU smoke test: tiny models

For each model size: the random full-size Qwen2.5-VL of bench/gpu_bench.py (bf16, real tokenizer), loaded as
test.sh loads a model (tools.model.infer.load: swift's template, our vision patches with their kernels compiled as
for a large test set), with a LoRA adapter r8 a32 on the language model's linear layers whose B matrices are drawn
N(0, --lora-b-std) (a 1-step checkpoint's B is ~0, which would make merging trivially exact); --n synthetic
1120x896 JPEGs (1,280 visual tokens each), encoded and collated once by the template. Then, in this order, each
lever timed over every batch after --warmup batches (CUDA synchronised), its probabilities compared with today's:

  today            the adapter applied at every layer, autocast, batch --batch-size (test.sh's path)
  today, batch 2x  the same at twice the batch: no lever, only another kernel choice: the rounding noise floor
  vision: ...      today with one of the vision tower's levers undone (FIRESAFE_LONG_ATTN=varlen,
                   FIRESAFE_COMPILE_DIMS=all), then both: the vision tower as it was before bench/README.md's run V
  merged           SCORE_MERGE=1
  merged+compile   SCORE_MERGE=1 SCORE_COMPILE_LLM=1
  fp8+compile      SCORE_FP8=1 SCORE_COMPILE_LLM=1 (Ada/Hopper only)
  fp8              SCORE_FP8=1

With --checkpoint and --rows, the same levers on a trained stage instead (e.g. the demo's, on a CPU in bf16): the
agreement of a model whose answers have real margins, where random weights have almost none.

--levers picks which of them run after today's (default: all). With the merged lever: --fill times test.sh's own
loop over rows whose last batch is half full, filled up to the full shape and then as it is (a compiled layer
compiles a graph per shape); --idle N profiles N batches of the merged, compiled model scored as test.sh's loop
scores them (each batch's probabilities copied back before the next one starts) and records the GPU's busy share over
them (bench/_gpu_idle.py): what CUDA graphs or anything else that only cuts the CPU's launch and wait time could win
at most.

Prints a table per size and both sizes' combined rate (1 / (1/r7 + 1/r3): stage 1 then stage 2 on every image);
writes score_levers.json and score_levers.md to --out.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import gpu_bench as G  # noqa: E402  (its --tiny switch is read from sys.argv at import)
from score_speed import compare  # noqa: E402

# swift_plugins/patches/vision_attention.py's levers of run V, and their settings before it
VISION_BEFORE = {"vision: full attention by varlen_attn": {"long_attn": "varlen", "compile_dims": "tokens"},
                 "vision: compiled with dynamic=True": {"long_attn": "cudnn", "compile_dims": "all"},
                 "vision as before run V (both)": {"long_attn": "varlen", "compile_dims": "all"}}
FLOOR = {"7b": 32.0, "3b": 56.0}  # images/s on one H200 at 1,280 visual tokens (README: ~24 and ~14 TFLOP/image)


def log(msg: str) -> None:
    print(f"[score_levers {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def rows_for(work: Path, n: int) -> list[dict]:
    from concurrent.futures import ProcessPoolExecutor

    from tools.task import sft_row

    folder = work / "images"
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder / f"s{i:05d}.jpg", 50_000 + i) for i in range(n)]
    todo = [j for j in jobs if not j[0].exists()]
    if todo:
        with ProcessPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
            list(pool.map(G._image, todo, chunksize=4))
    return [sft_row(path, None) for path, _ in jobs]


def add_lora(model, b_std: float):
    """A LoRA adapter as swift's all-linear on the language model (r8, alpha 32), B drawn N(0, b_std);
    returns (PEFT model, median |dW| / |W| over the layers)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tools.model.speedups import LLM_LINEAR

    targets = [name for name, m in model.named_modules() if LLM_LINEAR.search(name) and isinstance(m, torch.nn.Linear)]
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=targets))
    torch.manual_seed(1)
    ratios = []
    with torch.no_grad():
        for module in peft_model.modules():
            if hasattr(module, "lora_B") and "default" in getattr(module, "lora_B", {}):
                module.lora_B["default"].weight.normal_(0, b_std)
                if len(ratios) < 64:
                    a, b = module.lora_A["default"].weight.float(), module.lora_B["default"].weight.float()
                    delta = (b @ a) * module.scaling["default"]
                    ratios.append(float(delta.norm() / module.base_layer.weight.float().norm()))
    ratios.sort()
    return peft_model.eval(), ratios[len(ratios) // 2]


def encode(template, rows: list[dict], batch_size: int, pixel_dtype) -> list[dict]:
    from torch.utils.data import DataLoader

    from tools.model.infer import _Encoded

    workers = 0 if G.DEVICE == "cpu" else min(8, (os.cpu_count() or 2) - 2)
    loader = DataLoader(_Encoded(template, rows, pixel_dtype), batch_size=batch_size, collate_fn=template.data_collator,
                        num_workers=workers, pin_memory=G.DEVICE == "cuda")
    return [dict(b) for b in loader] if G.DEVICE == "cuda" else list(loader)


def timed(model, template, label_ids, batches: list[dict], warmup: int) -> tuple[float, "object", float]:
    """(images/s over all batches after the warm-up ones, [N, labels] probabilities, peak GiB allocated)."""
    import numpy as np
    import torch

    from tools.model.infer import forward_probs, inference_context

    template.model = model
    if G.DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out = []
    with inference_context(model):
        for b in batches[:warmup]:
            forward_probs(model, template, b, label_ids)
        G.sync()
        start = time.perf_counter()
        for b in batches:
            out.append(forward_probs(model, template, b, label_ids))
        G.sync()
        seconds = time.perf_counter() - start
    probs = torch.cat(out).float().cpu().numpy().astype(np.float64)
    return len(probs) / seconds, probs, G.peak("allocated")


def idle_of(model, template, label_ids, batches: list[dict], trace: Path) -> dict:
    """GPU busy and idle time while `batches` are scored one after another as tools.model.infer.score_rows does
    (each batch's probabilities brought back to the CPU before the next), from a torch.profiler trace."""
    from torch.profiler import ProfilerActivity, profile

    from _gpu_idle import idle_summary, load_trace
    from tools.model.infer import forward_probs, inference_context

    template.model = model
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if G.DEVICE == "cuda" else [])
    with inference_context(model):
        forward_probs(model, template, batches[0], label_ids).cpu()  # nothing left to compile in the window
        with profile(activities=activities) as prof:
            for b in batches:
                forward_probs(model, template, b, label_ids).cpu()
    prof.export_chrome_trace(str(trace))
    summary = idle_summary(load_trace(trace), top=5)
    if "window_ms" in summary:
        summary["gpu_busy_share"] = round(summary["gpu_busy_ms"] / max(summary["window_ms"], 1e-9), 4)
    return summary


def last_batch(model, template, label_ids, rows: list[dict], batch_size: int) -> dict:
    """Seconds of tools.model.infer.score_rows (test.sh's loop: encoding workers, bucketing) over rows whose last
    batch is smaller than batch_size: filled up to the full batches' shape first, then as it is, which compiles
    the decoder layers again for the smaller shape (the same rows' graphs exist already for the full shape)."""
    from tools.model.infer import score_rows

    rows = rows[:len(rows) - len(rows) % batch_size - batch_size // 2] or rows  # the last batch half full
    out = {"rows": len(rows)}
    # compiled whatever the count: these few rows stand for a large test set
    with mock.patch.dict(os.environ, {"SCORE_COMPILE_LLM": "1"}):
        for name, fill in (("filled_s", True), ("as_is_s", False)):
            G.sync()
            start = time.perf_counter()
            score_rows(model, template, label_ids, rows, batch_size, progress=False, fill=fill)
            G.sync()
            out[name] = round(time.perf_counter() - start, 2)
    return out


LEVERS = ("batch2x", "vision", "merged", "fp8")


def bench_size(a, size: str, rows: list[dict]) -> dict:
    """The levers on one model: the random full-size `size` with a drawn adapter, or (size "trained") the
    --checkpoint's own trained adapter in --dtype."""

    import torch

    from tools.model import fp8, speedups
    from tools.model.infer import choose_compile, load

    choose_compile(10_000)  # vision kernels compiled, as test.sh does for a large test set
    if size == "trained":
        model, template, label_ids, _ = load(["--adapters", str(a.checkpoint), "--torch_dtype", a.dtype], merge=False)
        ratio = None
    else:
        model, template, label_ids, _ = load(["--model", str(a.work / "models" / size), "--template", "qwen2_5_vl",
                                              "--torch_dtype", "float32" if G.TINY_MODE else "bfloat16",
                                              "--max_pixels", str(G.MAX_PIXELS)], merge=False)
    import swift_plugins.patches.vision_attention as va  # test.sh gets these through the checkpoint's plugins

    va.apply()
    if size != "trained":
        model, ratio = add_lora(model, a.lora_b_std)
        log(f"{size}: LoRA B ~ N(0, {a.lora_b_std}): median |dW|/|W| {ratio:.4f}")
    pixel_dtype = model.dtype if G.DEVICE == "cuda" else None
    start = time.time()
    batches = {bs: encode(template, rows, bs, pixel_dtype) for bs in (a.batch_size, 2 * a.batch_size)}
    log(f"{size}: {len(rows)} images encoded twice in {time.time() - start:.0f} s")
    results: dict = {"lora_dw_over_w": None if ratio is None else round(ratio, 4)}

    def run(name: str, m, bs: int) -> None:
        t0 = time.time()
        rate, probs, peak = timed(m, template, label_ids, batches[bs], a.warmup)
        r = {"images_per_s": round(rate, 2), "peak_gib": peak, "setup_and_run_s": round(time.time() - t0, 1)}
        if "today" in results:
            r.update(compare(results["today"]["probs"], probs))
        r["probs"] = probs
        results[name] = r
        log(f"{size} {name}: " + json.dumps({k: v for k, v in r.items() if k != "probs"}))

    levers = a.levers.split(",")
    run("today", model, a.batch_size)
    if "batch2x" in levers:
        run("today, batch 2x", model, 2 * a.batch_size)
    if "vision" in levers:
        today = {"long_attn": va.LONG_ATTN, "compile_dims": va.COMPILE_DIMS}  # as test.sh's environment chose them
        for name, knobs in VISION_BEFORE.items():  # each vision lever undone alone, then both
            va.apply(**knobs)
            torch._dynamo.reset()  # graphs compiled for the other choice of symbolic sizes
            run(name, model, a.batch_size)
        va.apply(**today)
        torch._dynamo.reset()
    if "merged" not in levers and "fp8" not in levers:
        return drop_probs(results)
    model = speedups.merge_lora(model)
    if "merged" in levers:
        run("merged", model, a.batch_size)
    speedups.compile_layers(model)
    if "merged" in levers:
        run("merged+compile", model, a.batch_size)
        if a.idle:
            idle = idle_of(model, template, label_ids, batches[a.batch_size][:a.idle],
                           a.out_dir / f"{size}_idle.trace.json")
            results["merged+compile"]["idle"] = idle
            log(f"{size} merged+compile, {a.idle} batches profiled: " + json.dumps(
                {k: v for k, v in idle.items() if k != "gaps"}))
        if a.fill:
            results["merged+compile"]["last_batch"] = last_batch(model, template, label_ids, rows, a.batch_size)
            log(f"{size} merged+compile, test.sh's loop: {json.dumps(results['merged+compile']['last_batch'])}")
    cpu_fp8 = G.DEVICE == "cpu"  # torch's CPU float8 matmul: slow, but the same rounding
    if "fp8" in levers and (cpu_fp8 or fp8.supported() is None):
        speedups.to_fp8(model, check_device=not cpu_fp8)
        run("fp8+compile", model, a.batch_size)
        for layer in speedups.decoder_layers(model):
            layer._compiled_call_impl = None
        run("fp8", model, a.batch_size)
    return drop_probs(results)


def drop_probs(results: dict) -> dict:
    for r in results.values():
        if isinstance(r, dict):
            r.pop("probs", None)
    return results


def table(results: dict, n: int) -> str:
    sizes = [s for s in ("7b", "3b", "trained") if s in results]
    lines = [f"| lever ({n} images, forward passes) | " + " | ".join(
        f"{s.upper()} img/s | of floor | argmax agree | max abs diff | peak GiB" for s in sizes) + " |"
             + (" both stages img/s |" if len(sizes) == 2 else ""),
             "|---|" + "---:|" * (5 * len(sizes)) + ("---:|" if len(sizes) == 2 else "")]
    names = [k for k in results[sizes[0]] if isinstance(results[sizes[0]][k], dict)]
    for name in names:
        cells = []
        rates = []
        for s in sizes:
            r = results[s].get(name, {})
            rate = r.get("images_per_s")
            rates.append(rate)
            cells += [f"{rate}", f"{rate / FLOOR[s]:.0%}" if rate and s in FLOOR else "", str(r.get("argmax_agreement", "–")),
                      str(r.get("max_abs_diff", "–")), str(r.get("peak_gib", ""))]
        both = (f" {1 / (1 / rates[0] + 1 / rates[1]):.2f} |" if len(sizes) == 2 and all(rates) else
                (" |" if len(sizes) == 2 else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |" + both)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/score_levers"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--sizes", default="7b,3b")
    ap.add_argument("--n", type=int, default=192, help="images (default 192)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2, help="batches run before timing (compiles happen there)")
    ap.add_argument("--lora-b-std", type=float, default=0.005)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny models, float32, 224x224 images")
    ap.add_argument("--levers", default=",".join(LEVERS),
                    help=f"which levers run after today's, comma-separated among {','.join(LEVERS)} (default: all)")
    ap.add_argument("--idle", type=int, default=0,
                    help="N > 0: profile N batches of merged+compile scored as test.sh does: the GPU's busy share")
    ap.add_argument("--fill", action="store_true",
                    help="time test.sh's loop (tools.model.infer.score_rows) with its smaller last batch filled up, "
                         "then as it is (merged+compile)")
    ap.add_argument("--checkpoint", type=Path, help="instead: a trained stage's checkpoint (e.g. the demo's) ...")
    ap.add_argument("--rows", type=Path, help="... the swift rows to score with it (e.g. outputs/data/test.jsonl) ...")
    ap.add_argument("--dtype", default="bfloat16", help="... loaded in this dtype (default bfloat16)")
    a = ap.parse_args()
    if unknown := set(a.levers.split(",")) - set(LEVERS):
        ap.error(f"--levers: unknown {', '.join(sorted(unknown))}; choose among {', '.join(LEVERS)}")
    if (a.idle or a.fill) and "merged" not in a.levers.split(","):
        ap.error("--idle and --fill measure the merged, compiled model: include merged in --levers")
    out = a.out or a.work / "report"
    out.mkdir(parents=True, exist_ok=True)
    a.out_dir = out
    if a.checkpoint:
        from tools.fileio import read_jsonl

        sizes, rows = ["trained"], read_jsonl(a.rows)[:a.n]
    else:
        tok = G.tokenizer_dir(a.work)
        sizes = a.sizes.split(",")
        for size in sizes:
            G.build_model(size, a.work / "models" / size, tok)
        rows = rows_for(a.work, a.n)
    results = {"device": G.device_name(), "n": a.n, "batch_size": a.batch_size}
    for size in sizes:
        results[size] = bench_size(a, size, rows)
        gc.collect()  # the model of this size is gone: free its memory for the next
        if G.DEVICE == "cuda":
            import torch

            torch.cuda.empty_cache()
        (out / "score_levers.json").write_text(json.dumps(results, indent=1))
    text = table(results, a.n)
    (out / "score_levers.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
