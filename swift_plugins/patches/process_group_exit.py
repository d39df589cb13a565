"""Patch (on import): a `swift sft` run under torchrun destroys its process group when training ends.

Why: swift's sft pipeline leaves the default process group alive at exit (its Megatron pipeline destroys it). Gloo's
worker threads can then still hold work with Python references while the interpreter shuts down, and the process
dies with "terminate called without an active exception" (SIGABRT) after training has finished and saved:
torchrun reports the run as failed, and so does train.sh (seen once in CI, tests/model/test_ddp.py, with
NPROC_PER_NODE=2 on CPUs; pytorch/pytorch#179291). With NCCL, torch warns that destroy_process_group() was not
called. PyTorch's shutdown guidance is to call it at the end of main, once per process.

How: SwiftSft.main (sft, pretrain and rlhf) calls destroy_process_group() after a successful return, as swift's
Megatron pipeline does. Not after an exception: ranks that failed apart could block in it while the others wait
in a collective, and the error must reach torchrun. Nothing without torch.distributed initialised (one process,
scoring).
"""
from __future__ import annotations

import sys

from swift_plugins._patching import install


def main(self):
    result = main.__wrapped_original__(self)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return result


def apply() -> None:
    # swift's sft CLI imports the pipeline before it loads the plugins; elsewhere (scoring) there is nothing to patch
    sft = sys.modules.get("swift.pipelines.train.sft")
    if sft is not None:
        install(sft.SwiftSft, "main", main)


apply()
