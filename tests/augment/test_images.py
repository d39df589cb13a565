"""tools.augment.images: resizing by the one size rule, decoding at the model's size, the cut-outs."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tools.augment import images as I
from tools.data.images import model_size
from tools.fileio import DataError


def test_resize_for_model_uses_the_one_size_rule():
    """The augmentation resizes by tools.data.images.model_size, the rule tests/data/test_images.py checks
    against swift itself."""
    for h, w in [(960, 1280), (224, 224), (3000, 4000), (37, 1000), (20, 20)]:
        img = np.zeros((h, w, 3), np.uint8)
        assert I.resize_for_model(img, 28224).shape[:2] == model_size(h, w, 28224)


def gradient(h: int, w: int) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w]
    return np.dstack([xs * 255 // max(1, w - 1), ys * 255 // max(1, h - 1), (xs + ys) % 256]).astype(np.uint8)


def test_load_image_is_at_the_model_size(tmp_path):
    path = tmp_path / "big.jpg"
    Image.fromarray(gradient(900, 1200)).save(path, quality=95)
    full = I.decode_image(path)
    assert full.shape == (900, 1200, 3) and full.dtype == np.uint8
    reduced = I.decode_image(path, max_pixels=28224)  # decoded at a fraction in the DCT, never below the target
    th, tw = model_size(900, 1200, 28224)
    assert th <= reduced.shape[0] < 900 and tw <= reduced.shape[1] < 1200
    img = I.load_image(path, 28224)
    assert img.shape == (th, tw, 3)
    # the reduced decode looks like the full one, resized
    assert np.abs(img.astype(int) - I.resize_for_model(full, 28224).astype(int)).mean() < 6
    png = tmp_path / "small.png"
    Image.fromarray(gradient(50, 70)).save(png)
    assert np.array_equal(I.decode_image(png, max_pixels=28224), gradient(50, 70))  # lossless, not a JPEG: as is


def test_encode_jpeg_round_trips(tmp_path):
    img = gradient(56, 84)
    data = I.encode_jpeg(img, quality=95)
    assert data[:2] == b"\xff\xd8"
    (tmp_path / "x.jpg").write_bytes(data)
    assert np.abs(I.decode_image(tmp_path / "x.jpg").astype(int) - img.astype(int)).mean() < 4  # RGB, not BGR


def test_cutouts_are_rgba_pngs(tmp_path, cutouts):
    paths = I.list_cutouts(cutouts)
    assert len(paths) == 3 and paths == sorted(paths) and all(p.suffix == ".png" for p in paths)
    cut = I.load_cutout(paths[0])
    assert cut.ndim == 3 and cut.shape[2] == 4 and cut.dtype == np.uint8
    assert (cut[..., 3] == 0).any() and (cut[..., 3] == 255).any()  # transparent around the object
    (tmp_path / "note.txt").write_text("x")
    with pytest.raises(DataError, match="no PNG cut-outs"):
        I.list_cutouts(tmp_path)
