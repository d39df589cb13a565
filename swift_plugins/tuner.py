"""Tuner plugin (`--tuner_type hr_amplifier`): LoRA as usual plus the High-Risk Feature Amplifier.

The LoRA part is swift's own (`--tuner_type lora` code path, so every LoRA flag applies: --lora_rank,
--lora_alpha, --target_modules, ...). The amplifier (swift_plugins/_amplifier.py) gates the visual tokens out
of the vision merger and adds a learned per-head bias towards image-token keys in chosen LLM layers
(FIRESAFE_AMP_LAYERS: auto | all | none | 0,8,16). Both start as the identity, so step 0 is plain LoRA.

A checkpoint holds the PEFT adapter (adapter_config.json, adapter_model.safetensors) and, beside it,
amplifier.safetensors + amplifier_config.json. `swift infer --adapters CKPT`, `swift sft
--resume_from_checkpoint CKPT` and tools/model/score.py load both through `from_pretrained` (args.json records the
tuner type and this file). `swift export --merge_lora` knows nothing of the amplifier: inference stays
unmerged (see docs/plugins.md).
"""
from __future__ import annotations

import copy
import os

from peft import PeftModel
from swift.tuner_plugin import Tuner, tuners_map
from swift.utils import get_logger

from swift_plugins._amplifier import attach_new, attach_saved, find_amplifier

logger = get_logger()


class HighRiskAmplifierTuner(Tuner):

    @staticmethod
    def prepare_model(args, model):
        from swift.pipelines.train.tuner import prepare_adapter

        lora_args = copy.copy(args)
        lora_args.tuner_type = "lora"
        model = prepare_adapter(lora_args, model)  # LoRA first: same random draws, same adapter as plain LoRA
        amplifier = attach_new(model)
        n = sum(p.numel() for p in amplifier.parameters())
        logger.info(f"hr_amplifier: visual gate + attention bias on layers {amplifier.config.layers} "
                    f"({n} trainable parameters)")
        return model

    @staticmethod
    def save_pretrained(model, save_directory, state_dict=None, safe_serialization=True, **kwargs):
        if isinstance(model, PeftModel):
            kwargs.setdefault("selected_adapters", ["default"])
            if state_dict is not None:
                kwargs["state_dict"] = state_dict
            model.save_pretrained(save_directory, safe_serialization=safe_serialization, **kwargs)
        amplifier = find_amplifier(model)
        if amplifier is None:
            raise RuntimeError("hr_amplifier: the model has no amplifier to save")
        os.makedirs(save_directory, exist_ok=True)
        amplifier.save(save_directory, state_dict)

    @staticmethod
    def from_pretrained(model, model_id, **kwargs):
        trainable = bool(kwargs.get("is_trainable", False))
        if os.path.exists(os.path.join(model_id, "adapter_config.json")):
            model = PeftModel.from_pretrained(model, model_id, **kwargs)
        attach_saved(model, model_id, trainable=trainable)
        return model


tuners_map["hr_amplifier"] = HighRiskAmplifierTuner
