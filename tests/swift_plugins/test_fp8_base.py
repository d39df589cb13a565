"""swift_plugins/patches/fp8_base.py: FIRESAFE_FP8_BASE=1 puts the language model's frozen linear layers in float8
when swift starts training; LoRA then trains through them (recompute included) close to the unconverted model, and
saves the same adapter."""
from __future__ import annotations

import copy

import pytest
import torch

fb = pytest.importorskip("swift_plugins.patches.fp8_base")
from tests.swift_plugins.support import micro_batch, micro_loss, micro_model  # noqa: E402
from tools.model.fp8 import Fp8Linear  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


def lora_model(layers=2):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(micro_model(layers=layers), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                  lora_dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at 0: the adapter's own gradient path would be trivial
                param.normal_(0, 0.1)
    return model


def grads(model, inputs, target):
    model.zero_grad(set_to_none=True)
    loss = micro_loss(model, inputs, target)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_trains_through_float8_weights_close_to_the_original(checkpointing):
    from peft import get_peft_model_state_dict

    model = lora_model()
    model.train()
    if checkpointing:  # the recompute runs the float8 forward again
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.get_base_model().enable_input_require_grads()
    reference = copy.deepcopy(model)
    adapter_keys = list(get_peft_model_state_dict(model))
    inputs, target = micro_batch(8)
    ref_loss, ref_grads = grads(reference, inputs, target)

    replaced, freed = fb.convert(model)
    assert replaced == 7 * 2  # q, k, v, o, gate, up, down in each layer: under an adapter or not
    layers = model.get_base_model().model.language_model.layers
    for layer in layers:
        assert isinstance(layer.self_attn.q_proj.base_layer, Fp8Linear)  # PEFT's base layer
        assert isinstance(layer.self_attn.k_proj, Fp8Linear)  # a projection without an adapter
        assert layer.self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32  # the adapter is untouched
    assert freed == sum(p.numel() for layer in reference.get_base_model().model.language_model.layers
                        for n, p in layer.named_parameters() if "lora" not in n and n.endswith("weight")
                        and p.dim() == 2) * 3  # float32 -> float8: 3 bytes freed per weight
    assert fb.convert(model) == (0, 0)  # already float8
    assert not any(isinstance(m, Fp8Linear) for m in model.get_base_model().model.visual.modules())
    assert list(get_peft_model_state_dict(model)) == adapter_keys  # the checkpoint swift saves is the same adapter

    loss, fp8_grads = grads(model, inputs, target)
    assert fp8_grads.keys() == ref_grads.keys() and any("lora_A" in n for n in fp8_grads)
    assert abs(loss - ref_loss) < 0.02 * abs(ref_loss) and loss != ref_loss
    flat, ref_flat = (torch.cat([g[n].flatten() for n in sorted(ref_grads)]) for g in (fp8_grads, ref_grads))
    assert torch.nn.functional.cosine_similarity(flat, ref_flat, dim=0) > 0.99
    assert (flat - ref_flat).norm() / ref_flat.norm() < 0.1

    # and it learns: a few steps on the batch lower its loss
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(10):
        opt.zero_grad()
        micro_loss(model, inputs, target).backward()
        opt.step()
    assert micro_loss(model, inputs, target).item() < 0.8 * loss


def test_ddp_leaves_the_float8_buffers_alone():
    model = lora_model(layers=1)
    fb.convert(model)
    fb.ignore_in_ddp(model)
    names = model._ddp_params_and_buffers_to_ignore
    buffers = dict(model.named_buffers())
    assert len(names) == 7 * 3 - 4 and all(n in buffers for n in names)  # weight, scale, bias (q, k, v have biases)
    assert {buffers[n].dtype for n in names if n.endswith(".weight")} == {torch.float8_e4m3fn}


def test_zero3_partitioned_layers_stay():
    from tests.swift_plugins.support import fake_zero3

    model = micro_model(layers=2)
    for p in model.parameters():
        p.requires_grad_(False)
    layers = model.model.language_model.layers
    with fake_zero3(layers.modules()):
        assert fb.convert(model) == (0, 0)
    assert fb.convert(model)[0] == 14  # the same model, not partitioned


def test_a_model_without_decoder_layers_names_the_knob():
    with pytest.raises(ValueError, match=fb.ENV):
        fb.convert(torch.nn.Linear(16, 16))


def test_swift_converts_when_training_starts_only_when_asked(monkeypatch):
    from swift.trainers.mixin import SwiftMixin

    # installed (by this module, or by swift's own import of the file by path: another module object, same code)
    assert SwiftMixin.train.__code__.co_filename == fb.train.__code__.co_filename
    assert SwiftMixin.train.__wrapped_original__ is not None
    calls = []

    class Trainer:
        model = "wrapped"

        class accelerator:  # noqa: N801 - stands for accelerate's Accelerator
            @staticmethod
            def unwrap_model(model):
                return torch.nn.Module()

    monkeypatch.setattr(fb.train, "__wrapped_original__", lambda self, *a, **k: calls.append(("train", a, k)) or "done")
    monkeypatch.setattr(fb, "convert", lambda model: calls.append(("convert", type(model).__name__)) or (3, 2**30))
    monkeypatch.setattr(fb, "ignore_in_ddp", lambda model: calls.append(("ddp",)))
    monkeypatch.delenv(fb.ENV, raising=False)
    assert fb.train(Trainer(), resume_from_checkpoint=None) == "done"
    assert calls == [("train", (), {"resume_from_checkpoint": None})]
    monkeypatch.setenv(fb.ENV, "1")
    assert fb.train(Trainer()) == "done"
    assert calls[1:] == [("convert", "Module"), ("ddp",), ("train", (), {})]
    monkeypatch.setenv(fb.ENV, "yes")
    with pytest.raises(ValueError, match=fb.ENV):
        fb.wanted()
