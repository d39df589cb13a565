"""Image I/O for the augmentation: decoding, resizing to the model's size (tools.data.images.model_size, the one
rule), encoding, and the hazard cut-outs. Every array is RGB uint8, H×W×3 (cut-outs RGBA). The pipeline feeds it
prepared images (tools.data.prepare: upright, already at the model's size); any other image works too."""
from __future__ import annotations

import io
import os
from pathlib import Path

import cv2
import numpy as np

from tools.data.images import model_size
from tools.fileio import DataError

DEFAULT_MAX_PIXELS = 1003520  # 1,280 visual tokens of 28×28, as recipes/real.env


def resize_to(img: np.ndarray, height: int, width: int) -> np.ndarray:
    h, w = img.shape[:2]
    if (h, w) == (height, width):
        return img
    shrink = min(h / height, w / width)
    # Area averaging only where bilinear would alias: it costs ~6× more at small non-integer factors.
    interp = cv2.INTER_AREA if shrink >= 1.5 else cv2.INTER_LINEAR if shrink >= 1 else cv2.INTER_CUBIC
    return cv2.resize(img, (width, height), interpolation=interp)


def resize_for_model(img: np.ndarray, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    return resize_to(img, *model_size(*img.shape[:2], max_pixels))


def decode_image(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """RGB uint8. EXIF orientation is ignored: prepared images are upright already and carry no orientation tag.
    With max_pixels, a large JPEG is decoded at
    1/2, 1/4 or 1/8 scale in the DCT (much faster) when that still leaves at least the model's size."""
    data = np.fromfile(str(path), dtype=np.uint8)
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    if max_pixels and data[:2].tobytes() == b"\xff\xd8":
        try:
            from PIL import Image

            with Image.open(io.BytesIO(data.tobytes())) as im:
                w, h = im.size  # header only
            th, tw = model_size(h, w, max_pixels)
            for r, flag in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                            (2, cv2.IMREAD_REDUCED_COLOR_2)):
                if h // r >= th and w // r >= tw:
                    flags = flag | cv2.IMREAD_IGNORE_ORIENTATION
                    break
        except Exception:
            pass
    bgr = cv2.imdecode(data, flags)
    if bgr is None:  # a format OpenCV lacks: PIL, as swift would
        from PIL import Image

        with Image.open(io.BytesIO(data.tobytes())) as im:
            return np.ascontiguousarray(np.asarray(im.convert("RGB")))
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode and resize to the model's size: the input of every transform in the pipeline."""
    return resize_for_model(decode_image(path, max_pixels), max_pixels)


def encode_jpeg(img: np.ndarray, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def load_cutout(path: str | os.PathLike) -> np.ndarray:
    """An RGBA uint8 cut-out (any PNG PIL reads; without transparency it would paste as a rectangle)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.ascontiguousarray(np.asarray(im.convert("RGBA")))


def list_cutouts(folder: str | os.PathLike) -> list[Path]:
    found = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() == ".png")
    if not found:
        raise DataError(f"{folder}: no PNG cut-outs")
    return found

