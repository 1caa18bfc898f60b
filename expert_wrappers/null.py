"""Zero-cost experts: constant maps of the right shapes and dtypes, no model at all.

Used by the pipeline throughput benchmark (P2) to measure everything except the experts.
"""
from __future__ import annotations

import numpy as np

from ._torch import check_images
from .base import Expert

# Constants a reader can recognise: background, unit inverse depth, a wall facing the camera
# (see normal.NORMAL_CONVENTION) with kappa 1.01, NLL-AngMF's value for a zero raw output.
NULL_NORMAL = np.array([0.0, 0.0, -1.0], dtype=np.float32)
NULL_KAPPA = 1.01


class NullExpert(Expert):
    def __init__(self, task: str, confidence: bool = False) -> None:
        super().__init__()
        if task not in ("seg", "depth", "normal"):
            raise ValueError(f"unknown task {task!r}")
        self.task = task
        self.name = f"null-{task}"
        self.confidence = confidence

    def _one(self, h: int, w: int) -> dict[str, np.ndarray]:
        if self.task == "seg":
            out = {"seg": np.zeros((h, w), np.uint8)}
            if self.confidence:
                out["seg_conf"] = np.ones((h, w), np.float32)
            return out
        if self.task == "depth":
            return {"depth": np.ones((h, w), np.float32)}
        normal = np.empty((h, w, 3), np.float32)
        normal[:] = NULL_NORMAL
        return {"normal": normal, "normal_conf": np.full((h, w), NULL_KAPPA, np.float32)}

    def predict(self, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        check_images(images)
        return [self._one(*im.shape[:2]) for im in images]


def build(task: str, profile: str = "null", device: str = "cpu", *, confidence: bool = False, **_ignored) -> NullExpert:
    """Options that only matter to real experts (weights, variant, ...) are accepted and ignored,
    so one options dict works for every profile."""
    return NullExpert(task, confidence=confidence)
