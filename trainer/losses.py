"""CLIPTeX objective (paper Eq. 1): L = l_clip * L_clip + sum_t l_t * L_t.

- L_clip: symmetric InfoNCE with the learnable temperature over the *global* batch. open_clip's
  ``ClipLoss(local_loss=True, gather_with_grad=True)``: features are all-gathered with gradients, each
  rank scores its own rows against every column; DDP's gradient averaging then gives exactly the
  gradient of the full global-batch loss.
- The heads predict at the feature grid; each prediction is nearest-upsampled to its label map's size
  (paper, Section 3) inside the loss, so the upsampled tensors exist only where they are cheap.
- seg: cross-entropy, ignore index 255 (pipeline.labels.SEG_IGNORE), summed over the label pixels.
  Under nearest upsampling every label pixel takes the logits of one grid cell, so the sum equals
  the cross-entropy of each cell's logits against the counts of the classes its pixels hold: computed
  that way, the 81-channel logits are never blown up to the label size (on a GPU that tensor and its
  gradient were most of the seg term's memory traffic).
- depth: L1 over valid pixels against a per-image normalised target. The expert's relative inverse
  depth has an arbitrary scale (and shift) per image and checkpoint, so each target map is normalised
  as t = (d - median(d)) / mean|d - median(d)| over its valid pixels (MiDaS' scale-shift
  normalisation); the head regresses t directly.
- normal: L1 over valid pixels and the three components (mean absolute error) between the raw head
  output and the unit-normal target; optionally weighted per pixel by the expert's kappa, normalised
  to mean 1 per image.

No term waits for the device: pixel counts stay tensors (``clamp_min(1)`` makes a task with no valid
pixel contribute 0, not NaN) and invalid pixels are zeroed with ``torch.where``, not removed by boolean
indexing, whose output size the host would have to learn first (tests/test_train_units.py guards it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.labels import SEG_IGNORE


def to_label_size(pred: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Head output (B, C, h, w) nearest-upsampled to the label map's (H, W)."""
    return pred if tuple(pred.shape[-2:]) == tuple(size) else F.interpolate(pred, size=tuple(size), mode="nearest")


def nearest_source_cell(grid: tuple[int, int], size: tuple[int, int], device) -> torch.Tensor:
    """For each pixel of an (H, W) map, the flat index of the (h, w) grid cell that nearest
    upsampling copies into it: (H * W,) int64. Made by ``F.interpolate`` itself, so it is the
    kernel's own choice at every size, not a re-derivation of its rounding."""
    h, w = grid
    cells = torch.arange(h * w, device=device, dtype=torch.float32).view(1, 1, h, w)  # exact below 2**24
    return to_label_size(cells, size).view(-1).long()


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """logits (B, C, h, w) at any grid, target (B, H, W) class ids or SEG_IGNORE. Equals
    ``cross_entropy(to_label_size(logits, (H, W)), target, ignore_index=255, reduction="sum")``
    divided by the number of labelled pixels."""
    b, c, h, w = logits.shape
    target = target.long()
    valid = target != SEG_IGNORE
    torch._assert_async(((target < c) | ~valid).all(), "seg label id out of range")  # checked on the device
    cell = nearest_source_cell((h, w), target.shape[-2:], logits.device)
    slot = cell * c + torch.where(valid, target, 0).flatten(1)  # (B, H*W) into (h*w*C)
    counts = torch.zeros(b, h * w * c, device=logits.device).scatter_add_(1, slot, valid.flatten(1).float())
    counts = counts.view(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, h, w): pixels of each class per cell
    n = valid.sum().clamp_min(1)
    return F.cross_entropy(logits.float(), counts, reduction="sum") / n


def normalise_depth(depth: torch.Tensor, valid: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per image: (d - median) / mean|d - median| over valid pixels. depth, valid: (B, H, W)."""
    d = depth.float().flatten(1).masked_fill(~valid.flatten(1), float("nan"))
    med = d.nanmedian(dim=1).values[:, None]
    scale = (d - med).abs().nanmean(dim=1, keepdim=True).clamp_min(eps)
    out = torch.nan_to_num((d - med) / scale, nan=0.0)
    return out.view_as(depth)


def depth_loss(pred: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """pred (B, 1, h, w) at any grid, depth (B, H, W) relative inverse depth from the expert."""
    valid = torch.isfinite(depth)
    target = normalise_depth(torch.where(valid, depth, 0.0), valid)
    err = (to_label_size(pred, depth.shape[-2:])[:, 0].float() - target).abs()
    return torch.where(valid, err, 0.0).sum() / valid.sum().clamp_min(1)


def normal_loss(pred: torch.Tensor, normal: torch.Tensor, kappa: torch.Tensor | None = None) -> torch.Tensor:
    """pred (B, 3, h, w) at any grid, normal (B, 3, H, W) unit vectors, kappa (B, H, W) or None."""
    valid = torch.isfinite(normal).all(1) & (normal.abs().sum(1) > 0)
    err = (to_label_size(pred, normal.shape[-2:]).float() - torch.nan_to_num(normal)).abs().mean(1)  # (B, H, W)
    if kappa is not None:
        k = torch.nan_to_num(kappa).clamp_min(0) * valid
        mean = k.flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1)
        err = err * (k / mean.clamp_min(1e-6)[:, None, None])
    return torch.where(valid, err, 0.0).sum() / valid.sum().clamp_min(1)


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
        terms.update(self.dense(out, batch))
        total = sum(self.weights[k] * v for k, v in terms.items())
        return total, terms

    def dense(self, out: dict, batch: dict) -> dict[str, torch.Tensor]:
        """The dense terms alone (``trainer.model.compile_dense`` compiles this)."""
        return dense_terms(out, batch, self.tasks, self.kappa_weight)


def dense_terms(out: dict, batch: dict, tasks: list[str], kappa_weight: bool = False) -> dict[str, torch.Tensor]:
    """The dense terms of the selected tasks: head outputs ``out[task]`` against ``batch`` labels."""
    terms = {}
    if "seg" in tasks:
        terms["seg"] = seg_loss(out["seg"], batch["seg"])
    if "depth" in tasks:
        terms["depth"] = depth_loss(out["depth"], batch["depth"])
    if "normal" in tasks:
        if kappa_weight and "normal_conf" not in batch:
            raise KeyError("loss.normal_kappa_weight is set but the batch has no normal_conf labels")
        terms["normal"] = normal_loss(out["normal"], batch["normal"], batch["normal_conf"] if kappa_weight else None)
    return terms
