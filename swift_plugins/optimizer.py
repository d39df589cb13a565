"""Optimizer plugin (`--optimizer hr_amplifier`): the High-Risk Feature Amplifier at its own learning rate.

The amplifier's parameters (swift_plugins/_amplifier.py: the visual gate and one attention bias per biased layer)
start at the identity and are few and scalar-like; at the LoRA's learning rate (1e-4 in the real recipe) Adam moves
each of them by at most ~1e-4 per step, so in a ~130-step stage 2 they barely leave the identity (measured on the
3B: |β| max 0.0026, gate gain deviation 0.0012). This optimizer is HF's (same optimizer class and arguments from
`--optim`, same decay / no-decay split, same scheduler, which scales every group's rate by the same factor) with
the amplifier's parameters in groups of their own at `FIRESAFE_AMP_LR` (default 1e-2, docs/plugins.md says why).

Parameter groups, in this order (empty ones left out, as swift does; the first is the LoRA's, so HF's logged
`learning_rate` stays the LoRA's):

    base              every other trainable parameter (LoRA, a seq_cls head, ...), decayed    lr = --learning_rate
    base_no_decay     the same, not decayed (HF's rule: *bias*, norms)                        lr = --learning_rate
    hr_amplifier      amplifier, decayed (gate.channel, gate.token_scale, gate.probe)         lr = FIRESAFE_AMP_LR
    hr_amplifier_no_decay  amplifier, not decayed (attn_bias.<layer>.bias, gate.probe_bias)   lr = FIRESAFE_AMP_LR

Each group carries its `name`, so the optimizer state (optimizer.pt) records the layout and the rates, and
`hr_optimizer.json` in the run folder and every checkpoint records the amplifier rate, where it came from and
every group's parameter names. On `--resume_from_checkpoint` the rate recorded in that checkpoint is used
(FIRESAFE_AMP_LR, if set to another value, is ignored with a warning; with `--resume_only_model true`, which
starts a fresh optimizer, FIRESAFE_AMP_LR wins), the layout is checked against the record before training starts,
and loading an optimizer state whose groups are not these (a checkpoint trained with another `--optimizer`) fails
with a clear error instead of giving one parameter another's Adam moments.

Without an amplifier in the model it builds HF's two groups (and warns).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from swift.optimizers import OptimizerCallback, optimizers_map
from swift.utils import get_logger, is_master
from transformers import Trainer as HfTrainer
from transformers import TrainerCallback as HfTrainerCallback

from swift_plugins._amplifier import find_amplifier

logger = get_logger()

ENV_AMP_LR = "FIRESAFE_AMP_LR"
# Adam moves a parameter by at most ~lr per step; with 5 % warm-up and cosine decay the rate averages about half its
# peak, so ~130 stage-2 steps move a parameter by at most ~65 x lr: 0.65 at 1e-2. The 3B run at 1e-4 reached 40 % of
# that bound for its most-moved head, which at 1e-2 would be |β| ≈ 0.26 (x1.3 attention odds towards the image) and
# a gate gain deviation ≈ 0.12; the bound keeps a runaway below |β| ≈ 0.65 (x1.9).
DEFAULT_AMP_LR = 1e-2
RECORD_FILE = "hr_optimizer.json"
BASE, AMP, NO_DECAY = "base", "hr_amplifier", "_no_decay"
GROUP_NAMES = (BASE, BASE + NO_DECAY, AMP, AMP + NO_DECAY)


def parse_amp_lr(text: str | None) -> float | None:
    """FIRESAFE_AMP_LR as a number (>= 0; 0 freezes the amplifier), or None when unset or empty."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{ENV_AMP_LR}={text!r}: expected a learning rate such as 1e-2") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{ENV_AMP_LR}={text!r}: the learning rate must be a finite number >= 0")
    return value


def named_param_groups(model, base_lr: float, amp_lr: float, weight_decay: float) -> list[dict]:
    """The parameter groups (GROUP_NAMES order, empty ones dropped), each with `name`, `lr`, `weight_decay`,
    `params` and `param_names` (the model's names, in named_parameters order: the same every run)."""
    amplifier = find_amplifier(model)
    amp_ids = {id(p) for p in amplifier.parameters()} if amplifier is not None else set()
    decay = set(HfTrainer.get_decay_parameter_names(None, model))
    groups = {name: {"name": name, "lr": amp_lr if name.startswith(AMP) else base_lr,
                     "weight_decay": 0.0 if name.endswith(NO_DECAY) else weight_decay, "params": [], "param_names": []}
              for name in GROUP_NAMES}
    for name, param in model.named_parameters():  # each parameter once, shared ones included
        if not param.requires_grad:
            continue
        group = groups[(AMP if id(param) in amp_ids else BASE) + ("" if name in decay else NO_DECAY)]
        group["params"].append(param)
        group["param_names"].append(name)
    return [groups[name] for name in GROUP_NAMES if groups[name]["params"]]


def resume_checkpoint(args) -> Path | None:
    """The checkpoint folder this run resumes from, if any (True = the output folder's last checkpoint)."""
    resume = getattr(args, "resume_from_checkpoint", None)
    if resume is True or (isinstance(resume, str) and resume.lower() == "true"):
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
    return Path(resume) if isinstance(resume, (str, os.PathLike)) and os.path.isdir(resume) else None


def read_record(folder: str | Path | None) -> dict | None:
    path = Path(folder, RECORD_FILE) if folder else None
    return json.loads(path.read_text(encoding="utf-8")) if path is not None and path.is_file() else None


def _layout(groups: list[dict]) -> list[tuple[str, list[str]]]:
    return [(g["name"], list(g["param_names"])) for g in groups]


class HighRiskAmplifierOptimizer(OptimizerCallback):
    """swift's OptimizerCallback (swift/optimizers/base.py): create_optimizer builds the groups above; the scheduler
    is HF's (inherited create_scheduler)."""

    def __init__(self, args, trainer):
        super().__init__(args, trainer)
        self.record: dict | None = None
        self._recorder_added = False

    # ------------------------------------------------------------------ the amplifier's learning rate
    def amplifier_lr(self) -> tuple[float, str]:
        """(rate, where it came from): the resumed checkpoint's record, else FIRESAFE_AMP_LR, else the default."""
        env = parse_amp_lr(os.environ.get(ENV_AMP_LR))
        checkpoint = resume_checkpoint(self.args)
        recorded = read_record(checkpoint)
        if recorded is not None and recorded.get("amplifier_lr") is not None:
            rate = float(recorded["amplifier_lr"])
            if env is not None and env != rate:
                if getattr(self.args, "resume_only_model", False):
                    logger.warning(f"hr_amplifier optimizer: {ENV_AMP_LR}={env:g} used; {checkpoint} trained at "
                                   f"{rate:g} (--resume_only_model: fresh optimizer)")
                    return env, ENV_AMP_LR
                logger.warning(f"hr_amplifier optimizer: resuming {checkpoint}, which trained the amplifier at "
                               f"{rate:g}: {ENV_AMP_LR}={env:g} ignored (the resumed optimizer state keeps {rate:g})")
            return rate, str(checkpoint / RECORD_FILE)
        if env is not None:
            return env, ENV_AMP_LR
        return DEFAULT_AMP_LR, "default"

    # ------------------------------------------------------------------ OptimizerCallback
    def create_optimizer(self, model=None):
        args = self.args
        model = self.trainer.model if model is None else model
        amp_lr, source = self.amplifier_lr()
        groups = named_param_groups(model, args.learning_rate, amp_lr, args.weight_decay)
        if find_amplifier(model) is None:
            logger.warning("hr_amplifier optimizer: the model has no High-Risk Feature Amplifier; HF's two groups")
        ignored = [f"--{k}" for k in ("vit_lr", "aligner_lr", "lorap_lr_ratio") if getattr(args, k, None)]
        if ignored:
            logger.warning(f"hr_amplifier optimizer: {', '.join(ignored)} ignored (only the amplifier gets its own "
                           "rate)")
        self._check_resumed_layout(groups)
        optimizer_cls, optimizer_kwargs = HfTrainer.get_optimizer_cls_and_kwargs(args, model)
        if {"params", "model", "optimizer_dict"} & set(optimizer_kwargs):
            raise ValueError(f"--optimizer hr_amplifier needs an --optim that takes parameter groups (adamw_torch, "
                             f"...), not {args.optim}")
        # The names stay in our record, not in the optimizer: DeepSpeed swaps each group's params for flat buffers.
        optimizer = optimizer_cls([{k: v for k, v in g.items() if k != "param_names"} for g in groups],
                                  **optimizer_kwargs)
        optimizer.register_load_state_dict_pre_hook(_check_saved_groups)
        optimizer.register_load_state_dict_post_hook(self._after_load)
        self.record = {"amplifier_lr": amp_lr, "amplifier_lr_source": source, "learning_rate": args.learning_rate,
                       "weight_decay": args.weight_decay,
                       "groups": [{"name": g["name"], "lr": g["lr"], "weight_decay": g["weight_decay"],
                                   "size": len(g["params"]), "param_names": g["param_names"]} for g in groups]}
        sizes = ", ".join(f"{g['name']} {len(g['params'])} at {g['lr']:g}" for g in groups)
        logger.info(f"hr_amplifier optimizer: amplifier lr {amp_lr:g} ({source}); groups: {sizes}")
        self._write_record(args.output_dir)
        self._add_recorder()
        return optimizer

    # ------------------------------------------------------------------ records and resume
    def _check_resumed_layout(self, groups: list[dict]) -> None:
        if getattr(self.args, "resume_only_model", False):
            return  # a fresh optimizer: nothing of the old one is loaded
        checkpoint = resume_checkpoint(self.args)
        recorded = read_record(checkpoint)
        if recorded is None:
            return
        saved = [(g["name"], list(g["param_names"])) for g in recorded["groups"]]
        if saved != _layout(groups):
            diff = [f"{name}: {len(p)} parameters" for name, p in saved]
            now = [f"{name}: {len(p)} parameters" for name, p in _layout(groups)]
            raise ValueError(f"hr_amplifier optimizer: {checkpoint} was trained with groups {diff}, this run has {now} "
                             "(another model, tuner or FIRESAFE_AMP_LAYERS?); its optimizer state cannot be resumed. "
                             "Use --resume_only_model true to start a fresh optimizer from its weights.")

    def _after_load(self, optimizer) -> None:
        """After an optimizer state was loaded (resume): the rates are now the saved ones; record them."""
        if self.record is None:
            return
        rates = {g.get("name"): g.get("initial_lr", g["lr"]) for g in optimizer.param_groups}
        if AMP in rates or AMP + NO_DECAY in rates:
            loaded = rates.get(AMP, rates.get(AMP + NO_DECAY))
            if loaded != self.record["amplifier_lr"]:
                logger.warning(f"hr_amplifier optimizer: the resumed optimizer state trains the amplifier at {loaded:g}"
                               f" (not {self.record['amplifier_lr']:g})")
                self.record.update(amplifier_lr=loaded, amplifier_lr_source="resumed optimizer state")
        for group in self.record["groups"]:
            group["lr"] = rates.get(group["name"], group["lr"])

    def _write_record(self, folder: str | os.PathLike | None) -> None:
        if self.record is None or not folder or not os.path.isdir(folder) or not is_master():
            return
        path = Path(folder, RECORD_FILE)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    def _add_recorder(self) -> None:
        add = getattr(self.trainer, "add_callback", None)
        if self._recorder_added or not callable(add):
            return
        add(_RecordOnSave(self))
        self._recorder_added = True


class _RecordOnSave(HfTrainerCallback):
    """Writes hr_optimizer.json into every checkpoint the trainer saves."""

    def __init__(self, owner: HighRiskAmplifierOptimizer):
        self.owner = owner

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.owner._write_record(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))


def _check_saved_groups(optimizer, state_dict) -> None:
    """load_state_dict pre-hook: torch pairs saved and current parameters by position only, so the saved groups
    must be ours, in the same order."""
    saved = [g.get("name") for g in state_dict["param_groups"]]
    current = [g.get("name") for g in optimizer.param_groups]
    if saved != current:
        raise ValueError(f"hr_amplifier optimizer: the checkpoint's optimizer state has groups {saved}, this run "
                         f"{current}: it was trained with another --optimizer. Resume it with that optimizer, or use "
                         "--resume_only_model true to start a fresh optimizer from its weights.")


optimizers_map["hr_amplifier"] = HighRiskAmplifierOptimizer
