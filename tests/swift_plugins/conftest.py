"""Fixtures of the plugin tests, built once for the package: a tiny random Qwen2.5-VL of the demo's stage-2 shape
(tools.demo.models), rows of every label, the model as tools.model.score loads it, and one short swift training
run with every plugin on (the loss, tuner, metric and callback tests all read it)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests.helpers import base_args, last_logits, write_image
from tools.task import LABELS, sft_row

CAPTURED: dict = {}


@pytest.fixture(scope="package")
def tiny_model(tmp_path_factory) -> Path:
    from tools.demo.models import SPECS, build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model") / "stage2", SPECS["stage2"], seed=0)


@pytest.fixture(scope="package")
def data(tmp_path_factory) -> dict:
    """Rows with every label (train: 12, val: 5), as data-pre.sh writes them."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    out = {}
    for split, n in (("train", 12), ("val", 5)):
        rows = []
        for i in range(n):
            label = LABELS[i % len(LABELS)]
            image = write_image(root / split / f"{i}.jpg", tuple(int(c) for c in rng.integers(0, 255, 3)), (56, 56))
            rows.append(sft_row(image, label))
        path = root / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        out[split], out[f"{split}_rows"] = path, rows
    return out


@pytest.fixture(scope="package")
def loaded(tiny_model):
    """(model, template) prepared by swift as tools.model.score does, without adapters."""
    from tools.model.infer import load

    model, template, _, _ = load(base_args(tiny_model))
    return model, template


def capture_callback():
    """A test-only callback: the live model's outputs on the validation rows when training ends."""
    from swift.callbacks import TrainerCallback

    class CaptureLogits(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            from tools.model.infer import score_rows
            from tools.task import label_token_ids

            template = self.trainer.template
            rows = CAPTURED["rows"]
            model.eval()
            with template.generate_context():
                CAPTURED["logits"] = last_logits(model, template, rows)
                CAPTURED["probs"] = score_rows(model, template, label_token_ids(template.tokenizer), rows,
                                               batch_size=len(rows), progress=False)
            model.train()

    return CaptureLogits


def sft(output_dir: Path, model_dir: Path, data: dict, *extra: str) -> dict:
    """swift sft in-process with every plugin: hr_amplifier (tuner and optimizer, the amplifier at the default
    FIRESAFE_AMP_LR), weighted_ce, weighted_f1, amplifier_stats."""
    from swift import sft_main

    from swift_plugins import plugin_files

    argv = base_args(model_dir, train=True) + [
        "--dataset", str(data["train"]), "--val_dataset", str(data["val"]),
        "--external_plugins", *map(str, plugin_files()),
        "--tuner_type", "hr_amplifier", "--optimizer", "hr_amplifier", "--loss_type", "weighted_ce",
        "--callbacks", "amplifier_stats",
        "--eval_metric", "weighted_f1", "--metric_for_best_model", "weighted_f1", "--greater_is_better", "true",
        "--lora_rank", "4", "--learning_rate", "5e-3", "--max_steps", "4", "--warmup_ratio", "0",
        "--per_device_train_batch_size", "3", "--per_device_eval_batch_size", "5", "--gradient_accumulation_steps", "1",
        "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "steps", "--save_steps", "2",
        "--logging_steps", "1", "--report_to", "tensorboard", "--dataset_num_proc", "1",
        "--dataloader_num_workers", "0", "--seed", "42", "--data_seed", "42",
        "--output_dir", str(output_dir), "--add_version", "false", *extra]
    # swift sets TENSORBOARD_LOGGING_DIR only if unset (os.environ.setdefault): a second in-process run would
    # write its events into the first run's folder.
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
        mp.delenv("FIRESAFE_AMP_LR", raising=False)
        return sft_main(argv)


@pytest.fixture(scope="package")
def trained(tiny_model, data, tmp_path_factory):
    """One 4-step training run (checkpoints at steps 2 and 4), with what the model gave at its end."""
    from swift.callbacks import callbacks_map

    callbacks_map["_capture_logits"] = capture_callback()
    CAPTURED.clear()
    CAPTURED["rows"] = data["val_rows"]
    run = tmp_path_factory.mktemp("run")
    result = sft(run, tiny_model, data, "--callbacks", "amplifier_stats", "_capture_logits")
    return SimpleNamespace(run=run, result=result, captured=dict(CAPTURED), sft=sft)
