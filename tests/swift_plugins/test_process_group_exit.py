"""swift_plugins/patches/process_group_exit.py: swift's sft pipeline destroys the process group after a run that
returned, and leaves it alone when the run raised (the error goes to torchrun; ranks that failed apart must not
block in a collective teardown)."""
from __future__ import annotations

import importlib

import pytest

sft = pytest.importorskip("swift.pipelines.train.sft")


class Run(sft.SwiftSft):
    """SwiftSft without its argument parsing: run() in place of training."""

    def __init__(self, fail: bool):
        self.fail = fail

    def run(self):
        import torch.distributed as dist

        assert dist.is_initialized()  # training runs with the group
        if self.fail:
            raise RuntimeError("training failed")
        return {"last_model_checkpoint": "ckpt"}


class One(Run):
    def run(self):
        return 1


def test_sft_main_destroys_the_process_group_after_training_and_not_after_an_error(tmp_path):
    import torch.distributed as dist

    patch = importlib.import_module("swift_plugins.patches.process_group_exit")
    patch.apply()  # as when swift loads it as a plugin: its sft pipeline is imported by then
    assert sft.SwiftSft.main.__wrapped_original__ is sft.SwiftPipeline.main
    assert One(fail=False).main() == 1  # one process, no group: nothing to destroy
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="training failed"):
            Run(fail=True).main()
        assert dist.is_initialized()
        assert Run(fail=False).main() == {"last_model_checkpoint": "ckpt"}
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
