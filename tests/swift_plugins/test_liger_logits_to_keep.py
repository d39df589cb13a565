"""swift_plugins/patches/liger_logits_to_keep.py: liger's Qwen2.5-VL forward, wrapped, returns the logits of the kept
positions (what transformers' own forward returns) and hands its fused loss the kept hidden states only."""
from __future__ import annotations

import inspect
from types import MethodType

import pytest
import torch

pytest.importorskip("liger_kernel")
patch = pytest.importorskip("swift_plugins.patches.liger_logits_to_keep")
from liger_kernel.transformers.model import qwen2_5_vl as liger_qwen  # noqa: E402

from tests.swift_plugins.support import micro_model  # noqa: E402


@pytest.fixture(autouse=True)
def turned_on():
    patch.apply(enabled=True)  # FIRESAFE_LIGER_KEEP=1 (the default)
    yield
    patch.apply()


def liger_model():
    """The tiny model, and liger's forward, wrapped, bound to it."""
    model = micro_model(layers=2).eval()
    assert liger_qwen.lce_forward.__wrapped_original__
    wrapped = MethodType(liger_qwen.lce_forward, model)
    return model, wrapped


def test_swift_sees_logits_to_keep_and_turns_trimming_on():
    # swift.trainers.mixin.get_use_logits_to_keep: on only when the forward names the argument
    assert "logits_to_keep" in inspect.signature(liger_qwen.lce_forward).parameters
    assert "logits_to_keep" not in inspect.signature(liger_qwen.lce_forward.__wrapped_original__).parameters


@pytest.mark.parametrize("keep", [3, "mask"])
def test_logits_of_the_kept_positions_as_transformers(keep):
    model, liger_forward = liger_model()
    ids = torch.randint(0, 240, (2, 11), generator=torch.Generator().manual_seed(0))
    if keep == "mask":  # swift's form for one packed row: a boolean mask over the positions
        keep = torch.zeros(11, dtype=torch.bool)
        keep[[4, 9, 10]] = True
    with torch.no_grad():
        expected = model(input_ids=ids, logits_to_keep=keep).logits
        got = liger_forward(input_ids=ids, logits_to_keep=keep).logits
        full = liger_forward(input_ids=ids).logits
    assert got.shape == expected.shape == (2, 3, 256) and full.shape == (2, 11, 256)
    torch.testing.assert_close(got, expected)
    assert not model.model._forward_hooks  # the cut is removed after each call


def test_the_fused_loss_gets_the_kept_hidden_states(monkeypatch):
    model, liger_forward = liger_model()
    seen = {}

    def loss(hidden_states, lm_head_weight, labels, shift_labels, hidden_size, **kw):
        seen.update(hidden=hidden_states.shape, labels=labels.shape)
        return hidden_states.view(-1, hidden_size).sum() * 0  # as liger flattens them: needs a contiguous cut

    monkeypatch.setattr(liger_qwen, "LigerForCausalLMLoss", loss)
    monkeypatch.setattr(liger_qwen, "unpack_cross_entropy_result", lambda r: (r, None, None, None))
    model.train()
    ids = torch.randint(0, 240, (2, 11), generator=torch.Generator().manual_seed(0))
    liger_forward(input_ids=ids, labels=ids[:, -4:], logits_to_keep=4)  # labels trimmed by swift to the same 4
    assert seen == {"hidden": (2, 4, 64), "labels": (2, 4)}


def test_on_by_default_and_off_with_0(monkeypatch):
    """On unless FIRESAFE_LIGER_KEEP=0: liger's evaluation forward must not return full-sequence logits (run AD)."""
    import importlib

    monkeypatch.delenv("FIRESAFE_LIGER_KEEP", raising=False)
    importlib.reload(patch)
    assert patch.ENABLED
    assert "logits_to_keep" in inspect.signature(liger_qwen.lce_forward).parameters
    monkeypatch.setenv("FIRESAFE_LIGER_KEEP", "0")
    importlib.reload(patch)
    assert not patch.ENABLED
    assert not hasattr(liger_qwen.lce_forward, "__wrapped_original__")
    assert "logits_to_keep" not in inspect.signature(liger_qwen.lce_forward).parameters
    monkeypatch.delenv("FIRESAFE_LIGER_KEEP")
    importlib.reload(patch)  # the default again for the tests after this one
    assert patch.ENABLED


def test_installing_the_patch_does_not_import_liger():
    """A scoring load imports every plugin: liger (~1 s) is imported only by runs that use it, and then wrapped."""
    import os
    import subprocess
    import sys

    code = ("import sys; import swift_plugins.patches.liger_logits_to_keep as p; "
            "assert p.LIGER_QWEN not in sys.modules, 'imported'; "
            "from liger_kernel.transformers.model import qwen2_5_vl as q; "
            "assert q.lce_forward.__wrapped_original__; print('ok')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "FIRESAFE_LIGER_KEEP": "1"})
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
