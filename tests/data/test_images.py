"""Prepared images: swift's resize rule (checked against swift's own template), EXIF, modes, bad and huge files."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tools.data.images import model_size, prepare_image
from tools.demo.models import TinySpec, build_tiny_model

ROOT = Path(__file__).resolve().parents[2]

PHONE_AND_ODD = [(3024, 4032), (4032, 3024), (3000, 4000), (2268, 4032), (1080, 1920), (4624, 3472), (613, 457),
                 (57, 3000), (30, 40), (1145, 867), (168, 168), (2000, 13), (9000, 12000)]


SWIFT_SIZES = r"""
import json, sys
from PIL import Image
from swift.infer_engine import InferRequest
from tools.model.infer import load
_, template, _, _ = load(["--model", sys.argv[1], "--template", "qwen2_5_vl", "--torch_dtype", "float32",
                          "--max_pixels", "1003520"])
out = []
for path in sys.argv[2:]:
    enc = template.encode(InferRequest(messages=[{"role": "user", "content": "<image>x"}], images=[path]))
    _, gh, gw = enc["image_grid_thw"][0].tolist()
    out.append([gh * 14, gw * 14])  # 14-pixel patches
print("SIZES " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def swift_sizes(tmp_path_factory):
    """swift's own sizes (qwen2_5_vl template, as train.sh runs it: MAX_PIXELS exported and --max_pixels) for
    images of the given shapes, in a fresh process (qwen_vl_utils reads its limits once per process)."""
    root = tmp_path_factory.mktemp("swift_sizes")
    spec = TinySpec(hidden=64, layers=1, heads=4, kv_heads=2, intermediate=64, vision_hidden=32, vision_depth=1,
                    pretrain_samples=0, pretrain_epochs=0)
    model_dir = build_tiny_model(root / "model", spec, seed=0)

    def sizes(paths: list) -> list[tuple[int, int]]:
        env = {**os.environ, "MAX_PIXELS": "1003520", "PYTHONPATH": str(ROOT)}
        proc = subprocess.run([sys.executable, "-c", SWIFT_SIZES, str(model_dir), *map(str, paths)], env=env,
                              capture_output=True, text=True, timeout=600)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("SIZES ")), None)
        assert line, proc.stderr[-3000:]
        return [tuple(v) for v in json.loads(line[6:])]

    return sizes


def test_model_size_is_what_swift_feeds_the_model(swift_sizes, tmp_path):
    paths = []
    for h, w in PHONE_AND_ODD:
        paths.append(tmp_path / f"{h}x{w}.png")
        Image.new("RGB", (w, h), (10, 20, 30)).save(paths[-1])
    src, prepared = tmp_path / "photo.jpg", tmp_path / "prepared.jpg"
    Image.new("RGB", (4032, 3024), (200, 30, 30)).save(src, quality=90)
    prepare_image(src, prepared, 1003520)
    got = swift_sizes(paths + [prepared])
    assert got[:-1] == [model_size(h, w, 1003520) for h, w in PHONE_AND_ODD]
    assert model_size(3024, 4032, 1003520) == (868, 1148)  # one smart_resize of the original would give 840
    with Image.open(prepared) as img:  # a prepared image: swift's resize finds nothing to do
        assert (img.height, img.width) == model_size(3024, 4032, 1003520) == got[-1]


def test_model_size_bounds():
    assert model_size(10, 10, 1003520) == (56, 56)  # at least 4 tokens
    h, w = model_size(3000, 4000, 28224)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 28224
    with pytest.raises(ValueError, match="aspect ratio"):
        model_size(10, 2500, 1003520)
    with pytest.raises(ValueError, match="empty"):
        model_size(0, 10, 1003520)


def upright_marker(width: int, height: int) -> Image.Image:
    """Grey, with a red block in the top-left corner as the photographer saw it."""
    img = Image.new("RGB", (width, height), (128, 128, 128))
    img.paste((255, 0, 0), (0, 0, width // 4, height // 4))
    return img


# What a camera stores for each EXIF orientation, given the upright view (PIL's transpose that undoes it).
STORE = {1: None, 3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_is_applied(tmp_path, orientation):
    upright = upright_marker(300, 400)  # a portrait photo
    stored = upright if STORE[orientation] is None else upright.transpose(STORE[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    src, dst = tmp_path / "p.jpg", tmp_path / "out.jpg"
    stored.save(src, quality=95, exif=exif)
    prepare_image(src, dst, 28224)
    with Image.open(dst) as img:
        assert (img.height, img.width) == model_size(400, 300, 28224)  # portrait, as seen
        assert img.getexif().get(0x0112, 1) == 1
        a = np.asarray(img.convert("RGB")).astype(int)
    corner, far = a[: a.shape[0] // 8, : a.shape[1] // 8].mean((0, 1)), a[-a.shape[0] // 8:, -a.shape[1] // 8:].mean((0, 1))
    assert corner[0] > 200 and corner[1] < 60 and abs(far - 128).max() < 20


def test_modes_become_rgb_and_alpha_goes_on_white(tmp_path):
    rgba = Image.new("RGBA", (200, 100), (0, 0, 255, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 100, 100))
    rgba.save(tmp_path / "a.png")
    Image.new("L", (200, 100), 77).save(tmp_path / "g.png")
    Image.new("CMYK", (200, 100), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    Image.new("P", (200, 100)).save(tmp_path / "p.gif")
    for name in ("a.png", "g.png", "c.jpg", "p.gif"):
        prepare_image(tmp_path / name, tmp_path / f"out_{name}.jpg", 28224)
        with Image.open(tmp_path / f"out_{name}.jpg") as img:
            assert img.mode == "RGB" and img.format == "JPEG"
    a = np.asarray(Image.open(tmp_path / "out_a.png.jpg")).astype(int)
    assert a[:, -10:].mean() > 245  # transparent half: white, not black
    assert a[:, :10, 2].mean() > 200 and a[:, :10, 0].mean() < 60  # opaque half: blue
    assert abs(np.asarray(Image.open(tmp_path / "out_g.png.jpg")).astype(int) - 77).max() <= 2


def test_an_image_already_at_the_model_size_is_copied_byte_for_byte(tmp_path):
    src = tmp_path / "a.jpg"
    Image.new("RGB", (168, 168), (1, 2, 3)).save(src, quality=90)
    assert prepare_image(src, tmp_path / "b.jpg", 28224) == "copied"
    assert (tmp_path / "b.jpg").read_bytes() == src.read_bytes()
    assert prepare_image(src, tmp_path / "c.jpg", 10000) == "resized"


def test_a_symlink_becomes_a_plain_file_with_the_list_name(tmp_path):
    real = tmp_path / "store" / "x.bin"
    real.parent.mkdir()
    Image.new("RGB", (168, 168), (1, 2, 3)).save(real, format="JPEG")
    link = tmp_path / "abc.jpg"
    link.symlink_to(real)
    out = tmp_path / "out" / "abc.jpg"
    out.parent.mkdir()
    prepare_image(link, out, 28224)
    assert out.is_file() and not out.is_symlink() and out.read_bytes() == real.read_bytes()


def test_bad_images_raise_with_a_reason(tmp_path):
    good = io.BytesIO()
    Image.new("RGB", (400, 300), (9, 9, 9)).save(good, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(good.getvalue()[:400])
    (tmp_path / "text.jpg").write_text("not an image")
    for name, reason in (("cut.jpg", "unreadable"), ("text.jpg", "unreadable"), ("missing.jpg", "not found")):
        with pytest.raises(ValueError, match=reason):
            prepare_image(tmp_path / name, tmp_path / "out.jpg", 28224)
        assert not (tmp_path / "out.jpg").exists()


def test_an_image_over_pils_default_limit_is_prepared(tmp_path):
    """PIL refuses images over ~179 MP by default (DecompressionBombError); phone panoramas get there."""
    big = tmp_path / "pano.jpg"
    Image.new("L", (13500, 13500), 90).save(big, quality=50)  # 182 MP
    assert 13500 * 13500 > 2 * 89478485  # PIL's default MAX_IMAGE_PIXELS, doubled: its error threshold
    prepare_image(big, tmp_path / "out.jpg", 1003520)
    with Image.open(tmp_path / "out.jpg") as img:
        assert (img.height, img.width) == model_size(13500, 13500, 1003520) and img.mode == "RGB"
    os.remove(big)
