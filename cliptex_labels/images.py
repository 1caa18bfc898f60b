"""Source images exactly as the pipeline saw them when it made the labels.

The labels describe the image *after* its EXIF orientation was applied, converted to RGB (16-bit grey
scaled to 8 bits, transparency composited on white). ``open_image`` / ``decode_record`` do exactly
that (the pipeline itself uses them), so an image from here and its labels line up pixel for pixel.
A reader that decodes the JPEG some other way (plain PIL, webdataset's decoders) sees it unrotated:
``apply_orientation`` turns such an array the way the header's ``orientation`` says.

Pillow is needed for decoding (``pip install 'cliptex-labels[images]'``); it is imported on first use.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np

from .tars import Record, Skip

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# A CC3M image is ~0.2 MPix; 64 MPix leaves room for big originals while refusing bombs.
DEFAULT_MAX_PIXELS = 64_000_000
EXIF_ORIENTATION_TAG = 0x0112
# near-constant: every channel's standard deviation, over every 4th pixel of every 4th row, below
# this many grey levels (an all-white JPEG that img2dataset made from a 16-bit PNG has 0)
NEAR_CONSTANT_STD = 2.0


@dataclass
class Sample:
    key: str
    image: np.ndarray  # uint8 (H, W, 3) RGB, EXIF orientation applied
    caption: str
    meta: dict
    image_bytes: bytes
    source_mode: str  # PIL mode before conversion to RGB (e.g. "CMYK", "L", "I;16")
    orientation: int = 1  # the EXIF orientation that was applied (1: none)
    near_constant: bool = False  # see NEAR_CONSTANT_STD


def _pil():
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - depends on the installation
        raise ImportError("decoding images needs Pillow: pip install 'cliptex-labels[images]'") from None
    return Image


def _transposes() -> dict:
    Image = _pil()
    T = Image.Transpose
    # the EXIF rule, as PIL.ImageOps.exif_transpose applies it
    return {2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE,
            6: T.ROTATE_270, 7: T.TRANSVERSE, 8: T.ROTATE_90}


def apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """An array (H, W, ...) as stored in the file -> as displayed after EXIF ``orientation`` (1..8),
    the way the labels see it. A view, no copy. numpy only."""
    if orientation == 1:
        return image
    ops = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.swapaxes(0, 1), 6: lambda a: a.swapaxes(0, 1)[:, ::-1],
           7: lambda a: a.swapaxes(0, 1)[::-1, ::-1], 8: lambda a: a.swapaxes(0, 1)[::-1]}
    if orientation not in ops:
        raise ValueError(f"EXIF orientation must be 1..8, got {orientation!r}")
    return ops[orientation](image)


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS):
    """Bytes -> (RGB PIL image with the EXIF orientation applied, source mode, orientation applied).
    Raises ``ValueError(reason[, detail])`` with a reason of ``tars.SKIP_REASONS``. Consumers that
    resize next (the trainer) stay in PIL."""
    Image = _pil()
    if not data:
        raise ValueError("empty_image")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise ValueError("not_an_image") from None
    except Image.DecompressionBombError as e:  # PIL's own cap, above ours
        raise ValueError("decompression_bomb", str(e)) from None
    except (OSError, SyntaxError) as e:  # PIL raises SyntaxError for some broken headers
        raise ValueError("truncated_image", str(e)) from None
    w, h = img.size
    if w * h > max_pixels:  # checked on the header, before any pixel is decoded
        raise ValueError("decompression_bomb", f"{w}x{h} > {max_pixels} pixels")
    mode = img.mode
    try:
        img.load()
        orientation = img.getexif().get(EXIF_ORIENTATION_TAG, 1)
        transpose = _transposes().get(orientation)
        if transpose is None:
            orientation = 1  # absent or not a valid value: nothing is applied
        else:
            img = img.transpose(transpose)
        if mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit grey: scale to 8 bits instead of PIL's clipping conversion
            arr = np.asarray(img, dtype=np.uint32)
            arr = (arr >> 8).astype(np.uint8) if arr.max() > 255 else arr.astype(np.uint8)
            return Image.fromarray(arr).convert("RGB"), mode, orientation
        if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
            # composite on white: transparent regions are background in web images
            rgba = img.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(canvas, rgba)
        return (img if img.mode == "RGB" else img.convert("RGB")), mode, orientation
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError("truncated_image", str(e)) from None


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, str, int]:
    """Bytes -> (RGB uint8 array (H, W, 3) with the EXIF orientation applied, source mode,
    orientation applied). Raises ``ValueError(reason)``."""
    img, mode, orientation = open_image(data, max_pixels)
    return np.ascontiguousarray(np.asarray(img)), mode, orientation


def is_near_constant(image: np.ndarray) -> bool:
    """True for an image with (almost) no content: see ``NEAR_CONSTANT_STD``."""
    grid = image[::4, ::4].reshape(-1, image.shape[2] if image.ndim == 3 else 1).astype(np.float32)
    return bool(grid.std(axis=0).max() < NEAR_CONSTANT_STD)


def decode_record(record: Record, max_pixels: int = DEFAULT_MAX_PIXELS) -> Sample | Skip:
    """A source sample's members -> a ``Sample`` (image, caption, metadata) or a ``Skip`` with its
    reason. Never raises on bad data."""
    ext = next((e for e in IMAGE_EXTS if e in record.members), None)
    if ext is None:
        return Skip(record.key, "missing_image", ",".join(sorted(record.members)))
    try:
        image, mode, orientation = decode_image(record.members[ext], max_pixels)
    except ValueError as e:
        return Skip(record.key, e.args[0], e.args[1] if len(e.args) > 1 else "")
    if "txt" not in record.members:
        return Skip(record.key, "missing_caption")
    try:
        caption = record.members["txt"].decode("utf-8").strip()
    except UnicodeDecodeError as e:
        return Skip(record.key, "invalid_caption", str(e))
    if not caption:
        return Skip(record.key, "invalid_caption", "empty caption")
    try:
        meta = json.loads(record.members.get("json", b"{}"))
    except ValueError:
        meta = {}  # img2dataset metadata is informative only; a bad one does not cost the sample
    return Sample(record.key, image, caption, meta if isinstance(meta, dict) else {},
                  record.members[ext], mode, orientation, is_near_constant(image))
