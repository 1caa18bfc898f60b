"""The label format as the pipeline uses it: everything of ``cliptex_labels.format`` (the one
definition, numpy + zstandard only), plus ``resize_map``, which brings an expert's map to the label
resolution with Pillow."""
from __future__ import annotations

import numpy as np

from cliptex_labels.format import *  # noqa: F403 - this module is the format, as the pipeline sees it
from cliptex_labels.format import __all__ as _format_names

__all__ = [*_format_names, "resize_map"]


def resize_map(kind: str, arr: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Resize an expert's full-resolution map to the label resolution ``hw`` = (H, W):
    nearest for class ids, area-weighted (box) for continuous maps, renormalised for normals."""
    from PIL import Image

    if tuple(arr.shape[:2]) == tuple(hw):
        return arr
    size = (hw[1], hw[0])
    if kind == "seg":
        return np.asarray(Image.fromarray(arr).resize(size, Image.NEAREST))
    resample = Image.BOX if hw[0] <= arr.shape[0] else Image.BILINEAR

    def plane(a):
        return np.asarray(Image.fromarray(np.ascontiguousarray(a, np.float32), "F").resize(size, resample))

    if kind != "normal":
        return plane(arr)
    # per-channel planes, renormalised without an (N, 3) norm: several times faster in numpy
    x, y, z = (plane(arr[..., c]) for c in range(3))
    inv = 1 / np.sqrt(np.maximum(x * x + y * y + z * z, np.float32(1e-12)))
    out = np.empty(tuple(hw) + (3,), np.float32)
    out[..., 0], out[..., 1], out[..., 2] = x * inv, y * inv, z * inv
    return out
