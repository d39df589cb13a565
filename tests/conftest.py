"""Shared fixtures: small image folders in the official layout and hazard cut-outs, made on the fly. Plain helper
functions live in tests/helpers.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import write_image


@pytest.fixture
def images(tmp_path):
    """A folder with five good JPEGs a.jpg … e.jpg; returns (folder, names)."""
    folder = tmp_path / "train"
    names = [f"{c}.jpg" for c in "abcde"]
    for i, name in enumerate(names):
        write_image(folder / name, colour=(40 * i, 100, 200 - 30 * i))
    return folder, names


@pytest.fixture(scope="session")
def cutouts(tmp_path_factory) -> Path:
    """Three RGBA hazard cut-outs from the demo (tools.demo.data.write_cutouts)."""
    from tools.demo.data import write_cutouts

    folder = tmp_path_factory.mktemp("cutouts")
    write_cutouts(folder, 0, n=3)
    return folder
