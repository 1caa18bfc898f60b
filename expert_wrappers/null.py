"""Zero-cost experts: constant maps of the right shapes and dtypes, no model at all.

Used by the pipeline throughput benchmark (P2) to measure everything except the experts. By
default they hand over constant label *codes* (``pipeline.labels.Codes``), as a GPU expert does
with ``device_codes`` on — the device's work, model and conversion alike, is what "zero-cost"
leaves out. ``device_codes=False`` hands over float maps instead, which the worker's host encoder
converts (the CPU-expert path).
"""
from __future__ import annotations

import functools

import numpy as np

from pipeline import labels

from ._torch import check_images, output_sizes
from .base import Expert

# Constants a reader can recognise: background, unit inverse depth, a wall facing the camera
# (see normal.NORMAL_CONVENTION) with kappa 1.01, NLL-AngMF's value for a zero raw output.
NULL_NORMAL = np.array([0.0, 0.0, -1.0], dtype=np.float32)
NULL_KAPPA = 1.01
NULL_VALUES = {"seg": 0, "seg_conf": 1.0, "depth": 1.0, "normal": NULL_NORMAL, "normal_conf": NULL_KAPPA}


def constant_map(kind: str, hw: tuple[int, int]) -> np.ndarray:
    """A read-only constant float (uint8 for seg) map: a broadcast view, no per-pixel memory."""
    value = NULL_VALUES[kind]
    if kind == "seg":
        return np.broadcast_to(np.uint8(value), hw)
    if kind == "normal":
        return np.broadcast_to(value, tuple(hw) + (3,))
    return np.broadcast_to(np.float32(value), hw)


@functools.lru_cache(maxsize=None)
def _one_pixel(kind: str) -> labels.Codes:
    return labels.to_codes(kind, constant_map(kind, (1, 1)))


def constant_codes(kind: str, hw: tuple[int, int]) -> labels.Codes:
    """The codes ``labels.to_codes`` gives a constant map, without touching every pixel of a float
    map (a test checks they are equal)."""
    one = _one_pixel(kind)
    codes = np.full(hw, one.codes[0, 0], dtype=one.codes.dtype)
    histogram = None
    if kind == "seg":
        histogram = np.zeros(256, np.int64)
        histogram[one.codes[0, 0]] = hw[0] * hw[1]
    return labels.Codes(kind, codes, lo=one.lo, hi=one.hi, histogram=histogram)


class NullExpert(Expert):
    def __init__(self, task: str, confidence: bool = False, device_codes: bool = True) -> None:
        super().__init__()
        self.task = task
        self.name = f"null-{task}"
        # as the real experts: every kind of the task, the seg score map only when asked for
        self.kinds = tuple(k for k in labels.kinds_of(task) if k != "seg_conf" or confidence)
        self.device_codes = bool(device_codes)
        for kind in self.kinds:  # "loading": the one-off tables behind the codes, not the first batch
            _one_pixel(kind)

    def predict(self, images: list[np.ndarray], sizes=None) -> list[dict]:
        check_images(images)
        make = constant_codes if self.device_codes else constant_map
        return [{kind: make(kind, hw) for kind in self.kinds} for hw in output_sizes(images, sizes)]

    def describe(self) -> dict:
        return {**super().describe(), "device_codes": self.device_codes}


def build(task: str, profile: str = "null", device: str = "cpu", *, confidence: bool = False,
          device_codes: bool = True, **_ignored) -> NullExpert:
    """Options that only matter to real experts (weights, variant, ...) are accepted and ignored,
    so one options dict works for every profile."""
    return NullExpert(task, confidence=confidence, device_codes=device_codes)
