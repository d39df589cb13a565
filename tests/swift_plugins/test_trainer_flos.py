"""swift_plugins/patches/trainer_flos.py: HF Trainer's flos count takes the model's parameter count once, and the
numbers it adds up are transformers' own."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

tf = pytest.importorskip("swift_plugins.patches.trainer_flos")


class Counted(torch.nn.Module):
    main_input_name = "input_ids"

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.proj = torch.nn.Linear(4, 3)
        self.calls = 0

    def num_parameters(self, exclude_embeddings=False):
        self.calls += 1
        return sum(p.numel() for n, p in self.named_parameters() if not (exclude_embeddings and n.startswith("embed")))


def test_flos_count_parameters_once_per_model():
    from transformers import Trainer

    from swift_plugins._patching import original_of

    # installed on import (swift imports the file by path too, so compare files, not function objects)
    assert Trainer.floating_point_ops.__code__.co_filename == tf.floating_point_ops.__code__.co_filename
    original = original_of(Trainer.floating_point_ops)
    inputs = {"input_ids": torch.zeros(2, 7, dtype=torch.long)}
    a, b = Counted(), Counted()
    trainer = SimpleNamespace(model=a)
    expected = original(SimpleNamespace(model=Counted()), inputs)  # transformers' formula: 6 x tokens x 15
    assert expected == 6 * 14 * 15
    assert [tf.floating_point_ops(trainer, inputs) for _ in range(3)] == [expected] * 3
    assert a.calls == 1
    trainer.model = b  # another model is counted again
    assert tf.floating_point_ops(trainer, inputs) == expected and b.calls == 1
    assert tf.floating_point_ops(trainer, {"pixel_values": torch.zeros(1)}) == 0  # no main input: no flos
