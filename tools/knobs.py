"""Every knob of the four scripts, checked before any work: its type, its range, and a message that names it.

    python -m tools.knobs VAL_RATIO=0.1 SEED=42 FOLDS=1 MAX_PIXELS=1003520 ...

The scripts pass their knobs as NAME=VALUE; each is checked against KNOBS (unknown names are a bug in the
script, and fail too). Plugin choices (tuners, losses, metrics) are not listed: a plugin file dropped into
swift_plugins/ adds names, and swift checks them when it starts. Exit 0 when all are fine; otherwise one line per problem and exit 1, in well under a
second, so a typo never costs an image check or a training start.
"""
from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# Qwen2.5-VL's image size bounds as swift applies them (qwen_vl_utils, IMAGE_MIN/MAX_TOKEN_NUM): a 28x28 patch
# per visual token, at least 4 tokens, at most 16,384.
MIN_PIXELS = 4 * 28 * 28
MAX_PIXELS = 16384 * 28 * 28


@dataclass(frozen=True)
class Knob:
    what: str  # the accepted values, as the message says them
    ok: Callable[[str], bool]


def _number(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False,
            high_open: bool = False) -> Callable[[str], bool]:
    def check(text: str) -> bool:
        if kind is int and not re.fullmatch(r"[+-]?\d+", text.strip()):  # int() takes "1_0"; bash (( )) does not
            return False
        try:
            value = kind(text)
        except ValueError:
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if low is not None and (value <= low if low_open else value < low):
            return False
        if high is not None and (value >= high if high_open else value > high):
            return False
        return True
    return check


def _words(allowed: set[str], empty_ok: bool = False) -> Callable[[str], bool]:
    def check(text: str) -> bool:
        words = text.split()
        return (empty_ok or bool(words)) and all(w in allowed for w in words) and len(set(words)) == len(words)
    return check


def _one_of(*allowed: str) -> Callable[[str], bool]:
    return lambda text: text in allowed


def _output_dir(text: str) -> bool:
    """A folder, or a path whose nearest existing parent is a writable folder (so it can be created)."""
    path = Path(text)
    if path.exists():
        return path.is_dir() and os.access(path, os.W_OK | os.X_OK)
    for parent in path.parents:
        if parent.exists():
            return parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)
    return False


def _model(text: str) -> bool:
    """A model folder (config.json inside), or a hub id ORG/NAME; a path that does not exist is neither."""
    path = Path(text).expanduser()
    if path.exists():
        return path.is_dir() and (path / "config.json").is_file()
    if text.startswith(("/", "./", "../", "~")):
        return False
    return re.fullmatch(r"[\w.-]+/[\w.-]+", text) is not None


BOOL = _one_of("true", "false")
KNOBS: dict[str, Knob] = {
    # paths
    "OUTPUT_DIR": Knob("a folder this user can write, or a new folder inside one", _output_dir),
    "DATA_DIR": Knob("a folder with the competition data (train.txt, train/, B.txt, B/), or empty for the demo",
                     lambda t: t == "" or Path(t).is_dir()),
    "MODEL_STAGE1": Knob("a model folder (with config.json) or a model id ORG/NAME", _model),
    "MODEL_STAGE2": Knob("a model folder (with config.json) or a model id ORG/NAME", _model),
    # data-pre.sh
    "VAL_RATIO": Knob("a number between 0 and 1, both excluded (the validation share of each label)",
                      _number(float, 0, 1, low_open=True, high_open=True)),
    "SEED": Knob("a whole number >= 0", _number(int, 0)),
    "FOLDS": Knob("a whole number >= 1 (1 = no folds)", _number(int, 1)),
    "SKIP_BAD_IMAGES": Knob("0 or 1", _one_of("0", "1")),
    "AUGMENT": Knob("0 or 1", _one_of("0", "1")),
    "AUGMENT_FILTER": Knob("auto, 0 or 1", _one_of("auto", "0", "1")),
    "AUGMENT_FILTER_RATIO": Knob("a number >= 0", _number(float, 0)),
    "DEMO_TRAIN": Knob("a whole number >= 20", _number(int, 20)),
    "DEMO_TEST": Knob("a whole number >= 5", _number(int, 5)),
    "DEMO_SEED": Knob("a whole number >= 0", _number(int, 0)),
    "DEMO_QUICK": Knob("0 or 1", _one_of("0", "1")),
    "STAGE1_MIN_SHARE": Knob("empty, or a number from 0 to below 1", lambda t: t == "" or _number(float, 0, 1, high_open=True)(t)),
    "STAGE2_HIGH_REPEAT": Knob("empty, or a whole number >= 1", lambda t: t == "" or _number(int, 1)(t)),
    "STAGE2_OTHER_RATIO": Knob("empty, or a number >= 0", lambda t: t == "" or _number(float, 0)(t)),
    # recipes (train.sh, test.sh, data-pre.sh)
    "MAX_PIXELS": Knob(f"a whole number from {MIN_PIXELS} (4 visual tokens of 28x28) to {MAX_PIXELS} (16,384 tokens); "
                       "1003520 = 1,280 tokens", _number(int, MIN_PIXELS, MAX_PIXELS)),
    "TORCH_DTYPE": Knob("bfloat16, float16 or float32", _one_of("bfloat16", "float16", "float32")),
    "LORA_RANK": Knob("a whole number >= 1", _number(int, 1)),
    "LORA_ALPHA": Knob("a number > 0", _number(float, 0, low_open=True)),
    "LORA_DROPOUT": Knob("a number from 0 to below 1", _number(float, 0, 1, high_open=True)),
    "LEARNING_RATE": Knob("a number > 0", _number(float, 0, low_open=True)),
    "EPOCHS_STAGE1": Knob("a number > 0 (swift accepts fractions of an epoch)", _number(float, 0, low_open=True)),
    "EPOCHS_STAGE2": Knob("a number > 0 (swift accepts fractions of an epoch)", _number(float, 0, low_open=True)),
    "BATCH_SIZE": Knob("a whole number >= 1", _number(int, 1)),
    "GRAD_ACCUM": Knob("a whole number >= 1", _number(int, 1)),
    "BATCH_SIZE_STAGE1": Knob("a whole number >= 1 (rows a forward pass; empty = BATCH_SIZE)", _number(int, 1)),
    "BATCH_SIZE_STAGE2": Knob("a whole number >= 1 (rows a forward pass; empty = BATCH_SIZE)", _number(int, 1)),
    "WARMUP_RATIO": Knob("a number from 0 to 1", _number(float, 0, 1)),
    "EVAL_STEPS": Knob("auto (every EVAL_EVERY epochs) or a whole number >= 1",
                       lambda t: t == "auto" or _number(int, 1)(t)),
    "EVAL_EVERY": Knob("a number of epochs > 0 (0.5 = twice an epoch)", _number(float, 0, low_open=True)),
    "DATALOADER_WORKERS": Knob("a whole number >= 0", _number(int, 0)),
    "SCORE_BATCH_SIZE": Knob("a whole number >= 1", _number(int, 1)),
    "GRADIENT_CHECKPOINTING": Knob("true or false", BOOL),
    "CKPT_SKIP_LAYERS_STAGE1": Knob("a whole number >= 0 (LLM layers kept without recompute)", _number(int, 0)),
    "CKPT_SKIP_LAYERS_STAGE2": Knob("a whole number >= 0 (LLM layers kept without recompute)", _number(int, 0)),
    "FP8_BASE_STAGE1": Knob("0 or 1 (frozen language-model weights in float8 for training)", _one_of("0", "1")),
    "FP8_BASE_STAGE2": Knob("0 or 1 (frozen language-model weights in float8 for training)", _one_of("0", "1")),
    "VIT_GRADIENT_CHECKPOINTING": Knob("true or false", BOOL),
    "USE_LIGER_KERNEL_STAGE1": Knob("true or false", BOOL),
    "USE_LIGER_KERNEL_STAGE2": Knob("true or false", BOOL),
    # train.sh
    "STAGES": Knob("stage1, stage2 or both, separated by spaces", _words({"stage1", "stage2"})),
    "RUNS": Knob("folds, final or both, separated by spaces", _words({"folds", "final"})),
    "RESUME": Knob("0 or 1", _one_of("0", "1")),
    "STAGE1_TASK": Knob("causal_lm (the answer's first token) or seq_cls (a classification head)",
                        _one_of("causal_lm", "seq_cls")),
    "STAGE2_TASK": Knob("causal_lm (the answer's first token) or seq_cls (a classification head)",
                        _one_of("causal_lm", "seq_cls")),
    "HARD_NEGATIVES": Knob("0 (off), or a number > 0 (extra stage-2 rows, as a multiple of the 高风险 images)",
                           lambda t: t == "0" or _number(float, 0, low_open=True)(t)),
    "STAGE2_TARGET": Knob("five (the five labels) or binary (高风险 vs 非高风险)", _one_of("five", "binary")),
    "PRIOR_CORRECTION": Knob("0 or 1", _one_of("0", "1")),
    "FIRESAFE_AMP_LR": Knob("empty (1e-2), or a number > 0", lambda t: t == "" or _number(float, 0, low_open=True)(t)),
    "FIRESAFE_AMP_ATTN": Knob("fused (β as one more head dimension, fused SDPA kernels) or mask",
                              _one_of("fused", "mask")),
    "ALLOW_STALE": Knob("0 or 1", _one_of("0", "1")),
    "DECISIONS": Knob("f1 (offsets maximising the expected weighted F1) or argmax", _one_of("f1", "argmax")),
    "SCORE_MERGE": Knob("auto (merge a half-precision model on CUDA), 0 or 1", _one_of("auto", "0", "1")),
    "SCORE_COMPILE_LLM": Knob("auto (CUDA, SCORE_COMPILE; sizes of >= 800 images), 0 or 1 (every size)", _one_of("auto", "0", "1")),
    "SCORE_TTA": Knob("0 (each image as it is) or flip (also its mirror image, averaged)", _one_of("0", "flip")),
    "SCORE_FP8": Knob("0 or 1 (float8 language-model layers; Ada/Hopper GPUs)", _one_of("0", "1")),
    "SCORE_PREFETCH": Knob("1 (read the weight files ahead of loading them) or 0", _one_of("0", "1")),
    # several GPUs and nodes (train.sh: swift's CLI hands these to torchrun; test.sh: SCORE_GPUS)
    "NPROC_PER_NODE": Knob("empty (one process), or a whole number >= 1 (training processes on this node, one per GPU)",
                           lambda t: t == "" or _number(int, 1)(t)),
    "NNODES": Knob("empty (one node), or a whole number >= 1", lambda t: t == "" or _number(int, 1)(t)),
    "NODE_RANK": Knob("empty (0), or a whole number >= 0 below NNODES", lambda t: t == "" or _number(int, 0)(t)),
    "MASTER_ADDR": Knob("empty, or the host name or IP address of node 0",
                        lambda t: t == "" or re.fullmatch(r"[\w.:\[\]-]+", t) is not None),
    "MASTER_PORT": Knob("empty, or a port number from 1 to 65535", lambda t: t == "" or _number(int, 1, 65535)(t)),
    "DEEPSPEED": Knob("empty (no DeepSpeed), zero2 or zero3", _one_of("", "zero2", "zero3")),
    "SCORE_GPUS": Knob("all (one scoring process per visible GPU), or a whole number >= 1 (at most that many GPUs)",
                       lambda t: t == "all" or _number(int, 1)(t)),
}


def switch(env: str, meaning: str, default: bool = False) -> bool:
    """A 0/1 knob read from the environment inside a process (the patches' knobs, SCORE_PREFETCH): unset or empty is
    the default; anything else is an error naming it."""
    text = (os.environ.get(env) or ("1" if default else "0")).strip()
    if text not in ("0", "1"):
        raise ValueError(f"{env}={text!r}: expected 0 or 1 ({meaning})")
    return text == "1"


def problems(assignments: dict[str, str]) -> list[str]:
    """One message per knob whose value is not accepted (an unknown knob name is a problem too)."""
    out = []
    for name, value in assignments.items():
        knob = KNOBS.get(name)
        if knob is None:
            out.append(f"{name}: not a knob of this project (known: {', '.join(sorted(KNOBS))})")
        elif not knob.ok(value.strip() if name not in ("STAGES", "RUNS") else value):
            out.append(f"{name}={value!r}: expected {knob.what}")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    assignments = {}
    for item in argv:
        name, sep, value = item.partition("=")
        if not sep:
            print(f"error: expected NAME=VALUE, got {item!r}", file=sys.stderr)
            return 2
        assignments[name] = value
    found = problems(assignments)
    for line in found:
        print(f"error: {line}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
