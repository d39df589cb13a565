"""swift_plugins/tuner.py (hr_amplifier) and the High-Risk Feature Amplifier (swift_plugins/_amplifier.py): plain LoRA
at initialisation, its attention bias and gate in the forward pass and in generation, and after training: saved,
reloaded by tools.model.score and swift infer alike, resumed exactly."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.helpers import MAX_PIXELS, last_logits
from tests.swift_plugins.support import sft_args


def fill_betas(amp, value: float) -> None:
    with torch.no_grad():
        for module in amp.attn_bias.values():
            module.bias.fill_(value)


# --------------------------------------------------------------------------- amplifier at initialisation


def test_amplifier_starts_as_plain_lora_and_is_applied(tiny_model, data, tmp_path, loaded):
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from swift.pipelines.train.tuner import prepare_adapter

    from swift_plugins._amplifier import find_amplifier
    from swift_plugins.tuner import HighRiskAmplifierTuner

    base, template = copy.deepcopy(loaded[0]), loaded[1]
    torch.manual_seed(0)
    plain = prepare_adapter(sft_args(tiny_model, tmp_path, "lora"), copy.deepcopy(base))
    torch.manual_seed(0)
    amplified = HighRiskAmplifierTuner.prepare_model(sft_args(tiny_model, tmp_path, "hr_amplifier"), base)
    amp = find_amplifier(amplified)
    assert amp is not None and amp.config.layers == [0, 1, 2]
    assert all(p.requires_grad for p in amp.parameters())
    # Same LoRA in both, and not the identity (LoRA B starts at zero), so the comparison is against LoRA.
    torch.manual_seed(1)
    lora = {k: torch.randn_like(v) * 0.2 for k, v in get_peft_model_state_dict(plain).items()}
    set_peft_model_state_dict(plain, lora)
    set_peft_model_state_dict(amplified, lora)
    plain.eval(), amplified.eval()
    short = copy.deepcopy(data["val_rows"][0])
    short["messages"][0]["content"] = "<image>楼道？"
    batches = {"padded": [*data["val_rows"][:3], short], "single": data["val_rows"][:1]}
    reference = {k: last_logits(plain, template, rows) for k, rows in batches.items()}
    base_logits = last_logits(loaded[0], template, batches["padded"])
    assert (reference["padded"] - base_logits).abs().max() > 1e-3  # the LoRA does something
    for key, rows in batches.items():
        torch.testing.assert_close(last_logits(amplified, template, rows), reference[key], rtol=0, atol=1e-5)

    # Each part really enters the forward pass: moving it moves the logits.
    with torch.no_grad():
        amp.gate.channel.fill_(0.5)
        gate_only = last_logits(amplified, template, batches["padded"])
        amp.gate.channel.zero_()
        fill_betas(amp, 2.0)
        bias_only = {k: last_logits(amplified, template, rows) for k, rows in batches.items()}
        amp.enabled = False  # hooks pass through: plain LoRA again
        off = last_logits(amplified, template, batches["padded"])
    for moved in (gate_only, bias_only["padded"], bias_only["single"]):
        assert (moved - reference["padded" if moved.shape[0] > 1 else "single"]).abs().max() > 1e-4
    torch.testing.assert_close(off, reference["padded"], rtol=0, atol=1e-5)


def test_attention_bias_is_a_logit_bias_on_image_keys(tiny_model, loaded):
    """The hook's mask equals the reference: causal mask + β[h] on image-token keys, padding kept masked."""
    from swift_plugins._amplifier import AmplifierConfig, HighRiskAmplifier, _AttentionHook

    amp = HighRiskAmplifier(AmplifierConfig(hidden_size=8, num_heads=2, layers=[0], visual_token_ids=[9]))
    amp.attn_path = "mask"
    with torch.no_grad():
        amp.attn_bias["0"].bias.copy_(torch.tensor([0.5, -1.0]))
    ids = torch.tensor([[0, 1, 9, 9, 2], [3, 9, 4, 5, 6]])
    amp._ids_hook(None, (ids,))
    hook = _AttentionHook(amp, 0)
    hidden = torch.zeros(2, 5, 8)
    module = SimpleNamespace(layer_idx=0, config=SimpleNamespace(_attn_implementation="sdpa"))
    lowest = torch.finfo(torch.float32).min
    causal = torch.ones(5, 5).tril().bool()
    image = (ids == 9).float()
    expected = torch.where(causal, 0.0, lowest)[None, None] + torch.tensor([0.5, -1.0])[None, :, None, None] * image[
        :, None, None, :]
    _, kw = hook(module, (), {"hidden_states": hidden, "attention_mask": None})  # sdpa without padding
    torch.testing.assert_close(kw["attention_mask"], expected)
    padded = causal[None, None].repeat(2, 1, 1, 1)
    padded[1, :, :, 0] = False  # row 1 is left-padded
    _, kw = hook(module, (), {"hidden_states": hidden, "attention_mask": padded})
    assert (kw["attention_mask"][1, :, :, 0] == lowest).all()
    torch.testing.assert_close(kw["attention_mask"][0], expected[0])
    # A decoding step: one new text query against the prompt's 5 keys + itself.
    amp._ids_hook(None, (torch.tensor([[7], [7]]),))
    cache = SimpleNamespace(get_seq_length=lambda layer: 5)
    _, kw = hook(module, (), {"hidden_states": torch.zeros(2, 1, 8), "attention_mask": None,
                              "past_key_values": cache})
    torch.testing.assert_close(kw["attention_mask"][:, :, 0, :5], expected[:, :, -1, :])
    assert (kw["attention_mask"][:, :, 0, 5] == 0).all()
    with pytest.raises(NotImplementedError):  # a 2-D padding mask (padding_free) cannot carry a bias
        hook(module, (), {"hidden_states": hidden, "attention_mask": torch.ones(2, 5)})
    flash = SimpleNamespace(layer_idx=0, config=SimpleNamespace(_attn_implementation="flash_attention_2"))
    with pytest.raises(NotImplementedError, match="sdpa"):
        hook(flash, (), {"hidden_states": hidden, "attention_mask": None})


@pytest.mark.parametrize("padded", [False, True])
def test_fused_attention_bias_equals_the_mask_path(padded, monkeypatch):
    """FIRESAFE_AMP_ATTN=fused (β as one more head dimension, SDPA unmasked and causal) gives the mask path's logits
    and gradients (LoRA, gate and β), with and without padding; only the biased layers' SDPA calls change."""
    from swift_plugins._amplifier import KEY_PAD
    from tests.swift_plugins.support import micro_amplified, micro_batch

    model, amp = micro_amplified(layers=3)
    with torch.no_grad():
        for module in amp.attn_bias.values():
            module.bias.copy_(torch.randn_like(module.bias) * 2)
    inputs, target = micro_batch(4)
    if padded:
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        inputs["attention_mask"][1, -2:] = 0
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        if q.shape[1] == 4:  # the language model's 4 heads (the vision tower has 2)
            calls.append((q.shape[-1], attn_mask is None, kw.get("is_causal")))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    results = {}
    for path in ("mask", "fused"):
        amp.attn_path = path
        model.zero_grad()
        calls.clear()
        logits = model(**inputs, logits_to_keep=1).logits[:, -1]
        torch.nn.functional.cross_entropy(logits[:, :5].float(), target).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[path] = (logits.detach(), grads, list(calls))
    (mask_logits, mask_grads, mask_calls), (fused_logits, fused_grads, fused_calls) = results["mask"], results["fused"]
    torch.testing.assert_close(fused_logits, mask_logits, rtol=0, atol=1e-5)
    assert fused_grads.keys() == mask_grads.keys() and any("attn_bias" in n for n in fused_grads)
    for name, grad in mask_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    head_dim = 64 // 4
    assert mask_calls == [(head_dim, False, False)] * 3  # mask path: a full additive mask in every layer
    if padded:
        assert fused_calls == [(head_dim + KEY_PAD, False, False)] * 3  # the padding mask, as transformers made it
    else:  # no mask at all: SDPA's causal kernels
        assert fused_calls == [(head_dim + KEY_PAD, True, True)] * 3


def test_fused_attention_path_knob(monkeypatch):
    from swift_plugins._amplifier import attn_path_from_env

    monkeypatch.delenv("FIRESAFE_AMP_ATTN", raising=False)
    assert attn_path_from_env() == "fused"
    monkeypatch.setenv("FIRESAFE_AMP_ATTN", "Mask")
    assert attn_path_from_env() == "mask"
    monkeypatch.setenv("FIRESAFE_AMP_ATTN", "flash")
    with pytest.raises(ValueError, match="FIRESAFE_AMP_ATTN"):
        attn_path_from_env()


def test_amplifier_in_generation_matches_full_forward(loaded, data):
    """Decoding with a KV cache (swift infer with several new tokens) applies the bias to the prompt's image keys."""
    from swift.utils import to_device

    from swift_plugins._amplifier import attach_new

    model, template = copy.deepcopy(loaded[0]).eval(), loaded[1]
    amp = attach_new(model, "all")
    with torch.no_grad():
        amp.gate.channel.fill_(0.3)
    fill_betas(amp, 3.0)
    rows = [copy.deepcopy(r) for r in data["val_rows"][:2]]
    rows[1]["messages"][0]["content"] = "<image>楼道？"  # a shorter prompt: left padding
    from swift.infer_engine import InferRequest

    encoded = [template.encode(InferRequest(messages=r["messages"][:1], images=r["images"])) for r in rows]
    inputs = to_device(template.data_collator(encoded), model.device)
    inputs.pop("labels", None)
    inputs.pop("position_ids", None)  # let transformers derive the 3-D positions, for the cached and full passes alike
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, min_new_tokens=3)
        stepwise = torch.stack(out.logits, 1).float()  # [B, 3, V]: logits of each generated position
        n = inputs["input_ids"].shape[1]
        full = dict(inputs)
        for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
            if key in full:
                extra = out.sequences[:, n:n + 2] if key == "input_ids" else torch.full_like(
                    out.sequences[:, n:n + 2], 1 if key == "attention_mask" else 0)
                full[key] = torch.cat([full[key], extra.to(full[key].dtype)], 1)
        whole = model(**full).logits[:, -3:].float()
        amp.enabled = False
        plain = model(**full).logits[:, -3:].float()
    torch.testing.assert_close(stepwise, whole, rtol=0, atol=1e-4)
    assert (whole - plain).abs().max() > 1e-3  # the bias is large enough that skipping it would show


# --------------------------------------------------------------------------- training, saving, reloading
def amplifier_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    import safetensors.torch

    return safetensors.torch.load_file(str(checkpoint / "amplifier.safetensors"))


def test_training_moves_and_saves_the_amplifier(trained):
    run = trained.run
    assert {p.name for p in run.glob("checkpoint-*")} >= {"checkpoint-2", "checkpoint-4"}
    ckpt = run / "checkpoint-4"
    assert (ckpt / "adapter_model.safetensors").exists() and (ckpt / "amplifier_config.json").exists()
    final, middle = amplifier_tensors(ckpt), amplifier_tensors(run / "checkpoint-2")
    # One parameter per biased layer (layers 0, 1, 2 of the 3-layer model).
    assert set(final) == {"gate.channel", "gate.token_scale", "gate.probe", "gate.probe_bias",
                          "attn_bias.0.bias", "attn_bias.1.bias", "attn_bias.2.bias"}
    for name in ("gate.channel", "gate.token_scale", "attn_bias.0.bias", "attn_bias.2.bias"):
        assert final[name].abs().max() > 1e-3, name      # started at exactly zero
        assert not torch.equal(final[name], middle[name]), name


def test_swift_infer_and_score_reproduce_training(trained, data, tmp_path):
    from swift import infer_main

    from swift_plugins._amplifier import find_amplifier
    from tools.model.infer import load, score_rows

    ckpt = trained.run / "checkpoint-4"
    args = json.loads((ckpt / "args.json").read_text())
    assert args["tuner_type"] == "hr_amplifier" and all(Path(p).is_absolute() for p in args["external_plugins"])
    captured = trained.captured["logits"]
    # tools.model.score (used by test.sh) loads the checkpoint through swift, amplifier included.
    model, template, label_ids, _ = load(["--adapters", str(ckpt), "--max_pixels", MAX_PIXELS])
    torch.testing.assert_close(last_logits(model, template, data["val_rows"]), captured, rtol=0, atol=1e-5)
    probs = score_rows(model, template, label_ids, data["val_rows"], batch_size=5, progress=False)
    np.testing.assert_allclose(probs, trained.captured["probs"], rtol=0, atol=1e-6)
    find_amplifier(model).enabled = False
    without = torch.log_softmax(last_logits(model, template, data["val_rows"]), -1)
    # swift infer (generation, logprobs of the first answer token).
    result = tmp_path / "infer.jsonl"
    infer_main(["--adapters", str(ckpt), "--val_dataset", str(data["val"]), "--max_new_tokens", "1",
                "--temperature", "0", "--logprobs", "true", "--top_logprobs", "5", "--max_batch_size", "5",
                "--max_pixels", MAX_PIXELS, "--result_path", str(result)])
    rows = [json.loads(line) for line in result.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == len(data["val_rows"])
    got = np.array([[t["logprob"] for t in r["logprobs"]["content"][0]["top_logprobs"]] for r in rows])
    want = torch.log_softmax(captured, -1).topk(5).values.numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    # ... and not what the model gives without the amplifier, so the match above is not a coincidence.
    assert np.abs(got - without.topk(5).values.numpy()).max() > 2e-4


def test_merged_and_compiled_scoring_keeps_the_amplifier(trained, data, monkeypatch):
    """test.sh's speed knobs on an amplifier checkpoint: merging folds only the LoRA part into the weights (the
    amplifier is a submodule of the base model and its hooks stay), and compiled decoder layers run its attention
    hooks too: the logits training saw."""
    from swift_plugins._amplifier import find_amplifier
    from tools.model.infer import load

    monkeypatch.setenv("SCORE_MERGE", "1")
    monkeypatch.setenv("SCORE_COMPILE_LLM", "1")
    model, template, _, _ = load(["--adapters", str(trained.run / "checkpoint-4"), "--max_pixels", MAX_PIXELS])
    assert not any("lora_" in name for name, _ in model.named_parameters())  # merged
    assert find_amplifier(model) is not None
    torch.testing.assert_close(last_logits(model, template, data["val_rows"]), trained.captured["logits"], rtol=0,
                               atol=1e-5)
    find_amplifier(model).enabled = False  # ... and the amplifier is what makes them so
    assert (last_logits(model, template, data["val_rows"]) - trained.captured["logits"]).abs().max() > 1e-4


def test_zeroed_amplifier_changes_outputs(trained, data, tmp_path):
    import safetensors.torch

    from swift_plugins._amplifier import find_amplifier
    from tools.model.infer import load

    ckpt = tmp_path / "zeroed"
    shutil.copytree(trained.run / "checkpoint-4", ckpt)
    tensors = amplifier_tensors(ckpt)
    zeroed = {k: (v if k in ("gate.probe", "gate.probe_bias") else torch.zeros_like(v)) for k, v in tensors.items()}
    safetensors.torch.save_file(zeroed, str(ckpt / "amplifier.safetensors"))
    model, template, label_ids, _ = load(["--adapters", str(ckpt), "--max_pixels", MAX_PIXELS])
    logits = last_logits(model, template, data["val_rows"])
    assert (logits - trained.captured["logits"]).abs().max() > 1e-4  # the trained amplifier was really applied
    find_amplifier(model).enabled = False  # zero weights are the identity: plain LoRA
    torch.testing.assert_close(last_logits(model, template, data["val_rows"]), logits, rtol=0, atol=1e-5)


def test_checkpoint_of_the_earlier_layout_loads(trained, data, tmp_path):
    """amplifier.safetensors written before one parameter per layer (one `attn_bias` tensor [layers, heads]) loads
    row by row into the per-layer parameters: the same logits as the checkpoint it was converted from."""
    import safetensors.torch

    from swift_plugins._amplifier import AmplifierConfig, HighRiskAmplifier, find_amplifier
    from tools.model.infer import load

    ckpt = tmp_path / "old"
    shutil.copytree(trained.run / "checkpoint-4", ckpt)
    tensors = amplifier_tensors(ckpt)
    layers = json.loads((ckpt / "amplifier_config.json").read_text())["layers"]
    old = {k: v for k, v in tensors.items() if not k.startswith("attn_bias.")}
    old["attn_bias"] = torch.stack([tensors[f"attn_bias.{layer}.bias"] for layer in layers])
    assert old["attn_bias"].abs().min() > 0  # trained values, distinct per layer and head
    safetensors.torch.save_file(old, str(ckpt / "amplifier.safetensors"))
    model, template, _, _ = load(["--adapters", str(ckpt), "--max_pixels", MAX_PIXELS])
    torch.testing.assert_close(find_amplifier(model).betas(), old["attn_bias"], rtol=0, atol=0)
    torch.testing.assert_close(last_logits(model, template, data["val_rows"]), trained.captured["logits"], rtol=0,
                               atol=1e-5)
    # A tensor of another shape is not silently dropped: strict loading reports it.
    amp = HighRiskAmplifier(AmplifierConfig(hidden_size=96, num_heads=4, layers=layers, visual_token_ids=[1]))
    wrong = dict(old, attn_bias=torch.zeros(len(layers) + 1, 4))
    with pytest.raises(RuntimeError, match="attn_bias"):
        amp.load_state_dict(wrong, strict=True)


def test_resume_matches_uninterrupted_run(trained, tiny_model, data, tmp_path):
    from safetensors.torch import load_file

    resumed = tmp_path / "resumed"
    trained.sft(resumed, tiny_model, data, "--resume_from_checkpoint", str(trained.run / "checkpoint-2"))
    for name in ("amplifier.safetensors", "adapter_model.safetensors"):
        got, want = load_file(str(resumed / "checkpoint-4" / name)), load_file(str(trained.run / "checkpoint-4" / name))
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=f"{name}: {key}")


def test_visual_gate_with_bf16_parameters_computes_in_float32():
    """DeepSpeed's bf16 mode casts every parameter, the gate's too, to bf16 (found on the H200 under ZeRO-2): the
    gate still computes in float32 and returns the input's dtype, equal to the float32 gate up to bf16 rounding of
    its parameters."""
    from swift_plugins._amplifier import VisualGate

    torch.manual_seed(0)
    gate = VisualGate(16)
    with torch.no_grad():
        gate.channel.uniform_(-0.1, 0.1)
        gate.token_scale.fill_(0.5)
    x = torch.randn(2, 5, 16)
    reference = gate(x)
    bf16 = copy.deepcopy(gate).to(torch.bfloat16)
    for inputs in (x, x.to(torch.bfloat16)):
        out = bf16(inputs)
        assert out.dtype == inputs.dtype
        torch.testing.assert_close(out.float(), reference, atol=0.05, rtol=0.02)
