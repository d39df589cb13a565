"""Fixtures shared by the model-step tests."""
from __future__ import annotations

import pytest

from tests.helpers import compose, make_official, prepare


@pytest.fixture
def out(tmp_path):
    data = make_official(tmp_path / "data")
    out = tmp_path / "out"
    prepare(data, out, "--val-ratio", "0.25")
    compose(out)
    return out
