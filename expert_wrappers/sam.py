"""Optional SAM refinement of Mask R-CNN instances (off by default).

DESIGN.md §3: box-prompted refinement via ``SamPredictor.set_image`` once per image and one
``predict_torch(boxes=...)`` for all of its boxes; the detector keeps the class and score, and a
refined mask replaces the original only if the two agree (IoU >= ``iou_gate``), so SAM can sharpen
a boundary but cannot swap the object for the background or a neighbour.
"""
from __future__ import annotations

from functools import partial

import numpy as np
import torch

from . import weights as W
from ._torch import seeded
from .panoptic import Detections

SAM_URLS = {
    "vit_h": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
    "vit_l": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
}
DEFAULT_SAM_MODEL = "vit_h"
DEFAULT_IOU_GATE = 0.5


def build_smoke_sam(seed: int = 0):
    """The real ``Sam`` classes with a tiny image encoder (256 px input, 2 blocks)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    img, patch, dim = 256, 16, 32
    with seeded(seed):
        return Sam(
            image_encoder=ImageEncoderViT(depth=2, embed_dim=64, img_size=img, mlp_ratio=2,
                                          norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=2,
                                          patch_size=patch, qkv_bias=True, use_rel_pos=True,
                                          global_attn_indexes=[1], window_size=4, out_chans=dim),
            prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(img // patch, img // patch),
                                         input_image_size=(img, img), mask_in_chans=4),
            mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                     transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2),
                                     transformer_dim=dim, iou_head_depth=2, iou_head_hidden_dim=32),
            pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])


def build_default_sam(model_type: str = DEFAULT_SAM_MODEL, weights: str | None = None):
    """Returns (model, {filename: sha256})."""
    from segment_anything import sam_model_registry

    if model_type not in SAM_URLS:
        raise ValueError(f"sam_model must be one of {sorted(SAM_URLS)}, got {model_type!r}")
    url = SAM_URLS[model_type]
    filename = url.rsplit("/", 1)[1]
    path = W.resolve_file(filename, what=f"SAM refinement ({model_type})", subdir="sam", explicit=weights, url=url)
    model = sam_model_registry[model_type](checkpoint=None)  # the registry's own loader unpickles freely
    model.load_state_dict(W.load_tensors(path), strict=True)
    return model, {path.name: W.sha256_file(path)}


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of paired masks (N, H, W) bool -> (N,); two empty masks agree (IoU 1)."""
    a, b = a.flatten(1), b.flatten(1)
    inter = (a & b).sum(1).float()
    union = (a | b).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


def gate(original: torch.Tensor, refined: torch.Tensor, iou_gate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the refined mask only where it agrees with the original; returns (masks, accepted)."""
    ok = mask_iou(original, refined) >= iou_gate
    return torch.where(ok[:, None, None], refined, original), ok


class SamRefiner:
    def __init__(self, model, device: torch.device, iou_gate: float = DEFAULT_IOU_GATE,
                 min_score: float = 0.0, name: str = "sam") -> None:
        from segment_anything import SamPredictor

        self.model = model.eval().requires_grad_(False).to(device)
        self.predictor = SamPredictor(self.model)
        self.iou_gate = float(iou_gate)
        self.min_score = float(min_score)
        self.name = name
        self.last_accept_rate: float | None = None

    def refine(self, image: np.ndarray, det: Detections) -> Detections:
        """One encoder pass for the image, one decoder pass for all its boxes."""
        sel = (det.scores >= self.min_score).nonzero().squeeze(1)
        if sel.numel() == 0:
            return det
        self.predictor.set_image(image, image_format="RGB")
        boxes = self.predictor.transform.apply_boxes_torch(det.boxes[sel].float().to(self.predictor.device),
                                                          image.shape[:2])
        refined, _, _ = self.predictor.predict_torch(point_coords=None, point_labels=None, boxes=boxes,
                                                     multimask_output=False)
        self.predictor.reset_image()
        original = det.masks[sel]
        new, ok = gate(original, refined[:, 0].to(original.device), self.iou_gate)
        self.last_accept_rate = float(ok.float().mean())
        masks = det.masks.clone()
        masks[sel] = new
        return Detections(boxes=det.boxes, scores=det.scores, classes=det.classes, masks=masks)
