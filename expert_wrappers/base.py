"""The one small interface every expert implements.

An expert takes a batch of RGB uint8 images (H, W, 3) of arbitrary sizes and, optionally, the size
(H', W') each image's maps should have (the pipeline asks for the label resolution, so maps are
resized once, on the device; default: the image's own size). It returns, per image, a dict of
dense maps keyed by label kind (see ``pipeline.labels.KINDS``):

    seg expert    -> {"seg": uint8 (H, W), optional "seg_conf": float32 (H, W),
                      optional "instance_classes": int64 (N,) classes of the painted instances}
    depth expert  -> {"depth": float32 (H, W) relative inverse depth, larger = nearer}
    normal expert -> {"normal": float32 (H, W, 3) unit vectors, "normal_conf": float32 (H, W) kappa}

Any map may instead be ``pipeline.labels.Codes`` at the requested size: the stored codes, computed
on the expert's device (``device_codes``, on by default on CUDA; see ``pipeline.labels_torch``).
"""
from __future__ import annotations

import abc

import numpy as np

# precision options of torch experts (``_torch.resolve_precision``); here so CLIs can check them
# without importing torch
PRECISIONS = ("auto", "bf16", "fp16", "fp32", "tf32")


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
    def predict(self, images: list[np.ndarray], sizes: list[tuple[int, int]] | None = None) -> list[dict]:
        """Dense maps per image at ``sizes[i]`` (default: the image's resolution)."""

    def describe(self) -> dict:
        """What the manifest records about this expert."""
        return {"task": self.task, "name": self.name, "checkpoints": dict(self.checkpoints)}
