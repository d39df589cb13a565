"""Patch (on import): a `swift sft` run under torchrun destroys its process group when training ends, and frees it.

Why: swift's sft pipeline leaves the default process group alive at exit (its Megatron pipeline destroys it). Gloo's
worker threads then outlive main(): a worker that releases a finished collective's tensors needs the GIL, and if the
interpreter is already finalizing the thread exits inside a destructor and the process dies with "terminate called
without an active exception" (SIGABRT) after training has finished and saved. torchrun reports the run as failed,
and so does train.sh (CI, tests/model/test_ddp.py with NPROC_PER_NODE=2 on CPUs: 4 runs in 42 on a 2-core machine;
a core dump shows ProcessGroupGloo::runLoop releasing an AsyncAllreduceWork during Py_FinalizeEx; pytorch#179291).
With NCCL, torch warns that destroy_process_group() was not called. PyTorch's shutdown guidance is to call it at the
end of main, once per process.

destroy_process_group() alone does not stop gloo's threads: it unregisters the group, but objects of the run (the
trainer's DDP wrapper among them) still reference it from reference cycles, and the C++ group, whose destructor
drains its queue and joins its threads, lives until the last reference goes. So a gc.collect() follows, while the
interpreter is whole (in a two-process CPU run each rank's gloo threads are joined only after it).

How: SwiftSft.main (sft, pretrain and rlhf) calls destroy_process_group() and gc.collect() after a successful return,
as swift's Megatron pipeline destroys the group. Not after an exception: ranks that failed apart could block in it
while the others wait in a collective, and the error must reach torchrun. Nothing without torch.distributed
initialised (one process, scoring).
"""
from __future__ import annotations

import gc
import sys

from swift_plugins._patching import install


def main(self):
    result = main.__wrapped_original__(self)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()  # the group's last references sit in the trainer's cycles: free it, joining gloo's threads
    return result


def apply() -> None:
    # swift's sft CLI imports the pipeline before it loads the plugins; elsewhere (scoring) there is nothing to patch
    sft = sys.modules.get("swift.pipelines.train.sft")
    if sft is not None:
        install(sft.SwiftSft, "main", main)


apply()
