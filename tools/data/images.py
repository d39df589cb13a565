"""Prepared images: every image the later steps read, written once by data-pre.sh, upright, RGB, at exactly the
size swift feeds the model.

swift opens an image with PIL and converts it to RGB (EXIF orientation ignored, alpha dropped), then
qwen_vl_utils resizes it (bicubic) to `model_size`. A phone photo taken upright but stored sideways with an EXIF
orientation tag would be seen sideways, and augmented copies would be made at another size than the originals.
So data-pre.sh writes each training, validation and test image here once: EXIF-transposed, alpha composited on
white, grey or CMYK converted to RGB, resized to model_size; swift's own resize then finds nothing to do, and
the augmentation, its filter, training and scoring all read the same pixels. The originals are never modified;
a file is named as its list names it, whatever it is (a symlink, a PNG), so every output uses the list's names.
An image already upright, RGB and at the model's size in JPEG or PNG is copied byte for byte.
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path

from tools.fileio import put_bytes, put_copy

PATCH_FACTOR = 28  # a visual token is a 2x2 merge of 14-pixel patches
MIN_TOKENS = 4  # qwen_vl_utils' IMAGE_MIN_TOKEN_NUM: swift's smallest image
MAX_RATIO = 200  # qwen_vl_utils' limit on the aspect ratio
MAX_SOURCE_PIXELS = 1_000_000_000  # PIL refuses images over ~179 MP by default; phone panoramas can exceed it
JPEG_QUALITY = 95


def model_size(height: int, width: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) swift feeds the model an image of height x width with MAX_PIXELS=max_pixels in the
    environment (the scripts export it; swift turns it into qwen_vl_utils' IMAGE_MAX_TOKEN_NUM) and
    --max_pixels max_pixels, in two steps as swift 4.6 does them: an image over max_pixels is first scaled down
    to about max_pixels, aspect kept (swift.template.vision_utils.rescale_image: int() of the scaled sides),
    then qwen_vl_utils.smart_resize rounds both sides to multiples of 28 within 4 and max_pixels // 784 tokens.
    (One smart_resize of the original gives other sizes: 3024x4032 -> 840x1148, where swift makes 868x1148.)"""
    if min(height, width) < 1:
        raise ValueError(f"empty image {width}x{height}")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} over {MAX_RATIO}: {width}x{height}")
    if height * width > max_pixels:
        ratio = width / height
        scaled_height = math.sqrt(max_pixels / ratio)
        height, width = int(scaled_height), int(scaled_height * ratio)
    f = PATCH_FACTOR
    max_pixels = max_pixels // (f * f) * f * f
    min_pixels = MIN_TOKENS * f * f
    h_bar = max(f, round(height / f) * f)
    w_bar = max(f, round(width / f) * f)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = math.floor(height / beta / f) * f
        w_bar = math.floor(width / beta / f) * f
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / f) * f
        w_bar = math.ceil(width * beta / f) * f
    return h_bar, w_bar


def _upright(img):
    """img with its EXIF orientation applied (the tag dropped), in RGB; transparency is composited on white."""
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    return img.convert("RGB") if img.mode != "RGB" else img


def prepare_image(src: str | os.PathLike, dst: str | os.PathLike, max_pixels: int) -> str:
    """Write src's prepared copy to dst (atomically); returns "copied" or "resized". Raises ValueError with the
    reason when the image cannot be read (missing, truncated, not an image, too large, empty)."""
    from PIL import Image

    src, dst = Path(src), Path(dst)
    default_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, MAX_SOURCE_PIXELS
    try:
        with Image.open(src) as img:
            fmt, size, mode = img.format, img.size, img.mode
            orientation = img.getexif().get(0x0112, 1)
            upright = (size[1], size[0]) if orientation in (5, 6, 7, 8) else size  # (width, height) as seen
            target_h, target_w = model_size(upright[1], upright[0], max_pixels)
            if fmt in ("JPEG", "PNG") and mode == "RGB" and orientation == 1 and size == (target_w, target_h):
                img.load()  # a full decode: a truncated file fails here, not in training
                put_copy(src, dst)
                return "copied"
            if fmt == "JPEG":  # decode at 1/2, 1/4 or 1/8 in the DCT while that still leaves the model's size
                scale = min(upright[0] / target_w, upright[1] / target_h)
                reduce = next((r for r in (8, 4, 2) if scale >= r), 1)
                if reduce > 1:
                    img.draft(img.mode, (size[0] // reduce, size[1] // reduce))
            img.load()
            out = _upright(img)
            if out.size != (target_w, target_h):
                out = out.resize((target_w, target_h), Image.Resampling.BICUBIC)  # as qwen_vl_utils resizes
            buf = io.BytesIO()
            out.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    except FileNotFoundError:
        raise ValueError("image not found") from None
    except Image.DecompressionBombError as e:
        raise ValueError(f"too large ({e})") from None
    except ValueError:
        raise
    except Exception as e:  # PIL raises many types for corrupt data
        raise ValueError(f"unreadable image ({type(e).__name__}: {e})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = default_limit
    put_bytes(dst, buf.getvalue())
    return "resized"
