"""Several GPUs and several nodes: the arithmetic train.sh needs to keep the recipe's training the same.

    python -m tools.model.distributed plan --dataset outputs/data/stage1_train.jsonl --batch-size 4 \\
        --grad-accum 4 --epochs 2 --eval-every 0.5 --eval-steps auto --what stage1
    -> prints "GRAD_ACCUM_PER_PROCESS EVAL_STEPS BATCH" on stdout, what it decided on stderr
       (--micro-batch 8: batches of 8 rows, the accumulation keeping the global batch 4 x 4)
    python -m tools.model.distributed world      -> the number of training processes, NPROC_PER_NODE x NNODES
    python -m tools.model.distributed swift-flags   -> --deepspeed DEEPSPEED, --use_cpu true (DDP on CPUs), a line each

`NPROC_PER_NODE=N bash train.sh` (and NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT for several nodes) makes swift's
CLI start torchrun (swift/cli/main.py): N data-parallel processes per node, each with its own batches of
BATCH_SIZE rows. The recipe's global batch, BATCH_SIZE x GRAD_ACCUM, is kept by dividing the accumulation by the
number of processes (world size); when it does not divide, the nearest whole accumulation is taken and the message
says which global batch results (the learning rate stays the recipe's, so it then trains with another batch). A
stage's own batch (BATCH_SIZE_STAGE1/2: rows a forward pass) divides the same global batch: fewer, larger passes a
step; where it would make the global batch larger (more processes than it allows), the stage takes BATCH_SIZE.

Evaluation and saving follow the epoch, not a step count: EVAL_EVERY=0.5 evaluates (and saves, so every evaluated
step can be the best checkpoint) every half epoch, whatever the number of processes; the steps are computed from
the stage's training rows exactly as swift and HF count them (swift's BatchSamplerShard gives each process
rows // world rows in batches of BATCH_SIZE, the last one short; HF makes ceil(batches / accumulation) optimizer
steps an epoch, at least 1). EVAL_STEPS=N (a whole number) keeps a fixed step count instead (recipes/demo.env:
1000, more than any demo run has: one evaluation, at the end, where swift always evaluates and saves);
EVAL_STEPS=auto uses EVAL_EVERY.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tools import cli
from tools.fileio import DataError


def _whole(env: dict, name: str, default: int, low: int) -> int:
    text = (env.get(name) or "").strip()
    if not text:
        return default
    if not text.lstrip("+").isdigit() or int(text) < low:
        raise DataError(f"{name}={text!r}: expected a whole number >= {low}")
    return int(text)


def world_size(env: dict | None = None) -> int:
    """Training processes in all: NPROC_PER_NODE (1 when unset) x NNODES (1 when unset), as torchrun starts them
    when swift's CLI sees either variable."""
    env = os.environ if env is None else env
    nproc, nnodes = _whole(env, "NPROC_PER_NODE", 1, 1), _whole(env, "NNODES", 1, 1)
    node_rank = _whole(env, "NODE_RANK", 0, 0)
    if node_rank >= nnodes:
        raise DataError(f"NODE_RANK={node_rank} but NNODES={nnodes}: node ranks go from 0 to NNODES - 1")
    return nproc * nnodes


def split_accumulation(grad_accum: int, world: int, batch_size: int = 1,
                       micro_batch: int | None = None) -> tuple[int, str | None]:
    """(accumulation per process, a message or None) that keeps the global batch batch_size x grad_accum with
    `world` processes, each taking micro_batch rows a forward pass (default batch_size): the exact quotient when it
    divides, else the whole number whose global batch is nearest (ties: the larger), at least 1."""
    micro = batch_size if micro_batch is None else micro_batch
    if grad_accum < 1 or world < 1 or batch_size < 1 or micro < 1:
        raise ValueError("grad_accum, world, batch_size and micro_batch must be >= 1")
    wanted, per_pass = batch_size * grad_accum, micro * world
    if wanted % per_pass == 0:
        return wanted // per_pass, None
    low, high = max(1, wanted // per_pass), wanted // per_pass + 1
    accum = min((high, low), key=lambda a: abs(per_pass * a - wanted))  # high first: ties go up
    result = f"global batch {micro} x {accum} x {world} = {per_pass * accum} instead of the recipe's " \
             f"{batch_size} x {grad_accum} = {wanted} (the learning rate stays the recipe's"
    if micro == batch_size:
        return accum, (f"GRAD_ACCUM={grad_accum} does not divide by {world} processes: {accum} per process, {result}; "
                       f"a GRAD_ACCUM that is a multiple of {world} divides exactly)")
    return accum, (f"the recipe's {wanted} rows a step (BATCH_SIZE x GRAD_ACCUM) do not divide into batches of {micro} "
                   f"on {world} process{'es' if world > 1 else ''}: accumulation {accum}, {result})")


def steps_per_epoch(rows: int, batch_size: int, accum: int, world: int = 1) -> int:
    """Optimizer steps in one epoch, as swift's BatchSamplerShard and HF's Trainer count them."""
    per_process = rows // world
    if per_process < 1:
        raise DataError(f"{rows} training rows for {world} processes: every process needs at least one row")
    batches = math.ceil(per_process / batch_size)
    return max(1, math.ceil(batches / accum))


def eval_steps_for(every: float, per_epoch: int) -> int:
    """Steps between evaluations for one every `every` epochs (at least 1)."""
    if not every > 0:
        raise ValueError(f"EVAL_EVERY must be > 0, got {every}")
    return max(1, round(every * per_epoch))


@dataclass
class Plan:
    rows: int
    world: int
    batch_size: int       # rows a forward pass, per process (the stage's micro-batch)
    recipe_batch: int     # BATCH_SIZE: with recipe_accum, the global batch the recipe asks for
    recipe_accum: int
    accum: int            # gradient accumulation per process
    epochs: float
    per_epoch: int        # optimizer steps an epoch
    max_steps: int        # optimizer steps in all (HF: ceil(epochs x per_epoch))
    eval_steps: int       # --eval_steps and --save_steps
    eval_source: str      # "EVAL_EVERY=0.5" or "EVAL_STEPS=1000"
    notes: list[str] = field(default_factory=list)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.accum * self.world

    @property
    def evaluations(self) -> int:
        """Evaluations in the run: every eval_steps steps, and once at the end (swift always evaluates there)."""
        return self.max_steps // self.eval_steps + (self.max_steps % self.eval_steps > 0)


def plan(rows: int, batch_size: int, grad_accum: int, epochs: float, world: int = 1, eval_every: float = 0.5,
         eval_steps: str | int = "auto", micro_batch: int | None = None) -> Plan:
    """The per-process accumulation and the evaluation/saving interval of one training run whose global batch is
    batch_size x grad_accum and whose forward passes take micro_batch rows (default batch_size) on each process."""
    micro = batch_size if micro_batch is None else micro_batch
    notes = []
    if micro != batch_size and micro * world > batch_size * grad_accum:  # a speed choice never grows the global batch
        notes.append(f"batches of {micro} on {world} process{'es' if world > 1 else ''} would make more than the "
                     f"recipe's {batch_size * grad_accum} rows a step: batches of {batch_size} (BATCH_SIZE)")
        micro = batch_size
    accum, note = split_accumulation(grad_accum, world, batch_size, micro)
    per_epoch = steps_per_epoch(rows, micro, accum, world)
    max_steps = math.ceil(epochs * per_epoch)
    fixed = str(eval_steps).strip().lower()
    if fixed in ("", "auto"):
        steps, source = eval_steps_for(float(eval_every), per_epoch), f"EVAL_EVERY={eval_every:g} epoch"
    else:
        if not fixed.isdigit() or int(fixed) < 1:
            raise DataError(f"EVAL_STEPS={eval_steps!r}: expected auto or a whole number >= 1")
        steps, source = int(fixed), f"EVAL_STEPS={int(fixed)}"
    return Plan(rows, world, micro, batch_size, grad_accum, accum, epochs, per_epoch, max_steps, steps, source,
                notes + ([note] if note else []))


def describe(p: Plan, what: str = "") -> list[str]:
    """What train.sh logs about a plan, one line each."""
    head = f"{what}: " if what else ""
    lines = []
    if p.world > 1 or p.batch_size != p.recipe_batch:
        processes = f"{p.world} processes: " if p.world > 1 else ""
        batches = "" if p.batch_size == p.recipe_batch else f"batches of {p.batch_size} (not {p.recipe_batch}), "
        lines.append(f"{head}{processes}{batches}gradient accumulation {p.recipe_accum} -> {p.accum} per process, "
                     f"global batch {p.batch_size} x {p.accum} x {p.world} = {p.global_batch}"
                     + (" (the recipe's)" if p.global_batch == p.recipe_batch * p.recipe_accum else ""))
    lines += [f"{head}{n}" for n in p.notes]
    times = "once, at the end" if p.evaluations == 1 else f"{p.evaluations} times"
    lines.append(f"{head}{p.rows} rows, {p.per_epoch} steps an epoch, {p.max_steps} in all; evaluates and saves every "
                 f"{p.eval_steps} steps ({p.eval_source}): {times}")
    return lines


def swift_flags(env: dict | None = None, cuda: bool | None = None) -> list[str]:
    """swift sft flags for the process layout: --deepspeed DEEPSPEED; with several processes and no CUDA,
    --use_cpu true, without which transformers/accelerate see no distributed CPU setup (accelerate's MULTI_CPU needs
    cpu=True) and leave the model unwrapped: every process would train its own copy, never all-reducing a gradient,
    and only rank 0's would be saved (checked in tests/model/test_ddp.py)."""
    env = os.environ if env is None else env
    flags = []
    deepspeed = (env.get("DEEPSPEED") or "").strip()
    if deepspeed:
        flags += ["--deepspeed", deepspeed]
    if world_size(env) > 1:
        if cuda is None:
            import torch

            cuda = torch.cuda.is_available()
        if not cuda:
            flags += ["--use_cpu", "true"]
    return flags


# --------------------------------------------------------------------------- what cannot work (train.sh's preflight)
def zero_stage(deepspeed: str) -> int | None:
    """The ZeRO stage of a DEEPSPEED value (zero2 -> 2, zero3 -> 3), None without DeepSpeed."""
    deepspeed = (deepspeed or "").strip()
    return int(deepspeed[4:]) if deepspeed.startswith("zero") and deepspeed[4:].isdigit() else None


def setup_problems(env: dict, stages: list[str], cuda_devices: int | None = None) -> list[str]:
    """Settings of several processes or DeepSpeed that cannot run here, each with the reason. cuda_devices: the
    GPUs torch sees (default: asked of torch; 0 without CUDA)."""
    out = []
    try:
        world_size(env)
    except DataError as e:
        return [str(e)]
    if cuda_devices is None:
        import torch

        cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    nproc = (env.get("NPROC_PER_NODE") or "").strip()
    if nproc and cuda_devices and int(nproc) > cuda_devices:
        out.append(f"NPROC_PER_NODE={nproc} but {cuda_devices} GPU(s) visible here: one training process per GPU "
                   f"(NPROC_PER_NODE={cuda_devices} or fewer)")
    deepspeed = (env.get("DEEPSPEED") or "").strip()
    stage = zero_stage(deepspeed)
    if deepspeed and not cuda_devices:
        out.append(f"DEEPSPEED={deepspeed} needs CUDA GPUs (no GPU visible here): leave DEEPSPEED empty; on a CPU "
                   f"NPROC_PER_NODE={nproc or 'N'} trains data-parallel (gloo) without it")
    if stage is not None and stage < 3:
        version = _deepspeed_version()
        default_tuner = {"1": "lora", "2": "hr_amplifier"}  # train.sh's
        amplified = [name for name in stages
                     if env.get(f"STAGE{name[-1]}_TUNER", default_tuner[name[-1]]) == "hr_amplifier"]
        if version and amplified and _release(version) >= (0, 19):
            out.append(f"DEEPSPEED={deepspeed} with deepspeed {version} and the hr_amplifier tuner "
                       f"({', '.join(amplified)}): deepspeed 0.19 broadcasts every parameter as a byte view at "
                       "start-up, which fails for the amplifier's scalar parameters (gate.token_scale, "
                       "gate.probe_bias: \"self.dim() cannot be 0\"); install deepspeed<0.19 "
                       "(pip install -e '.[deepspeed]'), or use DEEPSPEED=zero3")
    if stage == 3:
        for name in stages:
            n = name[-1]
            default_loss = "" if n == "1" else "weighted_ce"  # train.sh's defaults
            if (env.get(f"USE_LIGER_KERNEL_STAGE{n}", "false") == "true"
                    and not env.get(f"STAGE{n}_LOSS", default_loss).strip()):
                out.append(f"USE_LIGER_KERNEL_STAGE{n}=true with DEEPSPEED=zero3: liger's fused cross-entropy "
                           "(used with swift's own loss) reads lm_head.weight outside lm_head's forward, where ZeRO-3 "
                           "leaves it an empty partition (a size-mismatch crash at the first step); set "
                           f"USE_LIGER_KERNEL_STAGE{n}=false or use DEEPSPEED=zero2")
    return out


def _deepspeed_version() -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    try:
        return version("deepspeed")
    except PackageNotFoundError:
        return None


def _release(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit()) if part else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def checkpoint_layout(checkpoint: str | Path) -> dict:
    """How a swift/HF checkpoint was saved: {"deepspeed": bool, "zero_stage": 3 or None, "processes": int or None}.
    DeepSpeed writes global_step*/ with one *zero_pp_rank_<r>_*optim_states.pt per data-parallel rank (and, under
    ZeRO-3, one zero_pp_rank_<r>_*model_states.pt per rank); otherwise HF writes optimizer.pt."""
    steps = sorted(Path(checkpoint).glob("global_step*"))
    if not steps:
        return {"deepspeed": False, "zero_stage": None, "processes": None}
    folder = steps[-1]
    ranks = len(list(folder.glob("*zero_pp_rank_*_optim_states.pt")))
    return {"deepspeed": True, "zero_stage": 3 if any(folder.glob("zero_pp_rank_*_model_states.pt")) else None,
            "processes": ranks or None}


def resume_problems(checkpoint: str | Path, env: dict) -> list[str]:
    """Why RESUME=1 cannot continue `checkpoint` with this run's DEEPSPEED and process count (HF would otherwise
    fail after loading the model, or, for a DeepSpeed checkpoint resumed without DeepSpeed, silently start a fresh
    optimizer: it finds no optimizer.pt)."""
    layout = checkpoint_layout(checkpoint)
    deepspeed = (env.get("DEEPSPEED") or "").strip()
    try:
        world = world_size(env)
    except DataError:
        return []  # reported by setup_problems
    if layout["deepspeed"] and not deepspeed:
        return [f"RESUME=1: {checkpoint} was saved by DeepSpeed (its optimizer state is in global_step*/, not "
                f"optimizer.pt): resume it with DEEPSPEED set as then, or start afresh with RESUME=0"]
    if not layout["deepspeed"] and deepspeed:
        return [f"RESUME=1: {checkpoint} was saved without DeepSpeed: DeepSpeed cannot load its optimizer state "
                f"(\"Can't find a valid checkpoint\"); resume without DEEPSPEED, or start afresh with RESUME=0"]
    out = []
    if layout["deepspeed"]:
        saved_stage = layout["zero_stage"] or 2
        if (zero_stage(deepspeed) == 3) != (saved_stage == 3):
            out.append(f"RESUME=1: {checkpoint} was saved with ZeRO-{'3' if saved_stage == 3 else '1/2'}, this run "
                       f"has DEEPSPEED={deepspeed}: resume with the same ZeRO stage, or RESUME=0")
        if layout["processes"] and layout["processes"] != world:
            out.append(f"RESUME=1: {checkpoint} was saved by {layout['processes']} DeepSpeed processes, this run has "
                       f"{world}: ZeRO's optimizer state is split per process and cannot be resumed on another number "
                       f"(NPROC_PER_NODE x NNODES = {layout['processes']}, or RESUME=0)")
    return out


def run_problems(layout, stage: str, run, env: dict) -> list[str]:
    """One run's problems with several processes: enough rows for every process; with RESUME=1, a checkpoint
    saved in a layout this run can continue."""
    out = []
    try:
        world = world_size(env)
    except DataError:
        return []
    path = layout.train_jsonl(stage, run)
    if world > 1 and path.exists() and count_rows(path) < world:
        out.append(f"{path}: {count_rows(path)} rows for {world} training processes: every process needs one")
    if env.get("RESUME") == "1":
        import contextlib
        import io

        from tools.model.checkpoint import latest

        with contextlib.redirect_stderr(io.StringIO()):  # train.sh says it when it gets there
            found = latest(layout, stage, run, env.get(f"MODEL_{stage.upper()}"))  # what train.sh continues from
        if found:
            out += resume_problems(found, env)
    return out


def count_rows(path: str | Path) -> int:
    """Rows of a JSONL file (non-empty lines)."""
    try:
        with open(path, encoding="utf-8") as f:
            return sum(1 for line in f if line.strip())
    except FileNotFoundError:
        raise DataError(f"{path}: not found: run data-pre.sh") from None


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser("tools.model.distributed", __doc__)
    sub = ap.add_subparsers(dest="action", required=True)
    p = sub.add_parser("plan", help="accumulation per process and evaluation steps of one training run")
    p.add_argument("--dataset", required=True, help="the stage's training JSONL (its rows are counted)")
    p.add_argument("--batch-size", type=int, required=True, help="BATCH_SIZE (per process)")
    p.add_argument("--grad-accum", type=int, required=True, help="GRAD_ACCUM: the recipe's, for one process")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="the stage's rows a forward pass (BATCH_SIZE_STAGE1/2; default: --batch-size); the "
                        "accumulation then keeps the global batch --batch-size x --grad-accum")
    p.add_argument("--epochs", type=float, required=True)
    p.add_argument("--eval-every", type=float, default=0.5, help="EVAL_EVERY, in epochs (default: %(default)s)")
    p.add_argument("--eval-steps", default="auto", help="EVAL_STEPS: auto (from --eval-every) or a step count")
    p.add_argument("--world", type=int, default=None, help="processes (default: NPROC_PER_NODE x NNODES)")
    p.add_argument("--what", default="", help="a name for the messages (e.g. the stage)")
    sub.add_parser("world", help="the number of training processes: NPROC_PER_NODE x NNODES")
    sub.add_parser("swift-flags", help="swift sft flags for the process layout (--deepspeed, --use_cpu), one a line")
    args = ap.parse_args(argv)

    def step() -> None:
        if args.action == "world":
            print(world_size())
            return
        if args.action == "swift-flags":
            print("\n".join(swift_flags()))
            return
        world = world_size() if args.world is None else args.world
        result = plan(count_rows(args.dataset), args.batch_size, args.grad_accum, args.epochs, world,
                      args.eval_every, args.eval_steps, args.micro_batch)
        for line in describe(result, args.what):
            print(line, file=sys.stderr)
        print(result.accum, result.eval_steps, result.batch_size)

    return cli.run(step, errors=(DataError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
