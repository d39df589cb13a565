"""Patch (on import): liger-kernel's Qwen2.5-VL forward keeps only the positions `logits_to_keep` asks for.

swift trims each batch to its supervised tail (`logits_to_keep`, a few positions of the 1,365: the answer) when the
model's forward takes that argument (swift.trainers.mixin.get_use_logits_to_keep). liger's replacement forward
(liger_kernel.transformers.model.qwen2_5_vl.lce_forward, installed by `--use_liger_kernel true`) does not name it, so
swift turns trimming off and every position goes through the LM head: with swift's own loss the fused linear
cross-entropy runs over all 5,460 positions of a batch of 4, and with a custom loss (stage 2's weighted_ce) liger
returns full [4, 1365, 151936] logits (20.8 GiB peak instead of 11.3 on the 3B, bench/README.md). The wrapper below
names `logits_to_keep` and cuts the language model's last hidden states to those positions before liger's head
(logits, or its fused loss on swift's equally trimmed labels), as transformers' own forward does.

Installed by replacing the module attribute liger's `apply_liger_kernel_to_qwen2_5_vl` imports when swift applies
it, as soon as liger's module is imported (swift_plugins._patching.when_imported); nothing changes without liger or
with logits_to_keep 0.

Knob: FIRESAFE_LIGER_KEEP, 1 (the default) turns it on, 0 leaves liger as it is. Why on: evaluation. In eval mode
liger's forward computes logits (its fused loss is for training) and transformers' loss casts them to float32: with
stage 1's evaluation batch of 4 that is [4, ~1,370, 152,064] logits, 1.6 GiB in bf16 and 3.1 GiB more in float32, on
top of the 7B's 16 GiB. With the allocator capped as on a 24 GB card, train.sh's first evaluation ran out of memory
there (run AD, bench/README.md); trimmed, the evaluation's logits are a few positions. In training it is no faster
and no smaller (stage 1: 6.04 samples/s at 19.7 GiB, run H; stage 2 runs without liger). Measured on an H200
(bench/README.md): stage 2 (3B, weighted_ce) with liger 20.8 -> 10.9 GiB peak, 6.00 -> 6.51 samples/s.
"""
from __future__ import annotations

import sys

import torch

from swift_plugins._patching import cancel, original_of, switch, when_imported

ENABLED = switch("FIRESAFE_LIGER_KEEP", "liger's forward trims to swift's logits_to_keep", default=True)


def keep_positions(hidden: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """hidden[:, positions] as transformers slices before its LM head: the last n for an int, else an index/mask."""
    index = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    return hidden[:, index].contiguous()  # liger's fused loss views it as [-1, hidden]: a slice of a batch is not


def wrap(lce_forward):
    """liger's forward with an explicit `logits_to_keep` (so swift trims), applied to the decoder's output."""
    def forward(self, *args, logits_to_keep: int | torch.Tensor = 0, **kwargs):
        if isinstance(logits_to_keep, int) and logits_to_keep == 0:
            return lce_forward(self, *args, **kwargs)

        def cut(module, module_args, module_kwargs, output):
            if isinstance(output, tuple):
                return (keep_positions(output[0], logits_to_keep), *output[1:])
            output.last_hidden_state = keep_positions(output.last_hidden_state, logits_to_keep)
            return output

        handle = self.model.register_forward_hook(cut, with_kwargs=True)
        try:
            return lce_forward(self, *args, **kwargs)
        finally:
            handle.remove()

    forward.__wrapped_original__ = lce_forward
    forward.__doc__ = lce_forward.__doc__
    return forward


LIGER_QWEN = "liger_kernel.transformers.model.qwen2_5_vl"
_pending = None  # the when_imported hook while liger's module is not imported yet


def _install(module) -> None:
    module.lce_forward = wrap(original_of(module.lce_forward))


def apply(enabled: bool | None = None) -> None:
    """Install the wrapper (idempotent) once liger's Qwen2.5-VL module is imported, or with it off put liger's own
    forward back. Installing never imports liger: the plugins load in every swift process (the scoring loads and the
    CPU demo's included) and only runs with `--use_liger_kernel true` import it (~1 s)."""
    global _pending
    enabled = ENABLED if enabled is None else enabled
    cancel(_pending)
    _pending = None
    if enabled:
        _pending = when_imported(LIGER_QWEN, _install)
    elif LIGER_QWEN in sys.modules:
        module = sys.modules[LIGER_QWEN]
        module.lce_forward = original_of(module.lce_forward)


apply()
