"""CLIPTeX objective (paper Eq. 1): L = l_clip * L_clip + sum_t l_t * L_t.

- L_clip: symmetric InfoNCE with the learnable temperature over the *global* batch. open_clip's
  ``ClipLoss(local_loss=True, gather_with_grad=True)``: features are all-gathered with gradients, each
  rank scores its own rows against every column; DDP's gradient averaging then gives exactly the
  gradient of the full global-batch loss.
- seg: cross-entropy, ignore index 255 (pipeline.labels.SEG_IGNORE).
- depth: L1 over valid pixels against a per-image normalised target. The expert's relative inverse
  depth has an arbitrary scale (and shift) per image and checkpoint, so each target map is normalised
  as t = (d - median(d)) / mean|d - median(d)| over its valid pixels (MiDaS' scale-shift
  normalisation); the head regresses t directly.
- normal: L1 over valid pixels and the three components (mean absolute error) between the raw head
  output and the unit-normal target; optionally weighted per pixel by the expert's kappa, normalised
  to mean 1 per image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.labels import SEG_IGNORE


def _zero(pred: torch.Tensor) -> torch.Tensor:
    return pred.sum() * 0.0  # keeps the graph (and DDP's gradient buckets) intact


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    target = target.long()
    valid = target != SEG_IGNORE
    n = int(valid.sum())
    if n == 0:
        return _zero(logits)
    return F.cross_entropy(logits.float(), target, ignore_index=SEG_IGNORE, reduction="sum") / n


def normalise_depth(depth: torch.Tensor, valid: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per image: (d - median) / mean|d - median| over valid pixels. depth, valid: (B, H, W)."""
    d = depth.float().flatten(1).masked_fill(~valid.flatten(1), float("nan"))
    med = d.nanmedian(dim=1).values[:, None]
    scale = (d - med).abs().nanmean(dim=1, keepdim=True).clamp_min(eps)
    out = torch.nan_to_num((d - med) / scale, nan=0.0)
    return out.view_as(depth)


def depth_loss(pred: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """pred (B, 1, H, W), depth (B, H, W) relative inverse depth from the expert."""
    valid = torch.isfinite(depth)
    n = int(valid.sum())
    if n == 0:
        return _zero(pred)
    target = normalise_depth(torch.where(valid, depth, torch.zeros_like(depth)), valid)
    return (pred[:, 0].float() - target).abs()[valid].sum() / n


def normal_loss(pred: torch.Tensor, normal: torch.Tensor, kappa: torch.Tensor | None = None) -> torch.Tensor:
    """pred (B, 3, H, W), normal (B, 3, H, W) unit vectors, kappa (B, H, W) or None."""
    valid = torch.isfinite(normal).all(1) & (normal.abs().sum(1) > 0)
    n = int(valid.sum())
    if n == 0:
        return _zero(pred)
    err = (pred.float() - torch.nan_to_num(normal)).abs().mean(1)  # (B, H, W)
    if kappa is not None:
        k = torch.nan_to_num(kappa).clamp_min(0) * valid
        mean = k.flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1)
        err = err * (k / mean.clamp_min(1e-6)[:, None, None])
    return err[valid].sum() / n


class CLIPTeXLoss(nn.Module):
    def __init__(self, weights: dict[str, float], tasks: list[str], rank: int = 0, world_size: int = 1,
                 kappa_weight: bool = False):
        super().__init__()
        from open_clip.loss import ClipLoss

        self.weights = dict(weights)
        self.tasks = list(tasks)
        self.kappa_weight = kappa_weight
        self.clip = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=False,
                             rank=rank, world_size=world_size)

    def forward(self, out: dict, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms = {"clip": self.clip(out["image_features"].float(), out["text_features"].float(),
                                   out["logit_scale"].float())}
        if "seg" in self.tasks:
            terms["seg"] = seg_loss(out["seg"], batch["seg"])
        if "depth" in self.tasks:
            terms["depth"] = depth_loss(out["depth"], batch["depth"])
        if "normal" in self.tasks:
            terms["normal"] = normal_loss(out["normal"], batch["normal"],
                                          batch.get("normal_conf") if self.kappa_weight else None)
        total = sum(self.weights[k] * v for k, v in terms.items())
        return total, terms
