"""Depth expert: DPT (transformers ``DPTForDepthEstimation``), DESIGN.md §3.

Output is relative inverse depth (larger = nearer), non-negative, with an arbitrary per-checkpoint
scale (dpt-large ~6, dpt-hybrid-midas ~550 on the same image) — consumers normalise per image.

Preprocessing follows the original DPT ``run_monodepth`` rather than the hub's processor config
(which squashes every image to 384x384): keep the aspect ratio and scale "as little as possible"
so that one side reaches 384, both sides rounded to a multiple of 32 — for any image at least 384
px on both sides that is "short side 384". Bicubic, /255, mean = std = 0.5. The prediction is
resized bicubically, as the original does, straight to the size the caller asks for (the label
resolution in the pipeline, the image's size by default), and clamped at 0 because bicubic
overshoot would otherwise create small negative inverse depths.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import weights as W
from ._torch import TorchExpert, fixed_input_shape, fixed_input_shapes, seeded

DEFAULT_CHECKPOINT = "Intel/dpt-large"
CHECKPOINTS = ("Intel/dpt-large", "Intel/dpt-hybrid-midas")
NET_SIZE = 384
MULTIPLE = 32


def _constrain(x: float, multiple: int = MULTIPLE) -> int:
    # python's round, like DPT and transformers; never 0 for a thin image
    return max(multiple, int(round(x / multiple) * multiple))


def dpt_input_size(h: int, w: int, size: int = NET_SIZE) -> tuple[int, int]:
    """DPT's ``Resize(keep_aspect_ratio=True, ensure_multiple_of=32, resize_method='minimal')``."""
    sh, sw = size / h, size / w
    if abs(1 - sw) < abs(1 - sh):
        sh = sw
    else:
        sw = sh
    return _constrain(sh * h), _constrain(sw * w)


def smoke_config():
    from transformers import DPTConfig

    # dpt-large is hidden 1024 x 24 layers, taps [5, 11, 17, 23], neck [256, 512, 1024, 1024], fusion 256
    return DPTConfig(hidden_size=96, num_hidden_layers=4, num_attention_heads=2, intermediate_size=192,
                     image_size=NET_SIZE, patch_size=16, backbone_out_indices=[0, 1, 2, 3],
                     neck_hidden_sizes=[24, 48, 96, 96], fusion_hidden_size=32, readout_type="project",
                     use_auxiliary_head=False)


def large_config():
    """``Intel/dpt-large``'s architecture (its config.json): ViT-L/16 at 384, taps 5/11/17/23."""
    from transformers import DPTConfig

    return DPTConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                     image_size=NET_SIZE, patch_size=16, backbone_out_indices=[5, 11, 17, 23],
                     neck_hidden_sizes=[256, 512, 1024, 1024], fusion_hidden_size=256, readout_type="project",
                     use_auxiliary_head=False)


def random_model(config, seed: int = 0):
    """A DPT with seeded random weights whose output varies: transformers' init (std 0.02) makes a
    random DPT output ~1e-7 everywhere; torch's default init gives a map with visible structure,
    closer to what downstream sees, and the final ReLU is kept mostly open."""
    from transformers import DPTForDepthEstimation

    with seeded(seed), torch.no_grad():
        model = DPTForDepthEstimation(config)
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)):
                m.reset_parameters()
        last = model.head.head[-2]
        last.weight.mul_(20.0)
        torch.nn.init.constant_(last.bias, 1.0)
    return model


def build_model(profile: str, checkpoint: str = DEFAULT_CHECKPOINT, weights: str | None = None, seed: int = 0):
    """Returns (model, name, checkpoints)."""
    from transformers import DPTForDepthEstimation

    if profile == "smoke":
        return random_model(smoke_config(), seed), "dpt-smoke (transformers DPT, random weights)", {}
    if profile == "random":
        return random_model(large_config(), seed), "dpt-large architecture (random weights)", {}
    explicit = weights
    repo = checkpoint
    looks_like_hub_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", checkpoint) is not None
    if weights is None and (Path(checkpoint).expanduser().exists() or not looks_like_hub_id):
        # a local directory given as the checkpoint is an explicit path too
        explicit = checkpoint
    model_dir, weight_file = W.resolve_hf(repo, what=f"depth expert (DPT {repo})", files=("config.json",),
                                          weight_files=("model.safetensors", "pytorch_model.bin"),
                                          explicit=explicit)
    model = DPTForDepthEstimation.from_pretrained(str(model_dir), dtype=torch.float32)
    return model, f"dpt {repo}", {f"{repo.rstrip('/').rsplit('/', 1)[-1]}/{weight_file.name}": W.sha256_file(weight_file)}


def allow_any_input_size(model) -> None:
    """The hybrid embedding refuses any input size but ``config.image_size`` unless asked to
    resize its position embedding, which ``DPTModel`` never asks; the ViT embedding always
    resizes. Make the hybrid one resize too (once, on this instance)."""
    emb = model.dpt.embeddings if getattr(model, "dpt", None) is not None else None
    if model.config.is_hybrid and emb is not None and not getattr(emb, "_any_size", False):
        emb.forward = functools.partial(emb.forward, interpolate_pos_encoding=True)
        emb._any_size = True


def dpt_forward(model, x: torch.Tensor) -> torch.Tensor:
    """``DPTForDepthEstimation.forward`` for any multiple-of-patch input, square or not.

    transformers' own forward recovers the token grid as sqrt(tokens) unless the model has a
    separate backbone config, so it only accepts square inputs for dpt-large and dpt-hybrid; the
    original DPT keeps the aspect ratio. The neck accepts the grid explicitly, so we pass it and
    otherwise run the same modules in the same order (a test checks equality on a square input).
    Hybrid models need :func:`allow_any_input_size` first (``DPTExpert`` does it).
    """
    cfg = model.config
    patch = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
    out = model.dpt(x, output_hidden_states=True)
    taps = cfg.backbone_out_indices
    hidden = [f for i, f in enumerate(out.hidden_states[1:]) if i in taps[2 if cfg.is_hybrid else 0:]]
    if cfg.is_hybrid:
        hidden = list(out.intermediate_activations) + hidden
    feats = model.neck(hidden, x.shape[-2] // patch, x.shape[-1] // patch)
    return model.head(feats)


class DPTExpert(TorchExpert):
    task = "depth"

    def __init__(self, model, *, name: str, device="cpu", max_batch: int = 8, net_size: int = NET_SIZE,
                 input_shapes=None, checkpoints: dict | None = None, **common) -> None:
        super().__init__(device, max_batch, **common)
        allow_any_input_size(model)
        self.model = self.prepare(model)
        self.name = name
        self.net_size = int(net_size)
        self.input_shapes = fixed_input_shapes(input_shapes, MULTIPLE)
        self.checkpoints.update(checkpoints or {})

    def batch_key(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """The network input shape: DPT's minimal aspect-kept resize, or the nearest fixed shape."""
        if self.input_shapes:
            return fixed_input_shape(image_hw, self.input_shapes)
        return dpt_input_size(*image_hw, self.net_size)

    def preprocess(self, images: list[np.ndarray], key: tuple[int, int]) -> torch.Tensor:
        # on float like DPT's cv2.INTER_CUBIC on img / 255: torch's faster uint8 bicubic clips
        # between its two passes and moves some edge pixels by up to 9 levels (and is CPU-only)
        x = torch.cat([F.interpolate(t[None].float(), size=key, mode="bicubic", align_corners=False)
                       for t in self.to_device_many(images)])
        return x.div_(255.0).sub_(0.5).div_(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return dpt_forward(self.model, x).float()

    def postprocess(self, pred: torch.Tensor, hw: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Bicubic to the asked size, as the original resizes to the image; clamped at 0 because
        bicubic overshoot would otherwise make small negative inverse depths."""
        pred = F.interpolate(pred[:, None], size=hw, mode="bicubic", align_corners=False)[:, 0]
        return {"depth": pred.clamp_(min=0)}

    def describe(self) -> dict:
        d = super().describe()
        d.update(net_size=self.net_size, input_shapes=self.input_shapes, output="relative inverse depth (larger = nearer), >= 0")
        return d


def build(profile: str = "default", device: str = "cpu", *, checkpoint: str = DEFAULT_CHECKPOINT,
          weights: str | None = None, seed: int = 0, **options) -> DPTExpert:
    """Options: checkpoint ('Intel/dpt-large' | 'Intel/dpt-hybrid-midas' | local dir), weights
    (local model directory), net_size, input_shapes (a fixed set of (h, w) network inputs; each
    image is squashed to the one nearest its aspect ratio), and the common ones of
    ``TorchExpert`` (max_batch, precision, pad_batches, pin_memory, memory_format)."""
    model, name, ckpts = build_model(profile, checkpoint, weights, seed)
    return DPTExpert(model, name=name, device=device, checkpoints=ckpts, **options)
