"""DeepSpeed ZeRO-3 awareness shared by the amplifier, the stats callback and the vision patches.

Under ZeRO-3 every parameter is split across the ranks: outside the forward of the module that owns it, a
parameter is an empty partition (numel 0; DeepSpeed gives it `ds_id`, `ds_numel`, `ds_shape`, `ds_status`), and
DeepSpeed gathers it only around its owner's forward (hooks on every module, for that module's own parameters)
or inside `deepspeed.zero.GatheredParameters`. So code that reads a parameter elsewhere must either go through
the owner module's forward, gather it explicitly, or not run. DeepSpeed is optional here: nothing below imports
it unless a partitioned parameter is actually seen.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch


def is_zero3(param: torch.Tensor) -> bool:
    """True for a parameter managed by ZeRO-3 (partitioned, or gathered only for the moment): DeepSpeed's
    `ds_id`/`ds_numel` attributes, or an empty tensor standing for a non-empty parameter."""
    return hasattr(param, "ds_id") or hasattr(param, "ds_numel") or param.numel() == 0


def any_zero3(params: Iterable[torch.Tensor]) -> bool:
    return any(is_zero3(p) for p in params)


@contextmanager
def gathered(params: Iterable[torch.Tensor]) -> Iterator[bool]:
    """Read access to `params` for the block; yields whether their full values are available.

    Plain parameters: yields True at once. ZeRO-3 parameters: gathers them with
    `deepspeed.zero.GatheredParameters` (read only: modifier_rank=None) and yields True; without an importable
    deepspeed yields False (the caller skips its reads). GatheredParameters is a collective: call this on every
    rank (a training callback does; a save on rank 0 only must not).
    """
    params = list(params)
    partitioned = [p for p in params if is_zero3(p)]
    if not partitioned:
        yield True
        return
    try:
        import deepspeed
    except ImportError:
        yield False
        return
    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield all(p.numel() > 0 for p in partitioned)  # False if something else emptied them
