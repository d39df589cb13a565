"""Helpers of the plugin tests (no tests here): swift's parsed arguments, a very small Qwen2.5-VL with LoRA and the
amplifier for loops of many steps, and a fake of DeepSpeed ZeRO-3's parameter partitioning."""
from __future__ import annotations

import sys
import types
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from tests.helpers import base_args


def sft_args(model_dir: Path, tmp: Path, tuner: str, *extra: str):
    """swift's SftArguments for the tiny demo model (they are also the trainer's TrainingArguments)."""
    from swift.arguments import SftArguments
    from swift.utils import parse_args

    with pytest.MonkeyPatch.context() as mp:  # parsing sets TENSORBOARD_LOGGING_DIR if unset: keep it local
        mp.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
        args, rest = parse_args(SftArguments, base_args(model_dir, train=True) + [
            "--dataset", str(tmp / "none.jsonl"), "--output_dir", str(tmp / "out"), "--add_version", "false",
            "--tuner_type", tuner, "--lora_rank", "4", *extra])
    assert not rest
    return args


# --------------------------------------------------------------------------- a very small model for many steps
IMAGE_TOKEN = 250


def micro_model(layers: int = 4, seed: int = 0):
    """A random Qwen2.5-VL with a 256-token vocabulary (a forward + backward takes milliseconds on CPU)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[1]),
        image_token_id=IMAGE_TOKEN, video_token_id=251, vision_start_token_id=252, vision_end_token_id=253)
    config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config)


def micro_amplified(layers: int = 4, seed: int = 0):
    """micro_model with a PEFT LoRA on q/v and the amplifier on every layer, as the hr_amplifier tuner builds it."""
    from peft import LoraConfig, get_peft_model

    from swift_plugins._amplifier import attach_new

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(micro_model(layers, seed), lora)
    return model, attach_new(model, "all")


def micro_batch(batch: int = 8, seed: int = 0) -> tuple[dict, torch.Tensor]:
    """(model inputs, target class): each row an image of 4 merged tokens (4x4 patches) then 6 text tokens; the
    target (row % 5) is what a loss on the last position's first five logits learns."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.full((batch, 1), 252), torch.full((batch, 4), IMAGE_TOKEN), torch.full((batch, 1), 253),
                     torch.randint(0, 200, (batch, 6), generator=g)], 1)
    inputs = {"input_ids": ids, "pixel_values": torch.randn(batch * 16, 3 * 2 * 14 * 14, generator=g),
              "image_grid_thw": torch.tensor([[1, 4, 4]] * batch)}
    return inputs, torch.arange(batch) % 5


@contextmanager
def one_thread():
    """Tiny ops run faster on one thread, the more so on a shared machine (130 steps: ~2 s instead of ~15 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def micro_loss(model, inputs: dict, target: torch.Tensor) -> torch.Tensor:
    logits = model(**inputs, logits_to_keep=1).logits[:, -1]
    return torch.nn.functional.cross_entropy(logits[:, :5].float(), target)


def training_args(tmp: Path, **kw):
    """swift's TrainingArguments (swift's defaults: AdamW, β2 0.95, weight decay 0.1, cosine schedule)."""
    from swift.trainers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp), report_to=[], **kw)


class StubTrainer:
    """What swift's OptimizerCallbacks read from the trainer, and HF's create_optimizer/create_scheduler need."""
    from transformers import Trainer as _Hf

    get_decay_parameter_names = _Hf.get_decay_parameter_names
    get_optimizer_cls_and_kwargs = staticmethod(_Hf.get_optimizer_cls_and_kwargs)
    optimizer_cls_and_kwargs = None

    def __init__(self, model, args):
        self.model, self.args = model, args
        self.optimizer = self.lr_scheduler = None
        self.callbacks: list = []

    def add_callback(self, callback):
        self.callbacks.append(callback)


def build_optimizer(name: str, model, args, steps: int):
    """swift's optimizer plugin `name` (optimizers_map) on a stub trainer: (optimizer, scheduler, callback)."""
    from swift.optimizers import optimizers_map

    import swift_plugins.optimizer  # noqa: F401  registers hr_amplifier

    trainer = StubTrainer(model, args)
    callback = optimizers_map[name](args, trainer)
    callback.create_optimizer_and_scheduler(steps)
    return trainer.optimizer, trainer.lr_scheduler, callback


# --------------------------------------------------------------------------- DeepSpeed ZeRO-3, faked on CPU
class FakeZero3:
    """ZeRO-3's partitioning of the given modules' own parameters, on one process: each parameter is an empty
    tensor (with DeepSpeed's ds_id / ds_numel / ds_shape) except inside its owner module's forward, as DeepSpeed's
    module hooks gather them (forward only: nothing here is differentiated). `gathered_parameters` stands in for
    deepspeed.zero.GatheredParameters."""

    def __init__(self, modules):
        self.full: dict = {}
        self.handles = []
        for module in modules:
            own = list(module.parameters(recurse=False))
            if not own:
                continue
            for p in own:
                self.full[p] = p.data
                p.ds_id, p.ds_numel, p.ds_shape = len(self.full), p.numel(), tuple(p.shape)
                p.data = p.data.new_empty(0)
            self.handles.append(module.register_forward_pre_hook(lambda m, a, own=own: self._gather(own)))
            self.handles.append(module.register_forward_hook(lambda m, a, o, own=own: self._release(own)))

    def _gather(self, params):
        for p in params:
            if p in self.full:
                p.data = self.full[p]

    def _release(self, params):
        for p in params:
            if p in self.full:
                p.data = p.data.new_empty(0)

    @contextmanager
    def gathered_parameters(self, params, modifier_rank=None):
        params = list(params)
        self._gather(params)
        try:
            yield
        finally:
            self._release(params)

    def fake_deepspeed(self) -> types.ModuleType:
        module = types.ModuleType("deepspeed")
        module.zero = types.SimpleNamespace(GatheredParameters=self.gathered_parameters)
        return module

    def restore(self):
        for handle in self.handles:
            handle.remove()
        for p, data in self.full.items():
            p.data = data
            del p.ds_id, p.ds_numel, p.ds_shape


@contextmanager
def fake_zero3(modules, deepspeed: bool = False):
    """FakeZero3 for the block; with deepspeed=True a fake `deepspeed` module (GatheredParameters) is importable."""
    fake = FakeZero3(modules)
    saved = sys.modules.get("deepspeed")
    if deepspeed:
        sys.modules["deepspeed"] = fake.fake_deepspeed()
    else:
        sys.modules["deepspeed"] = None  # import deepspeed -> ImportError, as on this machine
    try:
        yield fake
    finally:
        fake.restore()
        if saved is None:
            sys.modules.pop("deepspeed", None)
        else:
            sys.modules["deepspeed"] = saved
