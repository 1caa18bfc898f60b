"""Normals expert: NLL-AngMF (``nll_angmf.py``) -> unit normals in our camera frame + kappa.

The convention below is the label spec's; ``NATIVE_TO_OURS`` is the only place that knows the
network's own axes.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from . import weights as W
from ._torch import TorchExpert, fixed_input_shape, fixed_input_shapes, multiple_of, seeded
from .nll_angmf import NNET, official_state_dict

NORMAL_CONVENTION = """\
Surface normals (label kind "normal", float32 (H, W, 3)) are unit vectors in the camera frame of
the image, OpenCV convention: x points right (along image columns), y points down (along image
rows), z points forward (along the optical axis, into the scene); pixel (u, v) looks along the ray
r = ((u - cx) / f, (v - cy) / f, 1).

Stored normals point toward the camera: every visible surface has n . r < 0. Examples: a
fronto-parallel wall facing the camera is (0, 0, -1); a floor seen from above the horizon is
(0, -1, 0); a ceiling is (0, 1, 0); a wall on the left of the image, facing right, is (1, 0, 0);
a wall on the right of the image, facing left, is (-1, 0, 0).

"normal_conf" (float32 (H, W)) is NLL-AngMF's kappa, the concentration of the angular von
Mises-Fisher distribution: > 0.01 (ELU(k) + 1.01), larger = more certain. Its expected angular error (radians) is
alpha(kappa) = 2 kappa / (kappa^2 + 1) + pi exp(-kappa pi) / (1 + exp(-kappa pi)).

NLL-AngMF's native output is the negation of ours: x left, y up, z toward the camera, with
camera-facing normals (a left-handed frame). The official code never states its axes; we read
them off the official README figure (figs/readme_generalize.png, drawn with test.py's
rgb = (n + 1) / 2 * 255): in the line drawing of a box-shaped room the back wall is
(140, 152, 255) -> n ~ (0.1, 0.2, 1.0), the ceiling (132, 8, 163) -> (0.0, -0.9, 0.3), the left
wall (44, 139, 136) -> (-0.7, 0.1, 0.1), the right wall (246, 139, 138) -> (0.9, 0.1, 0.1), and in
the drawing of a corner the floor (151, 229, 215) -> (0.2, 0.8, 0.7). The NYU loader agrees on
the x axis (horizontal flip augmentation negates channel 0 only); two users' experiments in
upstream issue #13 found the same sign flip (OpenCV = native * (-1, -1, -1)), and the author's
follow-up DSINE documents the same vectors (a fronto-parallel wall is (0, 0, 1) in right-down-front
axes). So: ours = -native.
"""

NATIVE_TO_OURS = torch.diag(torch.tensor([-1.0, -1.0, -1.0]))
CHECKPOINT_FILES = {"BN": "scannet.pt", "GN": "nyu.pt"}
DRIVE_URL = "https://drive.google.com/drive/folders/1Ku25Am69h_HrbtcCptXn4aetjo7sB33F"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TARGET_PIXELS = 640 * 480  # the official demo's input size; we keep the aspect ratio at that area
SMOKE_TARGET_PIXELS = 320 * 240  # a quarter: keeps the smoke stack near a second per image on a CPU


def nll_input_size(h: int, w: int, pixels: int = TARGET_PIXELS) -> tuple[int, int]:
    """Aspect ratio kept, area ~``pixels``, both sides multiples of 32 (5 stride-2 stages)."""
    s = math.sqrt(pixels / (h * w))
    return multiple_of(h * s, 32), multiple_of(w * s, 32)


def kappa_to_alpha(kappa: np.ndarray) -> np.ndarray:
    """Expected angular error in radians for a predicted kappa."""
    k = np.asarray(kappa, dtype=np.float64)
    return (2 * k / (k ** 2 + 1) + np.pi * np.exp(-k * np.pi) / (1 + np.exp(-k * np.pi))).astype(np.float32)


def build_model(profile: str, variant: str = "BN", weights: str | None = None, seed: int = 0):
    """Returns (model, name, checkpoints)."""
    if variant not in CHECKPOINT_FILES:
        raise ValueError(f"variant must be one of {sorted(CHECKPOINT_FILES)}, got {variant!r}")
    if profile == "smoke":
        with seeded(seed):
            model = NNET(variant, arch="tf_efficientnet_b0_ap", widths=(64, 48, 32, 16), mlp_hidden=32)
        return model, f"nll-angmf-{variant}-b0-smoke (random weights)", {}
    if profile == "random":
        with seeded(seed):
            model = NNET(variant)
        return model, f"nll-angmf-{variant} architecture (random weights)", {}
    filename = CHECKPOINT_FILES[variant]
    path = W.resolve_file(
        filename, what=f"normal expert (NLL-AngMF, variant {variant})", subdir="nll_angmf", explicit=weights,
        url=None,
        how=(f"download {filename} from the authors' Google Drive folder {DRIVE_URL} "
             f"(no automatic download exists) and put it at {W.weights_dir() / 'nll_angmf' / filename}, "
             f"or pass weights=/path/{filename} (CLI: --weights normal=/path/{filename})"))
    model = NNET(variant)
    model.load_state_dict(official_state_dict(W.load_tensors(path)), strict=True)
    return model, f"nll-angmf-{variant} ({filename})", {path.name: W.sha256_file(path)}


class NormalExpert(TorchExpert):
    task = "normal"

    def __init__(self, model, *, name: str, device="cpu", max_batch: int = 4, target_pixels: int = TARGET_PIXELS,
                 input_shapes=None, checkpoints: dict | None = None, **common) -> None:
        super().__init__(device, max_batch, **common)
        self.model = self.prepare(model)
        self.name = name
        self.target_pixels = int(target_pixels)
        self.input_shapes = fixed_input_shapes(input_shapes, 32)
        self.checkpoints.update(checkpoints or {})
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1) * 255.0
        self._to_ours = NATIVE_TO_OURS.to(self.device)

    def batch_key(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """The network input shape: aspect kept at the demo's area, or the nearest fixed shape."""
        if self.input_shapes:
            return fixed_input_shape(image_hw, self.input_shapes)
        return nll_input_size(*image_hw, self.target_pixels)

    def preprocess(self, images: list[np.ndarray], key: tuple[int, int]) -> torch.Tensor:
        """Antialiased bilinear (PIL's bilinear, as the official loader resizes) on float: torch
        has that kernel for uint8 on CPU only, so every device takes the float path (it differs
        from the uint8 one by at most one grey level: the uint8 kernel rounds)."""
        xs = []
        for t in self.to_device_many(images):
            x = t[None].float()
            if tuple(x.shape[-2:]) != tuple(key):
                x = F.interpolate(x, size=key, mode="bilinear", align_corners=False, antialias=True)
            xs.append(x)
        return (torch.cat(xs) - self._mean) / self._std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.model(x)[-1].float()  # the full-resolution prediction

    def postprocess(self, out: torch.Tensor, hw: tuple[int, int]) -> dict[str, torch.Tensor]:
        """(B, 4, h, w) native -> normals (B, H, W, 3) in our frame, kappa (B, H, W), contiguous."""
        if tuple(out.shape[-2:]) != tuple(hw):
            out = F.interpolate(out, size=hw, mode="bilinear", align_corners=False)
        n = torch.matmul(out[:, :3].permute(0, 2, 3, 1), self._to_ours.T)  # also makes it (B, H, W, 3)
        n = n.mul_(torch.linalg.vector_norm(n, dim=-1, keepdim=True).clamp_min_(1e-6).reciprocal_())
        return {"normal": n, "normal_conf": out[:, 3].contiguous()}

    def describe(self) -> dict:
        d = super().describe()
        d.update(target_pixels=self.target_pixels, input_shapes=self.input_shapes, frame="OpenCV camera frame, normals toward the camera",
                 normal_conf="kappa (AngMF concentration, > 1)")
        return d


def build(profile: str = "default", device: str = "cpu", *, variant: str = "BN", weights: str | None = None,
          seed: int = 0, **options) -> NormalExpert:
    """Options: variant ('BN' = scannet.pt, default | 'GN' = nyu.pt), weights (path to the
    official checkpoint), target_pixels, input_shapes (a fixed set of (h, w) network inputs; each
    image is squashed to the one nearest its aspect ratio), and the common ones of
    ``TorchExpert`` (max_batch, precision, pad_batches, pin_memory, memory_format)."""
    model, name, ckpts = build_model(profile, variant, weights, seed)
    if profile == "smoke":
        options.setdefault("target_pixels", SMOKE_TARGET_PIXELS)
    return NormalExpert(model, name=name, device=device, checkpoints=ckpts, **options)
