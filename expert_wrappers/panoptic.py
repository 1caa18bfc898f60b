"""Instance detections -> one semantic class map (the segmentation label).

The rule is detectron2's ``combine_semantic_and_instance_outputs`` (DESIGN.md §3), restricted to
things: start from zeros; take instances by score, highest first; stop below ``score_threshold``
(0.5); skip empty masks; skip an instance whose pixels are more than ``overlap_threshold`` (50%)
already claimed; paint only pixels nobody claimed yet.

Done here without a Python loop over instances or pixels. Whether instance i is kept depends only
on the kept instances before it, so we iterate "which instances are kept" to a fixpoint: after
pass t the first t decisions are final (induction), and a fixpoint is the sequential answer (it
satisfies the same recurrence, whose solution is unique). Each pass is three tensor ops over the
(instances x pixels) masks; real detections settle in 1-3 passes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.labels import SEG_IGNORE


def _coco_table() -> tuple[torch.Tensor, tuple[str, ...]]:
    """torchvision's 91 category slots (0 = background, 'N/A' = ids unused by COCO) -> 0..80."""
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_V2_Weights

    cats = MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1.meta["categories"]
    table = torch.zeros(len(cats), dtype=torch.long)
    names = []
    for i, name in enumerate(cats):
        if name not in ("__background__", "N/A"):
            names.append(name)
            table[i] = len(names)
    return table, tuple(names)


TORCHVISION_TO_CONTIGUOUS, COCO_THING_NAMES = _coco_table()
assert len(COCO_THING_NAMES) == 80, "torchvision's COCO category list changed"


def torchvision_to_contiguous(labels: torch.Tensor) -> torch.Tensor:
    """Original COCO ids 1..90 (with gaps) -> contiguous 1..80; unused ids ('N/A') -> 0."""
    labels = labels.long()
    bad = (labels < 0) | (labels >= len(TORCHVISION_TO_CONTIGUOUS))
    out = TORCHVISION_TO_CONTIGUOUS.to(labels.device)[labels.clamp(0, len(TORCHVISION_TO_CONTIGUOUS) - 1)]
    return torch.where(bad, torch.zeros_like(out), out)


def detectron2_to_contiguous(pred_classes: torch.Tensor) -> torch.Tensor:
    """detectron2's COCO ``pred_classes`` are already contiguous, 0..79."""
    c = pred_classes.long() + 1
    return torch.where((c >= 1) & (c <= 80), c, torch.zeros_like(c))


@dataclass
class Detections:
    """One image's instances in a backend-neutral form: boxes (N, 4) xyxy in image pixels,
    scores (N,), classes (N,) contiguous 1..80 (0 = drop), masks (N, H, W) bool."""

    boxes: torch.Tensor
    scores: torch.Tensor
    classes: torch.Tensor
    masks: torch.Tensor

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def from_torchvision(output: dict, mask_threshold: float = 0.5) -> Detections:
    """torchvision ``MaskRCNN`` eval output: masks are (N, 1, H, W) probabilities."""
    masks = output["masks"]
    if masks.ndim == 4:
        masks = masks[:, 0]
    return Detections(boxes=output["boxes"], scores=output["scores"].float(),
                      classes=torchvision_to_contiguous(output["labels"]), masks=masks >= mask_threshold)


def from_detectron2(instances) -> Detections:
    """detectron2 ``Instances`` (``pred_masks`` bool (N, H, W), ``pred_classes`` 0..79)."""
    boxes = instances.pred_boxes
    boxes = getattr(boxes, "tensor", boxes)
    return Detections(boxes=boxes, scores=instances.scores.float(),
                      classes=detectron2_to_contiguous(instances.pred_classes), masks=instances.pred_masks.bool())


def _rank_weights(k: int, device) -> torch.Tensor:
    """k, k-1, ..., 1 — row i's weight; the max weight over a pixel's rows names its first row.
    uint8 keeps the (K, P) products at one byte per pixel for the usual K <= 100 detections."""
    dtype = torch.uint8 if k < 255 else torch.int32
    return torch.arange(k, 0, -1, dtype=dtype, device=device)


def _first_owner(mu: torch.Tensor, w: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
    """(K, P) 0/1 uint8 -> per pixel the weight of the first (active) row covering it, 0 if none.

    A weighted amax rather than argmax/any: on CPU those reductions over dim 0 are 10-30x slower.
    """
    if mu.shape[0] == 0:
        return torch.zeros(mu.shape[1], dtype=w.dtype, device=mu.device)
    ww = w if active is None else w * active.to(w.dtype)
    return (mu * ww[:, None]).amax(0)


def _count(mu: torch.Tensor) -> torch.Tensor:
    return mu.sum(1, dtype=torch.int64) if mu.dtype != torch.uint8 else mu.sum(1, dtype=torch.int32)


def _accept(cm: torch.Tensor, area: torch.Tensor, w: torch.Tensor, overlap_threshold: float) -> torch.Tensor:
    """Which candidates (score order) the sequential rule keeps: the fixpoint of the module
    docstring. Instance i sees pixel p as claimed before it iff some kept j < i covers p, i.e.
    iff the first kept owner's weight at p exceeds i's own weight."""
    k = cm.shape[0]
    # only pixels under two or more candidates can be claimed by another one; on real
    # detections they are a small fraction of the image, so the passes run on those columns
    multi = (cm.sum(0, dtype=torch.uint8 if k < 255 else torch.int32) > 1).nonzero().squeeze(1)
    if multi.numel() == 0:
        return torch.ones(k, dtype=torch.bool, device=cm.device)
    if multi.numel() < cm.shape[1] // 4:
        cm = cm.index_select(1, multi)
    accepted = torch.ones(k, dtype=torch.bool, device=cm.device)
    for _ in range(k):  # fixpoint passes, not a per-instance loop: typically exits after 1-3
        best = _first_owner(cm, w, accepted)
        claimed_before = _count(cm * (best[None, :] > w[:, None]))
        new = claimed_before <= overlap_threshold * area  # detectron2 skips when ratio > threshold
        if torch.equal(new, accepted):
            break
        accepted = new
    return accepted


def instances_to_semantic(det: Detections, hw: tuple[int, int], *, score_threshold: float = 0.5,
                          overlap_threshold: float = 0.5, ignore_threshold: float | None = None,
                          confidence: bool = False, painted: list | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Semantic map (H, W) uint8 (0 background, 1..80, 255 ignore) and optional confidence.

    ``painted``: a list that receives the class of every instance the rule painted (the per-class
    instance counts of the manifest, the paper's Fig. 2a).

    ``ignore_threshold`` (off by default): unclaimed pixels of instances scoring in
    [ignore_threshold, score_threshold) become 255 — they are neither a confident thing nor
    confidently background. ``confidence``: the owning instance's score on painted pixels; on the
    rest 1 - the highest score of any instance covering the pixel (1.0 where none does).
    """
    h, w = hw
    device = det.masks.device
    n = len(det)
    if n == 0:
        seg = torch.zeros((h, w), dtype=torch.uint8, device=device)
        return seg, (torch.ones((h, w), dtype=torch.float32, device=device) if confidence else None)
    if tuple(det.masks.shape[1:]) != (h, w):
        raise ValueError(f"masks are {tuple(det.masks.shape[1:])}, image is {(h, w)}")

    # highest score first; stable so equal scores keep the detector's order (deterministic).
    # torchvision already returns them sorted: then the (N, H, W) gather is skipped
    scores = det.scores.float()
    if bool((scores[:-1] >= scores[1:]).all()):
        masks, classes = det.masks, det.classes.long()
    else:
        scores, order = torch.sort(scores, descending=True, stable=True)
        masks, classes = det.masks[order], det.classes[order].long()
    masks = masks.reshape(n, h * w)
    masks = (masks if masks.dtype == torch.bool else masks != 0).view(torch.uint8)  # 0/1 bytes
    area = _count(masks)
    keep = (scores >= score_threshold) & (area > 0) & (classes > 0)
    cand = keep.nonzero().squeeze(1)
    k = int(cand.numel())
    if k and int(cand[-1]) == k - 1:  # the usual case, a prefix: a view, not a copy
        cm, ca, ccls, cscore = masks[:k], area[:k], classes[:k], scores[:k]
    else:
        cm, ca, ccls, cscore = masks[cand], area[cand], classes[cand], scores[cand]
    wk = _rank_weights(k, device)
    accepted = torch.ones(k, dtype=torch.bool, device=device)
    if k > 1:
        accepted = _accept(cm, ca, wk, overlap_threshold)

    # paint: per pixel the class of its first kept owner, looked up by the owner's weight
    if painted is not None:
        painted.extend(ccls[accepted].tolist())
    best = _first_owner(cm, wk, accepted)  # 0 where nobody owns the pixel
    lut = torch.zeros(k + 1, dtype=torch.uint8, device=device)
    lut[wk.long()] = ccls.to(torch.uint8)
    seg = lut.index_select(0, best.long())
    owned = best > 0

    if ignore_threshold is not None and ignore_threshold < score_threshold:
        low = (scores >= ignore_threshold) & (scores < score_threshold) & (area > 0)
        if bool(low.any()):
            seg = torch.where(~owned & (masks[low].amax(0) > 0), torch.full_like(seg, SEG_IGNORE), seg)

    conf = None
    if confidence:
        score_ext = torch.cat([cscore, scores.new_zeros(1)])
        owner = k - best.long()  # == k (the appended 0 score) where nobody owns the pixel
        cover = _first_owner(masks, _rank_weights(n, device))  # sorted by score: first = max score
        best_score = torch.cat([scores, scores.new_zeros(1)])[n - cover.long()]
        conf = torch.where(owned, score_ext[owner], 1.0 - best_score).float()
        conf = conf.reshape(h, w)
    return seg.reshape(h, w), conf
