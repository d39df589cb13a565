"""Shared fixtures: small image folders in the official layout, made on the fly."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_image(path: Path, colour=(120, 130, 140), size=(32, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="JPEG")
    return path


@pytest.fixture
def images(tmp_path):
    """A folder with five good JPEGs a.jpg … e.jpg; returns (folder, names)."""
    folder = tmp_path / "train"
    names = [f"{c}.jpg" for c in "abcde"]
    for i, name in enumerate(names):
        write_image(folder / name, colour=(40 * i, 100, 200 - 30 * i))
    return folder, names
