"""swift_plugins/patches/checkpoint_layers.py: FIRESAFE_CKPT_SKIP_LAYERS=N leaves the last N language-model layers
without recompute, the vision tower and the results untouched."""
from __future__ import annotations

import importlib

import pytest
import torch

cl = pytest.importorskip("swift_plugins.patches.checkpoint_layers")
from tests.swift_plugins.support import micro_model  # noqa: E402


def flags(model):
    return ([layer.gradient_checkpointing for layer in model.model.language_model.layers],
            [block.gradient_checkpointing for block in model.model.visual.blocks])


def grads(model, n_skip, monkeypatch):
    monkeypatch.setenv(cl.ENV, str(n_skip))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model.zero_grad(set_to_none=True)
    ids = torch.randint(0, 240, (2, 9), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_the_last_layers_keep_their_activations(monkeypatch):
    model = micro_model()
    monkeypatch.setenv(cl.ENV, "1")
    model.gradient_checkpointing_enable()
    assert flags(model) == ([True, True, True, False], [True, True])
    monkeypatch.setenv(cl.ENV, "10")  # more than there are: none recomputed
    model.gradient_checkpointing_enable()
    assert flags(model)[0] == [False] * 4
    monkeypatch.setenv(cl.ENV, "0")
    model.gradient_checkpointing_enable()
    assert flags(model) == ([True] * 4, [True, True])
    assert cl.decoder_layers(model) is model.model.language_model.layers


def test_same_gradients_as_full_checkpointing(monkeypatch):
    model = micro_model()
    full = grads(model, 0, monkeypatch)
    calls = []
    for layer in model.model.language_model.layers:  # count the layers run under checkpoint
        layer.register_forward_pre_hook(lambda m, a: calls.append(m.gradient_checkpointing))
    part = grads(model, 2, monkeypatch)
    assert calls == [True, True, False, False, True, True]  # 4 forwards, the 2 checkpointed ones recomputed
    assert set(part) == set(full)
    for n in full:
        torch.testing.assert_close(part[n], full[n])


def test_bad_knob(monkeypatch):
    monkeypatch.setenv(cl.ENV, "-1")
    with pytest.raises(ValueError, match=cl.ENV):
        importlib.reload(cl)
    monkeypatch.setenv(cl.ENV, "0")
    importlib.reload(cl)
