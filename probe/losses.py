"""Probe losses (paper Section 4.3). Segmentation uses the trainer's cross-entropy
(``trainer.losses.seg_loss``, ignore index 255); the two regression losses are here.

- ``ssi_loss``: scale-and-shift-invariant loss in disparity space (Bhat et al. 2023, ZoeDepth's
  ``ScaleAndShiftInvariantLoss``; Ranftl et al. 2022): per image, the prediction is aligned to the
  ground-truth disparity 1/depth by the least-squares scale and shift over the valid pixels
  (``probe.metrics.align_scale_shift``, the evaluation's alignment too), then the mean absolute
  difference over the valid pixels of the batch.
- ``angmf_nll_loss``: NLL-AngMF (Bae et al. 2021), the negative log-likelihood of the angular von
  Mises-Fisher distribution with the predicted concentration kappa as learned attenuation:
  -log(kappa^2 + 1) + kappa * theta + log(1 + exp(-kappa * pi)), theta = angle between the
  predicted and true normal. As in the official code, pixels whose cosine is within 1e-3 of +-1 are
  left out (acos has an unbounded gradient there).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from probe.metrics import align_scale_shift

COS_LIMIT = 0.999


def ssi_loss(pred_disparity: torch.Tensor, gt_depth: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """pred_disparity (B, H, W) raw head output; gt_depth (B, H, W) metric depth; valid (B, H, W)."""
    pred = pred_disparity.float()
    n = valid.sum()
    if int(n) == 0:
        return pred.sum() * 0.0  # keeps the graph (and DDP's gradient buckets) intact
    target = torch.where(valid, 1.0 / gt_depth.float().clamp_min(1e-6), torch.zeros_like(pred))
    s, t = align_scale_shift(pred, target, valid)
    return ((s * pred + t - target).abs() * valid).sum() / n


def angmf_nll_loss(pred: torch.Tensor, gt_normal: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """pred (B, 4, H, W): unit xyz and kappa (``expert_wrappers.nll_angmf.norm_normalize`` output);
    gt_normal (B, 3, H, W) unit vectors; valid (B, H, W)."""
    pred = pred.float()
    dot = F.cosine_similarity(pred[:, :3], gt_normal.float(), dim=1)
    keep = valid & (dot.detach().abs() < COS_LIMIT)
    if int(keep.sum()) == 0:
        return pred.sum() * 0.0
    theta = torch.acos(dot[keep])
    kappa = pred[:, 3][keep]
    nll = -torch.log(kappa * kappa + 1.0) + kappa * theta + F.softplus(-kappa * math.pi)
    return nll.mean()
