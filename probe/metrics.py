"""Evaluation metrics of the probes and of zero-shot evaluation: one definition each.

Every accumulator keeps its state in one float64 tensor of sums (``state``), so a DDP evaluation
adds the ranks' states with one ``all_reduce`` and gets exactly the single-process result; the
``compute`` methods turn sums into the reported numbers.

- Segmentation (``SegMetric``): a confusion matrix summed over the whole split. IoU_c = TP / (TP +
  FP + FN); a class with an empty union (in neither the ground truth nor the prediction of any
  evaluated pixel) is *absent* and left out of the mean; pixels labelled ``ignore_index`` count
  for nothing. A class in the ground truth that is never predicted has IoU 0.
- Depth (``DepthMetric``): per image, over its valid pixels, AbsRel = mean |d - g| / g and
  delta_k = fraction with max(d/g, g/d) < 1.25^k; reported as the mean over images (Eigen et al.'s
  convention, also MiDaS'/DPT's). An image without any valid pixel is skipped and counted.
  ``align_scale_shift`` is the least-squares scale and shift of Ranftl et al. (2022) used both by
  the scale-and-shift-invariant loss and by the evaluation (``disparity_to_depth``).
- Surface normals (``NormalMetric``): angular error atan2(|a x b|, a . b) in degrees (exact at 0 and
  180 degrees, where acos loses precision), over all valid pixels of the split: mean, median and
  the percentage under 11.25, 22.5 and 30 degrees (Bae et al. 2021). The median comes from a
  histogram of ``MEDIAN_BIN_DEG`` wide bins (exact sums cannot give it across ranks), so it is
  exact to half a bin (0.005 degrees); the other numbers are exact.
- Ranking (``hits_at_k``): the tie rule of top-k accuracy and of retrieval recall@k. A query hits
  at k when fewer than k *wrong* candidates score at least as high as its best correct candidate:
  a wrong candidate tied with the correct one counts as ranked ahead of it (the pessimistic rule,
  so a constant score never earns a hit and the result does not depend on candidate order).
"""
from __future__ import annotations

import math

import torch

NORMAL_THRESHOLDS_DEG = (11.25, 22.5, 30.0)
MEDIAN_BIN_DEG = 0.01


# ---- ranking: top-k accuracy and retrieval recall -------------------------------------------------

def hits_at_k(scores: torch.Tensor, positives: torch.Tensor, ks) -> dict[int, torch.Tensor]:
    """scores (Q, N) of Q queries against N candidates; positives (Q, N) bool, at least one per
    query. Returns {k: (Q,) bool}: the best correct candidate of the query ranks within the top k,
    ties with wrong candidates counted against it (module docstring)."""
    scores = scores.float()
    positives = positives.bool()
    if not positives.any(dim=1).all():
        raise ValueError("every query needs at least one correct candidate")
    best = scores.masked_fill(~positives, float("-inf")).amax(dim=1, keepdim=True)
    ahead = ((scores >= best) & ~positives).sum(dim=1)  # wrong candidates ranked at or above it
    return {k: ahead < k for k in ks}


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, torch.Tensor]:
    """logits (B, C), labels (B,) -> {k: (B,) bool} by the tie rule of ``hits_at_k``."""
    positives = torch.zeros_like(logits, dtype=torch.bool)
    positives[torch.arange(len(labels), device=labels.device), labels.long()] = True
    return hits_at_k(logits, positives, [k for k in ks if k <= logits.shape[1]])


def retrieval_recall(similarity: torch.Tensor, text_to_image: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """similarity (I, T) between I images and T texts; text_to_image (T,) the image index of each
    text (an image may own several texts, as Flickr30k's five captions). Returns percentages
    ``image_to_text_R@k`` (text retrieval: an image query hits when any of its own texts ranks
    within k) and ``text_to_image_R@k`` (image retrieval)."""
    n_img, n_txt = similarity.shape
    owner = text_to_image.long().to(similarity.device)
    positives = torch.zeros(n_img, n_txt, dtype=torch.bool, device=similarity.device)
    positives[owner, torch.arange(n_txt, device=similarity.device)] = True
    i2t = hits_at_k(similarity, positives, ks)
    t2i = hits_at_k(similarity.t(), positives.t(), ks)
    out = {f"image_to_text_R@{k}": 100.0 * i2t[k].float().mean().item() for k in ks}
    out.update({f"text_to_image_R@{k}": 100.0 * t2i[k].float().mean().item() for k in ks})
    return out


class _Sums:
    """A float64 vector of sums that DDP ranks add together."""

    def __init__(self, size: int, device=None):
        self.state = torch.zeros(size, dtype=torch.float64, device=device)

    def all_reduce(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.state)


class TopKMetric(_Sums):
    """Top-k accuracy (percent) over a split: state = [count, hits@k1, hits@k2, ...]."""

    def __init__(self, ks=(1, 5), device=None):
        self.ks = tuple(ks)
        super().__init__(1 + len(self.ks), device)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        hits = topk_correct(logits, labels, self.ks)
        add = [float(len(labels))] + [float(hits[k].sum()) if k in hits else float(len(labels)) for k in self.ks]
        self.state += torch.tensor(add, dtype=torch.float64, device=self.state.device)

    def compute(self) -> dict[str, float]:
        n = max(1.0, self.state[0].item())
        return {f"top{k}": 100.0 * self.state[1 + i].item() / n for i, k in enumerate(self.ks)} | {
            "num_images": int(self.state[0].item())}


# ---- segmentation -----------------------------------------------------------------------------------

class SegMetric(_Sums):
    """Confusion matrix over a split (rows: ground truth, columns: prediction)."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device=None):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        super().__init__(num_classes * num_classes, device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred, target: integer maps of the same shape (any batch layout)."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        target = target.long().flatten()
        pred = pred.long().flatten()
        keep = target != self.ignore_index
        if ((target[keep] < 0) | (target[keep] >= self.num_classes)).any():
            raise ValueError(f"target holds labels outside 0..{self.num_classes - 1} and {self.ignore_index}")
        k = self.num_classes
        idx = target[keep] * k + pred[keep].clamp(0, k - 1)
        self.state += torch.bincount(idx, minlength=k * k).to(self.state)

    def confusion(self) -> torch.Tensor:
        return self.state.view(self.num_classes, self.num_classes)

    def compute(self, class_names: list[str] | None = None) -> dict:
        cm = self.confusion().cpu()
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
        present = ~torch.isnan(iou)
        names = class_names or [str(c) for c in range(self.num_classes)]
        total = cm.sum().item()
        return {"mIoU": 100.0 * iou[present].mean().item() if present.any() else float("nan"),
                "pixel_acc": 100.0 * tp.sum().item() / total if total else float("nan"),
                "num_classes_present": int(present.sum()),
                "per_class_IoU": {names[c]: (100.0 * iou[c].item() if present[c] else None)
                                  for c in range(self.num_classes)}}


# ---- depth ------------------------------------------------------------------------------------------

def align_scale_shift(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the scale s and shift t minimising sum over mask of (s * pred + t - target)^2.
    pred, target, mask: (B, H, W). Returns s, t of shape (B, 1, 1); an image whose masked prediction
    is constant (a singular system) gets s = 0 and t = its masked target mean."""
    m = mask.to(pred.dtype)
    a00 = (m * pred * pred).sum((1, 2))
    a01 = (m * pred).sum((1, 2))
    a11 = m.sum((1, 2))
    b0 = (m * pred * target).sum((1, 2))
    b1 = (m * target).sum((1, 2))
    det = a00 * a11 - a01 * a01
    ok = det.abs() > 1e-12 * (a00 * a11).clamp_min(1e-30)
    safe = torch.where(ok, det, torch.ones_like(det))
    s = torch.where(ok, (a11 * b0 - a01 * b1) / safe, torch.zeros_like(det))
    t = torch.where(ok, (-a01 * b0 + a00 * b1) / safe, b1 / a11.clamp_min(1))
    return s.view(-1, 1, 1), t.view(-1, 1, 1)


def depth_valid_mask(depth: torch.Tensor, min_depth: float, max_depth: float) -> torch.Tensor:
    return torch.isfinite(depth) & (depth > min_depth) & (depth <= max_depth)


def disparity_to_depth(pred_disparity: torch.Tensor, gt_depth: torch.Tensor, valid: torch.Tensor,
                       max_depth: float) -> torch.Tensor:
    """MiDaS/DPT evaluation on metric ground truth: align the predicted (relative) disparity to the
    ground-truth disparity 1/g by least squares over the valid pixels, cap it at 1/max_depth and
    invert. All (B, H, W); returns depth (B, H, W)."""
    pred = pred_disparity.double()
    gt_disp = torch.where(valid, 1.0 / gt_depth.double().clamp_min(1e-12), torch.zeros_like(pred))
    s, t = align_scale_shift(pred, gt_disp, valid)
    return 1.0 / (s * pred + t).clamp_min(1.0 / max_depth)


class DepthMetric(_Sums):
    """state = [images, sum AbsRel, sum delta1, sum delta2, sum delta3, sum RMSE, images without valid pixels]."""

    def __init__(self, device=None):
        super().__init__(7, device)

    def update(self, pred_depth: torch.Tensor, gt_depth: torch.Tensor, valid: torch.Tensor) -> None:
        """pred_depth, gt_depth, valid: (B, H, W) (or (H, W)); errors over each image's valid pixels."""
        if pred_depth.dim() == 2:
            pred_depth, gt_depth, valid = pred_depth[None], gt_depth[None], valid[None]
        for d, g, v in zip(pred_depth.double(), gt_depth.double(), valid):
            n = int(v.sum())
            if n == 0:
                self.state[6] += 1
                continue
            d, g = d[v], g[v]
            ratio = torch.maximum(d / g, g / d)
            add = [1.0, ((d - g).abs() / g).mean().item(), *[(ratio < 1.25 ** k).double().mean().item() for k in (1, 2, 3)],
                   ((d - g) ** 2).mean().sqrt().item(), 0.0]
            self.state += torch.tensor(add, dtype=torch.float64, device=self.state.device)

    def compute(self) -> dict[str, float]:
        n = self.state[0].item()
        if n == 0:
            return {"AbsRel": float("nan"), "delta1": float("nan"), "num_images": 0,
                    "images_without_valid_depth": int(self.state[6].item())}
        s = self.state.tolist()
        return {"AbsRel": s[1] / n, "delta1": 100.0 * s[2] / n, "delta2": 100.0 * s[3] / n,
                "delta3": 100.0 * s[4] / n, "RMSE": s[5] / n, "num_images": int(n),
                "images_without_valid_depth": int(s[6])}


# ---- surface normals ----------------------------------------------------------------------------------

def angular_error_deg(pred: torch.Tensor, target: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Angle in degrees between vectors along ``dim`` (need not be unit length), in float64:
    atan2(|a x b|, a . b) keeps full precision near 0 and 180 degrees, where acos(a . b) does not."""
    a, b = pred.double(), target.double()
    cross = torch.linalg.vector_norm(torch.linalg.cross(a, b, dim=dim), dim=dim)
    dot = (a * b).sum(dim)
    return torch.rad2deg(torch.atan2(cross, dot))


class NormalMetric(_Sums):
    """state = [pixels, sum of errors, pixels under each threshold..., histogram of MEDIAN_BIN_DEG bins]."""

    def __init__(self, device=None):
        self.bins = int(round(180.0 / MEDIAN_BIN_DEG))
        self.head = 2 + len(NORMAL_THRESHOLDS_DEG)
        super().__init__(self.head + self.bins, device)

    def update(self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> None:
        """pred, target (B, 3, H, W); valid (B, H, W)."""
        err = angular_error_deg(pred, target, dim=1)[valid]
        if err.numel() == 0:
            return
        head = [float(err.numel()), err.sum().item()] + [float((err < t).sum()) for t in NORMAL_THRESHOLDS_DEG]
        self.state[:self.head] += torch.tensor(head, dtype=torch.float64, device=self.state.device)
        idx = (err / MEDIAN_BIN_DEG).long().clamp(0, self.bins - 1)
        self.state[self.head:] += torch.bincount(idx, minlength=self.bins).to(self.state)

    def compute(self) -> dict[str, float]:
        n = self.state[0].item()
        if n == 0:
            return {"mean": float("nan"), "median": float("nan"), "num_pixels": 0}
        hist = self.state[self.head:]
        cdf = hist.cumsum(0)
        # the median is the middle element (or the mean of the two middle ones) of the sorted errors;
        # each is located in its bin and taken at the bin's centre
        lo_rank, hi_rank = math.floor((n - 1) / 2), math.ceil((n - 1) / 2)
        centre = [(torch.searchsorted(cdf, torch.tensor(r + 1.0, dtype=cdf.dtype, device=cdf.device)).item() + 0.5)
                  * MEDIAN_BIN_DEG for r in (lo_rank, hi_rank)]
        out = {"mean": self.state[1].item() / n, "median": sum(centre) / 2}
        for i, t in enumerate(NORMAL_THRESHOLDS_DEG):
            out[f"a<{t:g}"] = 100.0 * self.state[2 + i].item() / n
        out["num_pixels"] = int(n)
        return out
