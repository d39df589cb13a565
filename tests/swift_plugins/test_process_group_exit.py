"""swift_plugins/patches/process_group_exit.py: swift's sft pipeline destroys the process group after a run that
returned and frees it, so gloo's worker threads are joined before the interpreter finalizes, and leaves it alone
when the run raised (the error goes to torchrun; ranks that failed apart must not block in a collective teardown)."""
from __future__ import annotations

import gc
import importlib

import pytest

sft = pytest.importorskip("swift.pipelines.train.sft")
psutil = pytest.importorskip("psutil")  # accelerate's dependency, so swift's: counts C++ threads on any platform


class Run(sft.SwiftSft):
    """SwiftSft without its argument parsing: run() in place of training."""

    def __init__(self, fail: bool):
        self.fail = fail

    def run(self):
        import torch
        import torch.distributed as dist

        assert dist.is_initialized()  # training runs with the group
        dist.all_reduce(torch.ones(4))
        # as the trainer's DDP wrapper does: a reference cycle holds the group past destroy_process_group()
        trainer = {"group": dist.group.WORLD}
        trainer["self"] = trainer
        if self.fail:
            raise RuntimeError("training failed")
        return {"last_model_checkpoint": "ckpt"}


class One(Run):
    def run(self):
        return 1


def threads() -> int:
    """This process's threads, C++ ones (gloo's) included."""
    return psutil.Process().num_threads()


def test_sft_main_destroys_the_process_group_after_training_and_not_after_an_error(tmp_path):
    import torch
    import torch.distributed as dist

    patch = importlib.import_module("swift_plugins.patches.process_group_exit")
    patch.apply()  # as when swift loads it as a plugin: its sft pipeline is imported by then
    assert sft.SwiftSft.main.__wrapped_original__ is sft.SwiftPipeline.main
    assert One(fail=False).main() == 1  # one process, no group: nothing to destroy
    torch.ones(4).sum()  # torch's own threads, if any, start before the count
    gc.collect()
    before = threads()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="training failed"):
            Run(fail=True).main()
        assert dist.is_initialized()
        assert threads() > before  # gloo's worker threads
        assert Run(fail=False).main() == {"last_model_checkpoint": "ckpt"}
        assert not dist.is_initialized()
        assert threads() <= before  # the group is freed and its threads joined while the interpreter is whole
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
