"""The label format as the pipeline uses it: everything of ``cliptex_labels.format`` (the one
definition, numpy + zstandard only), plus ``resize_map``, which brings an expert's map to the label
resolution with Pillow."""
from __future__ import annotations

import numpy as np

from cliptex_labels.format import *  # noqa: F403 - this module is the format, as the pipeline sees it
from cliptex_labels.format import __all__ as _format_names

__all__ = [*_format_names, "resize_map"]


def box_starts(n_in: int, n_out: int, arange=np.arange):
    """Shrinking n_in pixels to n_out by box averaging: output i is the mean of the input pixels
    ``starts[i]:starts[i + 1]``, those whose centre lies in its footprint (i s, (i + 1) s],
    s = n_in / n_out. Integer arithmetic, so every pixel belongs to exactly one output and a centre
    on a footprint edge (n_in odd, n_out even ...) always goes the same way, on any device. PIL's
    BOX filter decides those ties by floating-point rounding, which also counts some such pixels
    twice. ``arange``: ``np.arange`` or a device's ``torch.arange`` (the device twin,
    ``expert_wrappers._torch.resize_on_device``)."""
    i = arange(n_out + 1)
    return (2 * n_in * i - n_out) // (2 * n_out) + 1  # first pixel with centre > i s; starts[n_out] == n_in


def _box_shrink(arr: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(H, W) float -> hw by ``box_starts`` runs, columns then rows (as PIL's two passes)."""
    out = arr.astype(np.float32, copy=False)
    for axis, n_out in ((1, hw[1]), (0, hw[0])):
        starts = box_starts(out.shape[axis], n_out)
        counts = np.diff(starts).astype(np.float32)
        out = np.add.reduceat(out, starts[:-1], axis=axis) / (counts[None, :] if axis == 1 else counts[:, None])
    return out


def resize_map(kind: str, arr: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Resize an expert's full-resolution map to the label resolution ``hw`` = (H, W):
    nearest for class ids, box-averaged (``box_starts``) for continuous maps when shrinking,
    bilinear when enlarging, renormalised for normals."""
    from PIL import Image

    if tuple(arr.shape[:2]) == tuple(hw):
        return arr
    size = (hw[1], hw[0])
    if kind == "seg":
        return np.asarray(Image.fromarray(arr).resize(size, Image.NEAREST))
    shrink = hw[0] <= arr.shape[0] and hw[1] <= arr.shape[1]

    def plane(a):
        if shrink:
            return _box_shrink(a, hw)
        return np.asarray(Image.fromarray(np.ascontiguousarray(a, np.float32), "F").resize(size, Image.BILINEAR))

    if kind != "normal":
        return plane(arr)
    # per-channel planes, renormalised without an (N, 3) norm: several times faster in numpy
    x, y, z = (plane(arr[..., c]) for c in range(3))
    inv = 1 / np.sqrt(np.maximum(x * x + y * y + z * z, np.float32(1e-12)))
    out = np.empty(tuple(hw) + (3,), np.float32)
    out[..., 0], out[..., 1], out[..., 2] = x * inv, y * inv, z * inv
    return out
