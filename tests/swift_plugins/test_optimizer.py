"""swift_plugins/optimizer.py (`--optimizer hr_amplifier`): the amplifier's parameters in groups of their own at
FIRESAFE_AMP_LR, so that in a real stage-2 run (LoRA lr 1e-4, ~130 steps) they leave the identity; and a resumed run
gets the same groups, rates and Adam moments."""
from __future__ import annotations

import json

import pytest
import torch

from tests.swift_plugins.support import (build_optimizer, micro_amplified, micro_batch, micro_loss, one_thread,
                                         training_args)

REAL_LR, REAL_STEPS = 1e-4, 130  # recipes/real.env's learning rate; stage 2's optimizer steps on the real data


def names_by_group(optimizer, model) -> dict[str, list[str]]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: [name_of[id(p)] for p in g["params"]] for g in optimizer.param_groups}


def test_groups_hold_the_amplifier_at_its_own_rate(tmp_path, monkeypatch):
    from swift_plugins.optimizer import DEFAULT_AMP_LR

    monkeypatch.delenv("FIRESAFE_AMP_LR", raising=False)
    model, amp = micro_amplified()
    args = training_args(tmp_path, learning_rate=REAL_LR, weight_decay=0.1)
    optimizer, scheduler, callback = build_optimizer("hr_amplifier", model, args, 10)
    # Base groups first (HF logs group 0's rate as `learning_rate`); LoRA has no undecayed parameter here.
    assert [g["name"] for g in optimizer.param_groups] == ["base", "hr_amplifier", "hr_amplifier_no_decay"]
    assert [g["initial_lr"] for g in optimizer.param_groups] == [REAL_LR, DEFAULT_AMP_LR, DEFAULT_AMP_LR]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.1, 0.0]
    by_name = names_by_group(optimizer, model)
    amp_names = {n for n, p in model.named_parameters() if any(p is q for q in amp.parameters())}
    assert set(by_name["hr_amplifier"]) | set(by_name["hr_amplifier_no_decay"]) == amp_names
    assert {n.split("hr_amplifier.")[1] for n in by_name["hr_amplifier_no_decay"]} == {
        "gate.probe_bias", *(f"attn_bias.{i}.bias" for i in range(4))}  # HF's rule: *bias* is not decayed
    assert {n.split("hr_amplifier.")[1] for n in by_name["hr_amplifier"]} == {
        "gate.channel", "gate.token_scale", "gate.probe"}
    assert by_name["base"] and all("lora_" in n for n in by_name["base"])
    # Nothing twice, nothing trainable missing, nothing frozen.
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in model.parameters() if p.requires_grad}
    # The scheduler scales every group by the same factor (HF's cosine with warm-up).
    optimizer.step(), scheduler.step()
    rates = [g["lr"] for g in optimizer.param_groups]
    assert rates[0] > 0 and rates[1] / rates[0] == pytest.approx(DEFAULT_AMP_LR / REAL_LR)
    # The record: the run folder's hr_optimizer.json, and the callback that copies it into each checkpoint.
    record = json.loads((tmp_path / "hr_optimizer.json").read_text())
    assert record["amplifier_lr"] == DEFAULT_AMP_LR and record["amplifier_lr_source"] == "default"
    assert [(g["name"], g["param_names"]) for g in record["groups"]] == list(by_name.items())
    assert len(callback.trainer.callbacks) == 1


def test_rate_from_the_environment(tmp_path, monkeypatch):
    from swift_plugins.optimizer import parse_amp_lr

    monkeypatch.setenv("FIRESAFE_AMP_LR", "3e-3")
    model, _ = micro_amplified()
    optimizer, _, callback = build_optimizer("hr_amplifier", model, training_args(tmp_path, learning_rate=REAL_LR), 10)
    assert [g["initial_lr"] for g in optimizer.param_groups] == [REAL_LR, 3e-3, 3e-3]
    assert callback.record["amplifier_lr_source"] == "FIRESAFE_AMP_LR"
    assert parse_amp_lr("") is None and parse_amp_lr(" 0 ") == 0.0
    for bad in ("fast", "-1e-3", "nan", "inf"):
        with pytest.raises(ValueError, match="FIRESAFE_AMP_LR"):
            parse_amp_lr(bad)


def test_without_an_amplifier_it_is_hf_default(tmp_path):
    from tests.swift_plugins.support import micro_model

    model = micro_model(layers=1)
    optimizer, _, _ = build_optimizer("hr_amplifier", model, training_args(tmp_path, learning_rate=REAL_LR), 10)
    assert [g["name"] for g in optimizer.param_groups] == ["base", "base_no_decay"]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def train_micro(tmp_path, optimizer_name: str) -> dict[str, float]:
    """REAL_STEPS optimizer steps at LoRA lr REAL_LR (5 % warm-up, cosine: the real recipe's schedule) on a fixed
    batch; the amplifier's distance from the identity at the end."""
    model, amp = micro_amplified()
    model.train()
    args = training_args(tmp_path / optimizer_name, learning_rate=REAL_LR, warmup_ratio=0.05)
    optimizer, scheduler, _ = build_optimizer(optimizer_name, model, args, REAL_STEPS)
    inputs, target = micro_batch()
    with one_thread():
        for _ in range(REAL_STEPS):
            micro_loss(model, inputs, target).backward()
            optimizer.step(), scheduler.step(), optimizer.zero_grad()
        with torch.no_grad():
            model(**inputs, logits_to_keep=1)  # the gate's gain deviation of the final weights
    return amp.stats()


def test_amplifier_leaves_identity_at_the_real_learning_rate(tmp_path, monkeypatch):
    """At the real recipe's LoRA rate, in a stage-2-sized run, the amplifier moves only with its own rate.

    Adam moves a parameter by about lr per step at most, so REAL_STEPS steps of warm-up + cosine (an average factor
    of ~0.5) bound the movement near 65 x lr: ~0.0065 inside LoRA's group at 1e-4, ~0.65 at the default 1e-2. The
    thresholds sit between: |β| max and the gate's mean |gain - 1| above 0.1 with the plugin, below 0.01 and 0.02
    (the gain deviation adds |c| and |s|) with swift's default optimizer."""
    monkeypatch.delenv("FIRESAFE_AMP_LR", raising=False)
    own = train_micro(tmp_path, "hr_amplifier")
    shared = train_micro(tmp_path, "default")
    assert own["attn_bias_absmax"] > 0.1 and own["gate_gain_abs_dev"] > 0.1, own
    assert shared["attn_bias_absmax"] < 0.01 and shared["gate_gain_abs_dev"] < 0.02, shared


# --------------------------------------------------------------------------- resume
def test_resume_restores_groups_rates_and_moments(tmp_path, monkeypatch):
    """Optimizer and scheduler state saved after 3 steps and loaded into a fresh run (as HF's resume does) give
    every named parameter its own moments back, the recorded amplifier rate (not a changed FIRESAFE_AMP_LR), and
    the same next step as the uninterrupted run."""
    from swift_plugins.optimizer import RECORD_FILE, _RecordOnSave

    inputs, target = micro_batch()
    monkeypatch.setenv("FIRESAFE_AMP_LR", "2e-2")
    first, _ = micro_amplified()
    args = training_args(tmp_path / "run", learning_rate=REAL_LR, warmup_ratio=0.05)
    optimizer, scheduler, callback = build_optimizer("hr_amplifier", first, args, 20)
    for _ in range(3):
        micro_loss(first, inputs, target).backward()
        optimizer.step(), scheduler.step(), optimizer.zero_grad()
    checkpoint = tmp_path / "run" / "checkpoint-3"
    checkpoint.mkdir(parents=True)
    torch.save(optimizer.state_dict(), checkpoint / "optimizer.pt")
    torch.save(scheduler.state_dict(), checkpoint / "scheduler.pt")
    recorder, = callback.trainer.callbacks
    assert isinstance(recorder, _RecordOnSave)
    recorder.on_save(args, type("State", (), {"is_world_process_zero": True, "global_step": 3})(), None)
    assert json.loads((checkpoint / RECORD_FILE).read_text())["amplifier_lr"] == 2e-2

    monkeypatch.setenv("FIRESAFE_AMP_LR", "5e-3")  # changed between the runs: the record wins
    second, _ = micro_amplified()
    second.load_state_dict(first.state_dict())
    args2 = training_args(tmp_path / "run", learning_rate=REAL_LR, warmup_ratio=0.05,
                          resume_from_checkpoint=str(checkpoint))
    optimizer2, scheduler2, callback2 = build_optimizer("hr_amplifier", second, args2, 20)
    assert callback2.record["amplifier_lr"] == 2e-2
    assert [g["initial_lr"] for g in optimizer2.param_groups] == [REAL_LR, 2e-2, 2e-2]
    optimizer2.load_state_dict(torch.load(checkpoint / "optimizer.pt"))
    scheduler2.load_state_dict(torch.load(checkpoint / "scheduler.pt"))
    names1, names2 = names_by_group(optimizer, first), names_by_group(optimizer2, second)
    assert names1 == names2
    params1, params2 = dict(first.named_parameters()), dict(second.named_parameters())
    for names in names1.values():
        for name in names:
            torch.testing.assert_close(optimizer2.state[params2[name]]["exp_avg"],
                                       optimizer.state[params1[name]]["exp_avg"], rtol=0, atol=0, msg=name)
    for model, opt, sched in ((first, optimizer, scheduler), (second, optimizer2, scheduler2)):
        micro_loss(model, inputs, target).backward()
        opt.step(), sched.step(), opt.zero_grad()
    for name, param in params1.items():
        torch.testing.assert_close(params2[name], param, rtol=0, atol=0, msg=name)
    assert [g["lr"] for g in optimizer2.param_groups] == [g["lr"] for g in optimizer.param_groups]


def test_resume_refuses_another_optimizers_state(tmp_path, monkeypatch):
    """A state from swift's default optimizer (HF's two groups, the amplifier mixed into them) is refused by name
    before torch pairs parameters by position; so is a checkpoint whose recorded layout is not this run's."""
    from swift_plugins.optimizer import RECORD_FILE

    monkeypatch.delenv("FIRESAFE_AMP_LR", raising=False)
    (tmp_path / "b").mkdir()
    model, _ = micro_amplified()
    default, _, _ = build_optimizer("default", model, training_args(tmp_path / "a", learning_rate=REAL_LR), 10)
    ours, _, _ = build_optimizer("hr_amplifier", model, training_args(tmp_path / "b", learning_rate=REAL_LR), 10)
    with pytest.raises(ValueError, match="another --optimizer"):
        ours.load_state_dict(default.state_dict())
    checkpoint = tmp_path / "b" / "checkpoint-1"
    checkpoint.mkdir()
    record = json.loads((tmp_path / "b" / RECORD_FILE).read_text())
    record["groups"][-1]["param_names"].pop()
    (checkpoint / RECORD_FILE).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="resume_only_model"):
        build_optimizer("hr_amplifier", model, training_args(tmp_path / "b", learning_rate=REAL_LR,
                                                             resume_from_checkpoint=str(checkpoint)), 10)
    # --resume_only_model starts a fresh optimizer: no layout check, and FIRESAFE_AMP_LR wins over the record.
    monkeypatch.setenv("FIRESAFE_AMP_LR", "4e-3")
    fresh, _, _ = build_optimizer("hr_amplifier", model, training_args(
        tmp_path / "b", learning_rate=REAL_LR, resume_from_checkpoint=str(checkpoint), resume_only_model=True), 10)
    assert fresh.param_groups[-1]["initial_lr"] == 4e-3


def test_swift_training_records_and_resumes_the_groups(trained):
    """The 4-step swift run (conftest: --optimizer hr_amplifier, --learning_rate 5e-3): each checkpoint's optimizer
    state has the named groups at their rates, and hr_optimizer.json names their parameters
    (test_tuner.test_resume_matches_uninterrupted_run resumes it exactly)."""
    from swift_plugins.optimizer import DEFAULT_AMP_LR, RECORD_FILE

    for step in (2, 4):
        checkpoint = trained.run / f"checkpoint-{step}"
        state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
        groups = state["param_groups"]
        assert [g["name"] for g in groups] == ["base", "hr_amplifier", "hr_amplifier_no_decay"]
        assert [g["initial_lr"] for g in groups] == [5e-3, DEFAULT_AMP_LR, DEFAULT_AMP_LR]
        record = json.loads((checkpoint / RECORD_FILE).read_text())
        assert [len(g["params"]) for g in groups] == [len(g["param_names"]) for g in record["groups"]]
        amp = record["groups"][1]["param_names"] + record["groups"][2]["param_names"]
        assert len(amp) == 4 + 3 and all(".hr_amplifier." in n for n in amp)  # gate (4) + one β per layer (3)
