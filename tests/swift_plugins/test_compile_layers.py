"""swift_plugins/patches/compile_layers.py: FIRESAFE_COMPILE_LAYERS=1 compiles the decoder layers once swift has
prepared the model, and training through them (LoRA with dropout, the amplifier's fused bias, checkpoint recompute)
gives eager's logits and gradients."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch._inductor.config

cl = pytest.importorskip("swift_plugins.patches.compile_layers")
from tests.swift_plugins.support import micro_batch, micro_model  # noqa: E402


@pytest.fixture
def dynamo_config():
    """compile_decoder_layers sets process-wide compile settings: put them back, and drop the graphs."""
    with torch._inductor.config.patch(fallback_random=torch._inductor.config.fallback_random), \
            torch._dynamo.config.patch(cache_size_limit=torch._dynamo.config.cache_size_limit,
                                       suppress_errors=torch._dynamo.config.suppress_errors):
        yield
    torch._dynamo.reset()


def step(model, inputs, target):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # the dropout masks
    logits = model(**inputs, logits_to_keep=1).logits[:, -1]
    torch.nn.functional.cross_entropy(logits[:, :5].float(), target).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("reentrant", [True, False])  # swift: reentrant on one GPU, not under DDP
def test_compiled_layers_train_like_eager(reentrant, dynamo_config):
    from peft import LoraConfig, get_peft_model

    from swift_plugins._amplifier import attach_new

    # LoRA with dropout (swift's default 0.05, here 0.1): masks that a recomputed layer must draw again
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.1)
    model = get_peft_model(micro_model(layers=2), lora)
    amp = attach_new(model, "all")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at 0, which would hide the dropout
                param.normal_(0, 0.1)
        for module in amp.attn_bias.values():
            module.bias.copy_(torch.randn_like(module.bias))
    model.train()
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.get_base_model().enable_input_require_grads()
    inputs, target = micro_batch(4)
    eager_logits, eager_grads = step(model, inputs, target)
    torch.manual_seed(7)  # the dropout is live: another draw gives other logits
    assert (model(**inputs, logits_to_keep=1).logits[:, -1].detach() - eager_logits).abs().max() > 1e-4
    assert cl.compile_decoder_layers(model) == 2
    layers = model.get_base_model().model.language_model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    torch._dynamo.config.suppress_errors = False  # here a graph that fails must fail the test, not run eagerly
    torch._dynamo.utils.counters.clear()
    logits, grads = step(model, inputs, target)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the layers did run compiled
    torch.testing.assert_close(logits, eager_logits, rtol=0, atol=1e-5)
    assert grads.keys() == eager_grads.keys() and any("lora_A" in n for n in grads)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_swift_prepares_the_model_then_compiles_only_when_asked(monkeypatch):
    from swift.trainers.mixin import SwiftMixin

    assert getattr(SwiftMixin._prepare_gradient_checkpointing, "__wrapped_original__", None) is not None
    calls = []
    monkeypatch.setattr(cl._prepare_gradient_checkpointing, "__wrapped_original__",
                        lambda self, model: calls.append(("prepare", model)))
    monkeypatch.setattr(cl, "compile_decoder_layers", lambda model: calls.append(("compile", model)) or 2)
    monkeypatch.delenv(cl.ENV, raising=False)
    cl._prepare_gradient_checkpointing(None, "model")
    assert calls == [("prepare", "model")]
    monkeypatch.setenv(cl.ENV, "1")
    cl._prepare_gradient_checkpointing(None, "model")
    assert calls[1:] == [("prepare", "model"), ("compile", "model")]
    monkeypatch.setenv(cl.ENV, "yes")
    with pytest.raises(ValueError, match=cl.ENV):
        cl.wanted()


def test_a_model_without_decoder_layers_names_the_knob():
    with pytest.raises(ValueError, match=cl.ENV):
        cl.compile_decoder_layers(torch.nn.Linear(2, 2))


def test_zero3_partitioned_layers_stay_eager(dynamo_config):
    from tests.swift_plugins.support import fake_zero3

    model = micro_model(layers=2)
    layers = model.model.language_model.layers
    with fake_zero3(layers.modules()):
        assert cl.compile_decoder_layers(model) == 0
    assert all(layer._compiled_call_impl is None for layer in layers)
    assert cl.compile_decoder_layers(model) == 2  # the same model, not partitioned


def test_compiled_layers_save_the_same_adapter(dynamo_config):
    """Layers compiled in place keep their parameter names: the adapter swift saves (and `swift infer --adapters`,
    test.sh's scoring, resume read) is the eager one's, key for key."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    model = get_peft_model(micro_model(layers=2), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    before = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    names = list(model.state_dict())
    assert cl.compile_decoder_layers(model) == 2
    after = get_peft_model_state_dict(model)
    assert list(model.state_dict()) == names and after.keys() == before.keys() and before
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_dynamos_triton_kernel_warning_shows_once_without_its_traceback():
    import logging

    log = logging.getLogger("torch._dynamo")
    saved = list(log.filters)
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep()
    log.addHandler(handler)
    try:
        cl.quiet_triton_access_warnings()
        cl.quiet_triton_access_warnings()  # once per process, however often swift prepares a model
        assert sum(isinstance(f, cl._TritonAccessWarningOnce) for f in log.filters) == 1
        for _ in range(3):  # as torch 2.11 logs it for each liger kernel it traces
            try:
                raise AttributeError("'float' object has no attribute 'to'")
            except AttributeError:
                log.warning("Encountered an exception in identify_mutated_tensors, assuming every input is mutated",
                            exc_info=True)
        log.warning("Graph break in user code")  # dynamo's other warnings pass as they are
    finally:
        log.removeHandler(handler)
        log.filters[:] = saved
    assert [r.getMessage() for r in records] == [
        "Encountered an exception in identify_mutated_tensors, assuming every input is mutated (repeats and "
        "tracebacks hidden: swift_plugins/patches/compile_layers.py)", "Graph break in user code"]
    assert records[0].exc_info is None
