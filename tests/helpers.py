"""Helpers shared by the test modules (no tests here): images and samples made on the fly, the official data
layout, the pipeline's data steps run in-process, and the fake `swift` / fake scorer the script tests put on PATH.

Heavy imports (torch, swift) happen inside the functions that need them, so importing this module is cheap.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tools.data.lists import Sample
from tools.fileio import read_jsonl
from tools.task import LABELS, STAGES, Layout

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- images and samples
def write_image(path: Path, colour=(120, 130, 140), size=(32, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="JPEG")
    return path


# Images per label of fake_samples: every label, 无风险 the majority, 非楼道 (3) the rarest.
SHARES = {"高风险": 6, "中风险": 20, "低风险": 14, "无风险": 50, "非楼道": 3}


def fake_samples(counts: dict[str, int] = SHARES) -> list[Sample]:
    """Labelled samples whose images do not exist (for the pure functions: split, folds, composition, plan)."""
    return [Sample(f"{label}{i}.jpg", Path(f"/x/{label}{i}.jpg"), label, f"t:{label}{i}")
            for label, n in counts.items() for i in range(n)]


def copies_of(samples: list[Sample], label: str, n: int, new_label: str | None = None) -> list[Sample]:
    """n augmented copies (distinct names) of the label's originals, as tools.augment.run makes them."""
    src = [s for s in samples if s.label == label]
    return [Sample(f"{Path(src[i % len(src)].name).stem}_aug{i}.jpg", Path(f"/aug/{label}{i}.jpg"),
                   new_label or label, f"augment:{i}") for i in range(n)]


def corridor(i: int, label: str = "无风险") -> np.ndarray:
    """A demo scene (tools.demo.data.risk_scene) as an RGB array, seeded by i."""
    from tools.demo.data import risk_scene

    return np.asarray(risk_scene(np.random.default_rng(i), label).image)


def write_samples(folder: Path, labels: list[str], start: int = 0) -> list[Sample]:
    """Demo scenes of the given labels written as JPEGs img00.jpg, img01.jpg, ...; returns their samples."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, label in enumerate(labels, start):
        path = folder / f"img{i:02d}.jpg"
        Image.fromarray(corridor(i, label)).save(path, quality=92)
        out.append(Sample(path.name, path.resolve(), label, f"train.txt:{i + 1}"))
    return out


# --------------------------------------------------------------------------- data in the official layout
def make_official(root: Path, n_per_label: int = 4) -> Path:
    """train.txt + train/ (n_per_label images of each label) and an unlabelled B.txt + B/ (one per label)."""
    lines, test_lines = [], []
    for li, label in enumerate(LABELS):
        for i in range(n_per_label):
            name = f"{li}_{i}.jpg"
            write_image(root / "train" / name, colour=(50 * li, 10 * i, 90))
            lines.append(f"{name}\t{label}")
        test_name = f"t{li}.jpg"
        write_image(root / "B" / test_name, colour=(20, 50 * li, 90))
        test_lines.append(test_name)
    (root / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "B.txt").write_text("\n".join(test_lines) + "\n", encoding="utf-8")
    return root


def prepare(data: Path, out: Path, *extra: str) -> dict:
    """tools.data.prepare (validate, prepare the images, split) in-process; returns split.json's record."""
    from tools.data import prepare as P

    return P.prepare(P.build_parser().parse_args(["--data-dir", str(data), "--output-dir", str(out), "--workers", "1",
                                                  *extra]))


def compose(out: Path, *extra: str) -> dict:
    """tools.compose.stage_sets in-process with the demo recipe and models /m1, /m2; returns the manifest."""
    from tools.compose import stage_sets as C

    return C.compose(C.build_parser().parse_args(["--output-dir", str(out), "--recipe", "demo", "--model-stage1", "/m1",
                                                  "--model-stage2", "/m2", *extra]))


def prepare_and_compose(data: Path, out: Path, *prepare_extra: str, compose_extra: tuple[str, ...] = ()) -> dict:
    """data-pre.sh without augmentation (AUGMENT=0), in-process; returns the manifest."""
    prepare(data, out, *prepare_extra)
    return compose(out, *compose_extra)


def names_in(path: Path) -> list[str]:
    """Image file names of a swift JSONL, in row order."""
    return [Path(r["images"][0]).name for r in read_jsonl(path)]


def images_of(path: Path) -> list[str]:
    """Image paths of a swift JSONL, in row order."""
    return [r["images"][0] for r in read_jsonl(path)]


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def list_pairs(path: Path) -> list[tuple[str, str]]:
    """(image, label) of an <image>\\t<label> list."""
    return [tuple(line.split("\t")) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def relabel_first_line(data: Path) -> None:
    """Give data/train.txt's first image the next label (what a corrected annotation does)."""
    train = data / "train.txt"
    lines = train.read_text(encoding="utf-8").splitlines()
    name, label = lines[0].split("\t")
    train.write_text("\n".join([f"{name}\t{LABELS[(LABELS.index(label) + 1) % len(LABELS)]}", *lines[1:]]) + "\n",
                     encoding="utf-8")


def random_probs(n: int, seed) -> np.ndarray:
    p = np.random.default_rng(seed).random((n, len(LABELS))) + 0.01
    return p / p.sum(1, keepdims=True)


# --------------------------------------------------------------------------- the scripts, with fakes on PATH
FAKE_SWIFT = """#!/usr/bin/env bash
# Records each call's arguments (one a line, then a blank line) and makes the checkpoint train.sh looks for,
# checkpoint-$FAKE_SWIFT_STEP (default 1) in --output_dir. For calls whose --output_dir contains $FAKE_SWIFT_FOR
# (default: every call): FAKE_SWIFT_SAVE=0 saves nothing, FAKE_SWIFT_RC=N exits N after saving (or not);
# while the file $FAKE_SWIFT_WAIT exists, the call waits (another script can then try the output folder).
printf '%s\\n' "$@" >> "$SWIFT_CALLS"; echo >> "$SWIFT_CALLS"
env | grep -E '^(FIRESAFE_|MAX_PIXELS=)' | sort >> "$SWIFT_CALLS.env"
while [[ -n "${FAKE_SWIFT_WAIT:-}" && -e "$FAKE_SWIFT_WAIT" ]]; do sleep 0.1; done
out=""
while [[ $# -gt 0 ]]; do [[ $1 == --output_dir ]] && out=$2; shift; done
if [[ "$out" != *"${FAKE_SWIFT_FOR:-}"* ]]; then mkdir -p "$out/checkpoint-${FAKE_SWIFT_STEP:-1}"; exit 0; fi
[[ "${FAKE_SWIFT_SAVE:-1}" == 1 ]] && mkdir -p "$out/checkpoint-${FAKE_SWIFT_STEP:-1}"
exit "${FAKE_SWIFT_RC:-0}"
"""
# `python -m tools.model.score` runs FAKE_SCORE instead (no model), `python -m tools.model.preflight` runs the real
# preflight on the device FAKE_GPU says (FAKE_PREFLIGHT), `python -m tools.model.hard_negatives` the real tool with a
# scorer of random probabilities (FAKE_HARD); every other python call is the real one.
FAKE_PYTHON = """#!/usr/bin/env bash
if [[ "${1-} ${2-}" == "-m tools.model.score" ]]; then shift 2; exec "$REAL_PYTHON" "$FAKE_SCORE" "$@"; fi
if [[ "${1-} ${2-}" == "-m tools.model.hard_negatives" ]]; then shift 2; exec "$REAL_PYTHON" "$FAKE_HARD" "$@"; fi
if [[ "${1-} ${2-}" == "-m tools.model.preflight" ]]; then shift 2; exec "$REAL_PYTHON" "$FAKE_PREFLIGHT" "$@"; fi
exec "$REAL_PYTHON" "$@"
"""
# tools.model.preflight as train.sh runs it, on a pretended device: FAKE_GPU=1 a CUDA GPU with bf16 (the real
# recipe's settings then pass on a machine without one), 0 no GPU, unset the machine's own.
FAKE_PREFLIGHT = """import os, runpy, sys
sys.path.insert(0, os.getcwd())  # the scripts run from their repository: its tools/, not the installed one
import torch
if os.environ.get("FAKE_GPU") == "1":
    torch.cuda.is_available = lambda: True
    torch.cuda.is_bf16_supported = lambda *a, **k: True
    torch.cuda.get_device_name = lambda *a, **k: "a pretended GPU (tests/helpers.py FAKE_GPU=1)"
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)  # a Hopper: float8 matmuls (FP8_BASE_STAGE1/2)
elif os.environ.get("FAKE_GPU") == "0":
    torch.cuda.is_available = lambda: False
sys.argv = ["tools.model.preflight", *sys.argv[1:]]
runpy.run_module("tools.model.preflight", run_name="__main__", alter_sys=True)
"""
# tools.model.hard_negatives as train.sh runs it, its scorer writing seeded random probabilities (no model); each call's
# arguments and checkpoint are recorded in $SCORE_CALLS.hard.
FAKE_HARD = """import json, os, sys
sys.path.insert(0, os.getcwd())
from pathlib import Path
import numpy as np
from tools.fileio import read_jsonl
from tools.model import hard_negatives
from tools.probs import write_probs
def scorer(checkpoint, dataset, output):
    with open(os.environ["SCORE_CALLS"] + ".hard", "a", encoding="utf-8") as f:
        f.write(json.dumps({"argv": sys.argv[1:], "checkpoint": str(checkpoint), "dataset": str(dataset)}) + "\\n")
    names = [Path(r["images"][0]).name for r in read_jsonl(dataset)]
    p = np.random.default_rng(len(names)).random((len(names), 5)) + 0.01
    write_probs(output, names, p / p.sum(1, keepdims=True))
hard_negatives.default_scorer = lambda argv, batch_size: scorer
sys.exit(hard_negatives.main(sys.argv[1:]))
"""
# The fake scorer takes tools.model.score's --output-dir form, asks tools.model.score.jobs_for what to score (the
# checkpoints train.sh recorded), writes random probabilities where Layout puts them, and records its call.
FAKE_SCORE = """import json, os, sys
sys.path.insert(0, os.getcwd())  # the scripts run from their repository: its tools/, not the installed one
from pathlib import Path
import numpy as np
from tools.fileio import read_json, read_jsonl
from tools.model.score import jobs_for
from tools.probs import write_probs
from tools.task import Layout
argv = sys.argv[1:]
ours = argv[:argv.index("--")] if "--" in argv else argv
layout = Layout(ours[ours.index("--output-dir") + 1])
runs = ours[ours.index("--runs") + 1:]
runs = runs[:next((i for i, a in enumerate(runs) if a.startswith("--")), len(runs))]
try:
    jobs = jobs_for(layout, runs, int(read_json(layout.manifest).get("folds", 1)))
except FileNotFoundError as e:  # as tools.model.score's main reports it
    sys.exit(f"error: {e}")
with open(os.environ["SCORE_CALLS"], "a", encoding="utf-8") as f:
    f.write(json.dumps({"argv": argv, "jobs": [[str(c), [[str(d), str(o)] for d, o in parts]] for c, parts in jobs]})
            + "\\n")
for _, parts in jobs:
    for dataset, output in parts:
        names = [Path(r["images"][0]).name for r in read_jsonl(dataset)]
        p = np.random.default_rng(len(names)).random((len(names), 5)) + 0.01
        write_probs(output, names, p / p.sum(1, keepdims=True))
"""


def _recipe_knobs() -> set[str]:
    names = set()
    for recipe in (ROOT / "recipes").glob("*.env"):
        names |= set(re.findall(r"\$\{(\w+):=", recipe.read_text(encoding="utf-8")))
    return names


# Variables the scripts read: a value in the environment that runs the tests must not leak into them.
SCRIPT_KNOBS = _recipe_knobs() | {"OUTPUT_DIR", "DATA_DIR", "RECIPE", "MODEL_STAGE1", "MODEL_STAGE2", "FOLDS", "RUNS",
                                  "STAGES", "SEED", "VAL_RATIO", "TEST_LIST", "TEST_LABELLED", "FUSION_PARAMS",
                                  "EVAL_METRIC", "CUTOUTS_DIR", "PYTHONPATH", "RESUME", "ALLOW_STALE", "HARD_NEGATIVES"}


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k not in SCRIPT_KNOBS and not k.startswith(("FIRESAFE_", "STAGE", "AUGMENT", "DEMO_", "SCORE_"))}


def install_fakes(tmp_path: Path) -> Path:
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    for name, text in (("swift", FAKE_SWIFT), ("python", FAKE_PYTHON)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    (tmp_path / "fake_score.py").write_text(FAKE_SCORE)
    (tmp_path / "fake_preflight.py").write_text(FAKE_PREFLIGHT)
    (tmp_path / "fake_hard.py").write_text(FAKE_HARD)
    return fake


def script_env(tmp_path: Path, out: Path | None, **env: str) -> dict[str, str]:
    """The environment run_script gives a script: the fakes first on PATH, OUTPUT_DIR=out (unset when out is None),
    train.sh's preflight on a pretended GPU (FAKE_GPU=1: the fake swift trains in any dtype) unless env says."""
    fake = install_fakes(tmp_path)
    full_env = {**clean_env(), "FAKE_GPU": "1"}
    full_env.update(PATH=f"{fake}:{Path(sys.executable).parent}:{os.environ['PATH']}", VENV=str(tmp_path / "novenv"),
                    REAL_PYTHON=sys.executable, FAKE_SCORE=str(tmp_path / "fake_score.py"),
                    FAKE_PREFLIGHT=str(tmp_path / "fake_preflight.py"), FAKE_HARD=str(tmp_path / "fake_hard.py"),
                    SWIFT_CALLS=str(tmp_path / "swift_calls.txt"), SCORE_CALLS=str(tmp_path / "score_calls.jsonl"),
                    **({} if out is None else {"OUTPUT_DIR": str(out)}), **env)
    return full_env


def run_script(script: str, tmp_path: Path, out: Path | None, *args: str, rc: int = 0, root: Path = ROOT,
               cwd: Path | None = None, umask: int | None = None, **env: str) -> str:
    """bash <root>/<script> with the fake swift and scorer first on PATH (then the test's own python), from cwd
    (default tmp_path), under `umask` if given; returns the log."""
    proc = subprocess.run(["bash", str(root / script), *args], env=script_env(tmp_path, out, **env),
                          cwd=cwd or tmp_path, capture_output=True, text=True, timeout=300,
                          preexec_fn=None if umask is None else (lambda: os.umask(umask)))
    assert proc.returncode == rc, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def run_data_pre(env: dict[str, str], *args: str, rc: int = 0, root: Path = ROOT, cwd: Path | None = None,
                 umask: int | None = None) -> str:
    """bash <root>/data-pre.sh with the test's virtual environment (no fakes: the real tools run), from cwd
    (default: root), under `umask` if given."""
    proc = subprocess.run(["bash", str(root / "data-pre.sh"), *args], env={**clean_env(), "VENV": sys.prefix, **env},
                          cwd=cwd or root, capture_output=True, text=True, timeout=300,
                          preexec_fn=None if umask is None else (lambda: os.umask(umask)))
    assert proc.returncode == rc, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def fake_model(folder: Path) -> Path:
    """A folder that passes the model check (tools.knobs: a config.json inside); the fake swift never loads it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}\n", encoding="utf-8")
    return folder


def prepared(tmp_path: Path, out: Path | None = None, *prepare_extra: str, recipe: str = "demo",
             n_per_label: int = 6, data: Path | None = None,
             compose_extra: tuple[str, ...] = ()) -> tuple[Path, Layout]:
    """data-pre.sh's outputs in-process (no augmentation; val 0.25 of make_official's data unless overridden), with
    the models tmp_path/m1 and tmp_path/m2 (fake_model) and any other stage-set flags; returns (output folder, its
    Layout)."""
    out = out or tmp_path / "out"
    data = data or tmp_path / "data"
    if not (data / "train.txt").exists():
        make_official(data, n_per_label=n_per_label)
    prepare_and_compose(data, out, "--val-ratio", "0.25", *prepare_extra,
                        compose_extra=("--recipe", recipe, "--model-stage1", str(fake_model(tmp_path / "m1")),
                                       "--model-stage2", str(fake_model(tmp_path / "m2")), *compose_extra))
    return out, Layout(out)


def fake_trained(layout: Layout, folds: int = 1) -> dict:
    """What train.sh leaves, without training: each stage of each run started (tools.model.checkpoint.start: what
    it trains on, in trained_on.json), a checkpoint-1 saved and finished (its pointer, the work folder swapped in);
    returns {(run, stage): checkpoint path}."""
    from tools.model.checkpoint import finish, start

    ckpts = {}
    for run in ["final", *range(folds if folds > 1 else 0)]:
        for stage in STAGES:
            (start(layout, stage, run) / "checkpoint-1").mkdir(parents=True, exist_ok=True)
            ckpts[(run, stage)] = str(finish(layout, stage, run).resolve())
    return ckpts


def tree_state(folder: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every file and folder under `folder` with its bytes (None for a folder) and modification time: equal
    before and after means nothing was written, replaced or touched."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def swift_calls(tmp_path: Path) -> list[list[str]]:
    """The fake swift's calls since the last look (each its argument list); forgets them."""
    path = tmp_path / "swift_calls.txt"
    calls = [call.split("\n") for call in path.read_text().split("\n\n") if call.strip()] if path.exists() else []
    path.unlink(missing_ok=True)
    return calls


def swift_env(tmp_path: Path) -> str:
    """The FIRESAFE_* variables and MAX_PIXELS the fake swift saw, one NAME=value a line."""
    path = tmp_path / "swift_calls.txt.env"
    return path.read_text(encoding="utf-8") if path.exists() else ""


def score_calls(tmp_path: Path) -> list[dict]:
    """The fake scorer's calls since the last look ({"argv": [...], "jobs": [[checkpoint, [[dataset, csv]]]]})."""
    path = tmp_path / "score_calls.jsonl"
    calls = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    path.unlink(missing_ok=True)
    return calls


def value(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def flag(argv: list[str], name: str) -> list[str]:
    """Values after --name, up to the next flag (none if the flag is absent)."""
    if name not in argv:
        return []
    i = argv.index(name) + 1
    values = []
    while i < len(argv) and not argv[i].startswith("--"):
        values.append(argv[i])
        i += 1
    return values


# --------------------------------------------------------------------------- tiny models (swift, torch)
MAX_PIXELS = "3136"  # 56 x 56 images: 4 visual tokens each, to keep every forward pass cheap


def base_args(model_dir: Path, train: bool = False) -> list[str]:
    """swift arguments for a tiny fp32 demo model at MAX_PIXELS."""
    return ["--model", str(model_dir), "--template", "qwen2_5_vl", "--torch_dtype", "float32",
            "--max_pixels", MAX_PIXELS] + (["--check_model", "false"] if train else [])


def forward_logits(model, template, rows):
    """The model's logits on the prompts of `rows` (answers dropped), one padded batch, in inference mode."""
    import torch
    from swift.infer_engine import InferRequest
    from swift.utils import to_device

    encoded = [template.encode(InferRequest(messages=[m for m in r["messages"] if m["role"] != "assistant"],
                                            images=r["images"])) for r in rows]
    inputs = to_device(template.data_collator(encoded), model.device)
    _, inputs = template.pre_forward_hook(model, None, inputs)
    inputs.pop("labels", None)
    with torch.no_grad():
        return model(**inputs).logits.float()


def last_logits(model, template, rows):
    """[B, V] next-token logits after each prompt (answers dropped), one padded batch, as tools.model.score runs."""
    return forward_logits(model, template, rows)[:, -1]


def stub_trainer(template, training=False, accumulation=1):
    """What the loss and metric plugins read from swift's trainer."""
    from types import SimpleNamespace

    return SimpleNamespace(template=template, model=SimpleNamespace(training=training), model_accepts_loss_kwargs=False,
                           args=SimpleNamespace(gradient_accumulation_steps=accumulation),
                           current_gradient_accumulation_steps=accumulation)


def training_batch(model, template, rows):
    """(logits [B, T, V], labels [B, T]) of a supervised batch, encoded and run the way swift trains."""
    import torch

    template.set_mode("train")
    try:
        batch = template.data_collator([template.encode(r) for r in rows])
        _, inputs = template.pre_forward_hook(model, None, batch)
        labels = inputs.pop("labels")
        inputs.pop("loss_scale", None)
        with torch.no_grad():
            logits = model(**inputs).logits.float()
    finally:
        template.set_mode("transformers")
    return logits, labels


# --------------------------------------------------------------------------- several GPUs (issue 16)
SCRIPT_KNOBS |= {"NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "DEEPSPEED", "EVAL_EVERY",
                 "CUDA_VISIBLE_DEVICES"}
DIST_VARS = ("CUDA_VISIBLE_DEVICES", "NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
             "SCORE_GPUS")
# nvidia-smi -L listing $FAKE_GPUS GPUs (train.sh's and test.sh's gpu_count).
FAKE_NVIDIA_SMI = """#!/usr/bin/env bash
for ((i = 0; i < ${FAKE_GPUS:-0}; i++)); do echo "GPU $i: NVIDIA H200 (UUID: GPU-fake-$i)"; done
"""
# swift and the scorer as the fakes above, recording first the torchrun / GPU variables they were started with.
FAKE_DIST_SWIFT = """#!/usr/bin/env bash
for v in %s; do [[ -n "${!v+x}" ]] && printf '%%s=%%s ' "$v" "${!v}"; done >> "$SWIFT_CALLS.dist"
echo >> "$SWIFT_CALLS.dist"
exec "$FAKE_BIN/swift" "$@"
""" % " ".join(DIST_VARS)
# With $FAKE_CUDA set, the preflight and tools.model.distributed see $FAKE_GPUS CUDA GPUs (bf16-capable) and an
# importable deepspeed; every other python call is FAKE_PYTHON's.
FAKE_DIST_PYTHON = """#!/usr/bin/env bash
if [[ "${1-} ${2-}" == "-m tools.model.score" ]]; then
  for v in %s; do [[ -n "${!v+x}" ]] && printf '%%s=%%s ' "$v" "${!v}"; done >> "$SCORE_CALLS.dist"
  echo >> "$SCORE_CALLS.dist"
fi
if [[ -n "${FAKE_CUDA:-}" && ( "${1-} ${2-}" == "-m tools.model.preflight"
      || "${1-} ${2-}" == "-m tools.model.distributed" ) ]]; then
  module=$2; shift 2; exec "$REAL_PYTHON" "$FAKE_CUDA_RUNNER" "$module" "$@"
fi
exec "$FAKE_BIN/python" "$@"
""" % " ".join(DIST_VARS)
FAKE_CUDA_RUNNER = """import runpy, sys, types, os
import torch
n = int(os.environ.get("FAKE_GPUS", "1"))
torch.cuda.is_available = lambda: n > 0
torch.cuda.device_count = lambda: n
torch.cuda.get_device_name = lambda i=0: "fake H200"
torch.cuda.is_bf16_supported = lambda *a, **k: True
import importlib.machinery
deepspeed = types.ModuleType("deepspeed")
deepspeed.__spec__ = importlib.machinery.ModuleSpec("deepspeed", None)  # importable; no version: not "available"
sys.modules.setdefault("deepspeed", deepspeed)
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def run_gpu_script(script: str, tmp_path: Path, out: Path | None, *args: str, rc: int = 0, gpus: int = 0,
                   cuda: bool = False, **env: str) -> str:
    """run_script with, first on PATH: an nvidia-smi showing `gpus` GPUs, a swift and a scorer that record the
    torchrun / GPU variables they see (dist_calls) before the fakes run; with cuda=True the preflight and
    tools.model.distributed see that many CUDA GPUs and an importable deepspeed. Returns the log."""
    full = script_env(tmp_path, out, **env)  # installs the fakes in tmp_path/bin
    bindir = tmp_path / "gpubin"
    bindir.mkdir(exist_ok=True)
    for name, text in (("nvidia-smi", FAKE_NVIDIA_SMI), ("swift", FAKE_DIST_SWIFT), ("python", FAKE_DIST_PYTHON)):
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    (tmp_path / "fake_cuda.py").write_text(FAKE_CUDA_RUNNER)
    full.update(PATH=f"{bindir}:{full['PATH']}", FAKE_BIN=str(tmp_path / "bin"), FAKE_GPUS=str(gpus),
                FAKE_CUDA_RUNNER=str(tmp_path / "fake_cuda.py"), **({"FAKE_CUDA": "1"} if cuda else {}))
    proc = subprocess.run(["bash", str(ROOT / script), *args], env=full, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == rc, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def dist_calls(tmp_path: Path, who: str = "swift") -> list[dict[str, str]]:
    """The torchrun / GPU variables each fake swift (or scorer) call saw, since the last look; forgets them."""
    path = tmp_path / ("swift_calls.txt.dist" if who == "swift" else "score_calls.jsonl.dist")
    calls = [dict(item.split("=", 1) for item in line.split()) for line in path.read_text().splitlines()] \
        if path.exists() else []
    path.unlink(missing_ok=True)
    return calls
