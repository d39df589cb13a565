"""Before training: can both stages' settings run on this machine? Fails in seconds, with the reason, instead of
at stage 2's first step hours after stage 1 started.

    python -m tools.model.preflight --output-dir outputs --stages "stage1 stage2" --runs "final"

Reads the recipe's knobs from the environment, as train.sh exports them (TORCH_DTYPE, ATTN_IMPL,
USE_LIGER_KERNEL_STAGE1/2, STAGE1_TUNER/STAGE2_TUNER, MODEL_STAGE1/2, DEEPSPEED, NPROC_PER_NODE, NNODES, RESUME,
STAGE1_LOSS/STAGE2_LOSS, HARD_NEGATIVES) and checks, for every stage
train.sh is about to train: swift's stack is installed and the optional packages they turn on import; the dtype is
supported by the device (bf16 needs an Ampere or newer GPU; on a CPU only float32); the attention implementation
suits the tuner (the High-Risk Feature Amplifier adds a bias to the attention logits: sdpa or eager, not
flash-attn); the base model is a model folder
(or a hub id); each run's training set is not empty and holds the classes the stage must learn (stage 2 needs
高风险 rows, and some other label); the validation set is not empty. With several processes or DeepSpeed
(tools.model.distributed): no more processes per node than GPUs, DeepSpeed only on CUDA, no liger fused loss under
ZeRO-3, a row for every process, and with RESUME=1 a checkpoint saved with the same DeepSpeed setting (and, under
DeepSpeed, the same number of processes). With HARD_NEGATIVES > 0, stage 2's runs need their stage 1 (trained now,
or before) on one node. FP8_BASE_STAGE1/2=1 needs a GPU with float8 matmuls (or a CPU). Liger's kernels and
compiled layers (FIRESAFE_COMPILE_LAYERS=1) build native code on their first step: a C compiler (C++ for compiled
layers on a CPU) and Python's C headers must be there.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import sys
import sysconfig
from collections import Counter
from pathlib import Path

from tools import cli
from tools.fileio import DataError, read_jsonl
from tools.model import distributed
from tools.model.checkpoint import read_pointer
from tools.state import check_data, runs_of
from tools.task import HIGH_RISK, Layout

FLASH = ("flash_attn", "flash_attention_2", "flash_attention_3")


STACK = ("swift", "peft", "transformers", "qwen_vl_utils", "torchvision")  # what init.sh installs together


def _importable(module: str) -> str | None:
    """Why `module` does not import, or None. Imports it: for optional packages with native code (flash-attn,
    liger's triton, deepspeed), whose usual failure is an import error of a package that is installed."""
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure is the answer
        return f"{type(e).__name__}: {e}"
    return None


def _installed(module: str) -> str | None:
    """Why `module` is not installed, or None, without importing it. For the STACK: importing peft, transformers,
    torchvision and qwen_vl_utils takes ~10 s on a 2-core machine, and swift imports them again seconds later, where
    a broken install still stops before the model loads."""
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return None if found else f"ModuleNotFoundError: No module named {module!r}"


def device_problems(dtype: str) -> list[str]:
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            return [f"TORCH_DTYPE=bfloat16 needs an Ampere or newer GPU; {name} has no bf16: use TORCH_DTYPE=float16"]
        return []
    if dtype != "float32":
        return [f"TORCH_DTYPE={dtype} on a machine without a CUDA GPU: swift trains in {dtype} on CPU only with "
                "--use_cpu, and very slowly; use TORCH_DTYPE=float32 (recipes/demo.env), or run on a GPU"]
    return []


def stage_problems(stage: str, env: dict[str, str]) -> list[str]:
    n = stage[-1]
    out = []
    tuner, attn = env.get(f"STAGE{n}_TUNER", "lora"), env.get("ATTN_IMPL", "sdpa")
    if env.get(f"USE_LIGER_KERNEL_STAGE{n}", "false") == "true":
        why = _importable("liger_kernel")
        if why:
            out.append(f"USE_LIGER_KERNEL_STAGE{n}=true but liger-kernel does not import ({why}): run init.sh, "
                       f"or set USE_LIGER_KERNEL_STAGE{n}=false")
        else:
            import torch

            if not torch.cuda.is_available():
                out.append(f"USE_LIGER_KERNEL_STAGE{n}=true needs a CUDA GPU (liger's kernels are triton): set it to false")
    if attn in FLASH:
        why = _importable("flash_attn")
        if why:
            out.append(f"ATTN_IMPL={attn} but flash-attn does not import ({why}): install it, or use ATTN_IMPL=sdpa")
        if tuner == "hr_amplifier":
            out.append(f"STAGE{n}_TUNER=hr_amplifier adds a bias to the attention logits and needs ATTN_IMPL=sdpa or "
                       f"eager, not {attn}")
    if env.get(f"FP8_BASE_STAGE{n}", "0") == "1":
        import torch

        from tools.model import fp8

        if torch.cuda.is_available() and (why := fp8.supported()):
            out.append(f"FP8_BASE_STAGE{n}=1 needs float8 matmuls: {why}; set FP8_BASE_STAGE{n}=0")
    model = env.get(f"MODEL_STAGE{n}", "")
    path = Path(model).expanduser()
    if not model:
        out.append(f"MODEL_STAGE{n} is empty: run data-pre.sh (it records the models) or set it")
    elif path.exists() and not (path / "config.json").is_file():
        out.append(f"MODEL_STAGE{n}={model}: not a model folder (no config.json)")
    return out


def build_problems(stages: list[str], env: dict[str, str]) -> list[str]:
    """Triton (liger's kernels; compiled layers on CUDA) compiles a C launcher per kernel, inductor on a CPU compiles
    C++, both against Python.h, at the first training step. Without a compiler liger fails there and compiled layers
    quietly run eagerly (slower), so both are asked for here. Same lookup as triton's (CC, else gcc, else clang)."""
    import torch

    cuda = torch.cuda.is_available()
    users = [f"USE_LIGER_KERNEL_STAGE{s[-1]}=true" for s in stages
             if cuda and env.get(f"USE_LIGER_KERNEL_STAGE{s[-1]}", "false") == "true"]
    if env.get("FIRESAFE_COMPILE_LAYERS", "0") == "1":
        users.append("FIRESAFE_COMPILE_LAYERS=1")
    if not users:
        return []
    cxx = not cuda  # inductor's CPU code is C++
    var, names = ("CXX", ("g++", "clang++")) if cxx else ("CC", ("gcc", "clang"))
    knobs = " and ".join(users)
    out = []
    if not (env.get(var) or any(shutil.which(name) for name in names)):
        out.append(f"{knobs}: no {'C++' if cxx else 'C'} compiler ({var} unset, no {' or '.join(names)} on PATH) to "
                   f"build the kernels at the first step: install {names[0]} (e.g. apt install build-essential), "
                   f"or turn {knobs} off")
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not header.is_file():
        out.append(f"{knobs}: Python's C headers are missing ({header}): install them (e.g. apt install "
                   f"python{sys.version_info.major}.{sys.version_info.minor}-dev), or turn {knobs} off")
    return out


def set_problems(layout: Layout, stage: str, run) -> list[str]:
    where = f"{stage}'s training set" + ("" if str(run) == "final" else f" for fold {run}")
    path = layout.train_jsonl(stage, run)
    if not path.exists():
        return [f"{path}: not found: run data-pre.sh"]
    answers = Counter(row["messages"][-1]["content"] for row in read_jsonl(path) if row["messages"][-1]["role"] == "assistant")
    if not answers:
        return [f"{where} ({path}) is empty"]
    out = []
    if stage == "stage2" and not answers[HIGH_RISK]:
        out.append(f"{where} ({path}) has no {HIGH_RISK} row: the specialist has nothing to learn (the training split "
                   f"holds no {HIGH_RISK} image); add some, or train stage 1 alone (STAGES=stage1) and submit with "
                   "FUSION_PARAMS set to an identity fusion")
    if len(answers) < 2:
        out.append(f"{where} ({path}) holds one answer only ({', '.join(answers)}): nothing to tell apart")
    return out


def problems(layout: Layout, stages: list[str], runs: list[str], env: dict[str, str]) -> list[str]:
    manifest = check_data(layout)
    out = device_problems(env.get("TORCH_DTYPE", "float32"))
    for module in STACK:
        why = _installed(module)
        if why:
            out.append(f"{module} is not installed ({why}): run init.sh")
    deepspeed = env.get("DEEPSPEED", "")
    if deepspeed:  # one setting for every stage: said once
        why = _importable("deepspeed")
        if why:
            out.append(f"DEEPSPEED={deepspeed} but deepspeed does not import ({why}): pip install -e '.[deepspeed]'")
    out += distributed.setup_problems(env, stages)  # several GPUs, DeepSpeed (issue 16)
    out += build_problems(stages, env)
    for stage in stages:
        out += stage_problems(stage, env)
        for run in runs_of(manifest, runs):
            out += set_problems(layout, stage, run)
            out += distributed.run_problems(layout, stage, run, env)
        if not read_jsonl(layout.val_jsonl(stage)):
            out.append(f"{layout.val_jsonl(stage)} is empty: swift needs a validation split (VAL_RATIO > 0)")
    out += hard_negative_problems(layout, manifest, stages, runs, env)
    return out


def hard_negative_problems(layout: Layout, manifest: dict, stages: list[str], runs: list[str],
                           env: dict[str, str]) -> list[str]:
    """HARD_NEGATIVES > 0 mines stage 2's extra rows with the same run's stage 1 (tools.model.hard_negatives): that
    model must exist or be trained first, on this node."""
    if "stage2" not in stages or env.get("HARD_NEGATIVES", "0") == "0":
        return []
    if int(env.get("NNODES") or 1) > 1:
        return ["HARD_NEGATIVES needs one node (stage 1's checkpoint, which mines them, stays on node 0): set "
                "HARD_NEGATIVES=0 for a multi-node run"]
    if "stage1" in stages:
        return []
    out = []
    for run in runs_of(manifest, runs):
        try:
            read_pointer(layout.run_dir("stage1", run))
        except FileNotFoundError:
            where = "stage 1" if str(run) == "final" else f"fold {run}'s stage 1"
            out.append(f"HARD_NEGATIVES={env['HARD_NEGATIVES']}: stage 2's hard negatives are mined with {where}, which "
                       f"has no model ({layout.run_dir('stage1', run)}): train it too (STAGES=\"stage1 stage2\"), "
                       "or set HARD_NEGATIVES=0")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser("tools.model.preflight", __doc__)
    ap.add_argument("--output-dir", default="outputs", help="pipeline output folder (default: %(default)s)")
    ap.add_argument("--stages", default="stage1 stage2", help="the stages train.sh will train (STAGES)")
    ap.add_argument("--runs", default="folds final", help="the runs train.sh will train (RUNS)")
    args = ap.parse_args(argv)

    def step() -> None:
        found = problems(Layout(args.output_dir), args.stages.split(), args.runs.split(), dict(os.environ))
        if found:
            raise DataError("this machine cannot train with these settings:\n" + "\n".join(f"  {p}" for p in found))
        print(f"preflight: {args.stages} can train here")

    return cli.run(step)


if __name__ == "__main__":
    sys.exit(main())
