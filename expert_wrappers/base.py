"""The one small interface every expert implements.

An expert takes a batch of RGB uint8 images (H, W, 3) of arbitrary sizes and returns, per image, a
dict of dense maps at that image's resolution, keyed by label kind (see ``pipeline.labels.KINDS``):

    seg expert    -> {"seg": uint8 (H, W), optional "seg_conf": float32 (H, W),
                      optional "instance_classes": int64 (N,) classes of the painted instances}
    depth expert  -> {"depth": float32 (H, W) relative inverse depth, larger = nearer}
    normal expert -> {"normal": float32 (H, W, 3) unit vectors, "normal_conf": float32 (H, W) kappa}
"""
from __future__ import annotations

import abc

import numpy as np


class MissingWeightsError(RuntimeError):
    """Weights needed by the default profile are not available (offline, or a file with no public
    source). The message names the file and how to supply it; CLIs turn it into exit code 2."""


class MissingDependencyError(ImportError):
    """An optional backend (detectron2, ...) was asked for but is not installed. The message says
    how to install it or which default to use instead; CLIs turn it into exit code 2."""


class Expert(abc.ABC):
    task: str = ""  # "seg" | "depth" | "normal"
    name: str = ""

    def __init__(self) -> None:
        # checkpoint file name -> sha256, for the manifest
        self.checkpoints: dict[str, str] = {}

    @abc.abstractmethod
    def predict(self, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Dense maps per image at that image's resolution."""

    def describe(self) -> dict:
        """What the manifest records about this expert."""
        return {"task": self.task, "name": self.name, "checkpoints": dict(self.checkpoints)}
