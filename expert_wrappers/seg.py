"""Segmentation expert: Mask R-CNN instances -> COCO semantic map (DESIGN.md §3).

Backends
- ``torchvision`` (default): ``maskrcnn_resnet50_fpn_v2`` with the COCO_V1 weights (47.4 box /
  41.8 mask AP). Its ``labels`` are original COCO ids 1..90 with gaps and its masks are
  probabilities, thresholded at 0.5 (torchvision's documented use).
- ``detectron2`` (quality option): ViTDet-B Mask R-CNN LazyConfig
  (``projects/ViTDet/configs/COCO/mask_rcnn_vitdet_b_100ep.py``, 51.6 / 45.9 AP), used only when
  detectron2 is importable; its ``pred_classes`` are already 0..79. Evaluated like ViTDet: long
  side resized to 1024.

The paper's own expert (ViT-B/16 Mask R-CNN from cvnets) has no public checkpoint we can load, so
these two stand in for it. Instances become one class map by detectron2's panoptic rule
(``panoptic.py``), optionally after SAM box refinement (``sam.py``).
"""
from __future__ import annotations

import math
import os
import pickle
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import weights as W
from ._torch import TorchExpert, resize_on_device, seeded
from .base import MissingDependencyError
from .panoptic import Detections, from_detectron2, from_torchvision, instances_to_semantic

TV_WEIGHTS_ENUM = "MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1"
VITDET_CONFIG = "projects/ViTDet/configs/COCO/mask_rcnn_vitdet_b_100ep.py"
VITDET_URL = ("https://dl.fbaipublicfiles.com/detectron2/ViTDet/COCO/mask_rcnn_vitdet_b/f325346929/"
              "model_final_61ccd1.pkl")
VITDET_INPUT = 1024
BACKENDS = ("torchvision", "detectron2")
PASTE_AT = ("label", "image")


def score_floor(lowest: float) -> float:
    """The largest float32 below ``lowest``: detectors keep ``score > thresh``, the panoptic rule
    ``score >= threshold``, so an instance scoring exactly the threshold survives both."""
    return float(np.nextafter(np.float32(lowest), np.float32(-np.inf)))


def torchvision_input_shape(image_hw: tuple[int, int], min_size: float, max_size: float,
                            divisible: int = 32) -> tuple[int, int]:
    """The padded tensor shape ``GeneralizedRCNNTransform`` makes of one image: scaled so the short
    side reaches ``min_size`` unless the long side would pass ``max_size``, floored, then padded
    up to a multiple of ``divisible``."""
    h, w = image_hw
    scale = min(min_size / min(h, w), max_size / max(h, w))
    return (int(math.ceil(math.floor(h * scale) / divisible) * divisible),
            int(math.ceil(math.floor(w * scale) / divisible) * divisible))


def torchvision_url() -> str:
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_V2_Weights

    return MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1.url


# ----------------------------------------------------------------------------------------------
# torchvision


def build_torchvision_default(weights: str | None = None, **model_kwargs):
    """The full ``maskrcnn_resnet50_fpn_v2`` with COCO_V1 weights; returns (model, checkpoints)."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn_v2

    url = torchvision_url()
    filename = url.rsplit("/", 1)[1]
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"  # where torchvision itself caches it
    # torchvision names its files <name>-<first hex digits of the sha256>.pth
    prefix = re.search(r"-([a-f0-9]{6,})\.", filename)
    path = W.resolve_file(filename, what="seg expert (torchvision Mask R-CNN, COCO_V1)", subdir="torchvision",
                          explicit=weights, url=url, extra_dirs=(hub_dir,),
                          sha256_prefix=prefix.group(1) if prefix else None)
    model = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=91, **model_kwargs)
    model.load_state_dict(W.load_tensors(path), strict=True)
    return model, {path.name: W.sha256_file(path)}


def build_torchvision_random(seed: int = 0, **model_kwargs):
    """``maskrcnn_resnet50_fpn_v2`` (the default architecture) with seeded random weights. The
    classifier gets std 0.006: with torch's default init every score stays near 1/91, with 0.008
    every one of the top 100 passes 0.5; at 0.006 three sample photos get 4, 4 and 100 of their
    top 100 detections at 0.5 or more — so the panoptic rule and the mask paste have work."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn_v2

    with seeded(seed):
        model = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=91, **model_kwargs)
        torch.nn.init.normal_(model.roi_heads.box_predictor.cls_score.weight, std=0.006)
    return model


def build_torchvision_smoke(seed: int = 0, **model_kwargs):
    """The same torchvision classes (MaskRCNN, FPN, RPNHead, conv-BN box/mask heads as in the v2
    builder) around a ResNet-18 at a 256 px input, with seeded random weights.

    Random class logits are near-uniform over 91 slots (every score ~0.01), which would leave the
    panoptic rule nothing to do; the classifier is initialised with a larger spread so that, like a
    trained model, a few instances score above 0.5 and overlap.
    """
    from torchvision.models import resnet18
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import (FastRCNNConvFCHead, FastRCNNPredictor, RPNHead,
                                                          _default_anchorgen)
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    kw = dict(min_size=256, max_size=416, rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100,
              box_detections_per_img=30)
    kw.update(model_kwargs)
    with seeded(seed):
        # BackboneWithFPN is what the v2 builder's extractor returns; 64 instead of 256 FPN
        # channels, because the 3x3 FPN and RPN convs at 1/4 scale dominate a CPU forward
        backbone = BackboneWithFPN(resnet18(), {f"layer{i}": str(i - 1) for i in range(1, 5)},
                                   [64, 128, 256, 512], 64, norm_layer=torch.nn.BatchNorm2d)
        anchors = _default_anchorgen()
        model = MaskRCNN(
            backbone, num_classes=None, rpn_anchor_generator=anchors,
            rpn_head=RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0], conv_depth=1),
            box_head=FastRCNNConvFCHead((backbone.out_channels, 7, 7), [64], [256], norm_layer=torch.nn.BatchNorm2d),
            box_predictor=FastRCNNPredictor(256, 91),
            mask_head=MaskRCNNHeads(backbone.out_channels, [64, 64], 1, norm_layer=torch.nn.BatchNorm2d),
            mask_predictor=MaskRCNNPredictor(64, 64, 91),
            **kw)
        torch.nn.init.normal_(model.roi_heads.box_predictor.cls_score.weight, std=0.3)
    return model


def _nearest_exact_rows(n_in: int, n_out: int, device) -> torch.Tensor:
    """The input index ``F.interpolate(mode="nearest-exact")`` reads for each output index (torch's
    own kernel on an index ramp, so the float rounding is its own)."""
    ramp = torch.arange(n_in, dtype=torch.float32, device=device)[None, None, :, None]  # exact below 2**24
    return F.interpolate(ramp, size=(n_out, 1), mode="nearest-exact")[0, 0, :, 0].long()


def _paste_weights(pos: torch.Tensor, b0: torch.Tensor, b1: torch.Tensor, m: int) -> torch.Tensor:
    """(K, n, m) bilinear weights: row p of instance k is what ``paste_mask_in_image`` writes at
    image position ``pos[p]`` from an m-wide mask resized (``F.interpolate``, bilinear,
    align_corners=False) to the integer box [b0, b1]; all zeros outside the box."""
    size = (b1 - b0 + 1).clamp_min(1)
    r = pos[None, :] - b0[:, None]                                   # (K, n) position in the box
    inside = ((r >= 0) & (pos[None, :] <= b1[:, None])).float()
    scale = (torch.full_like(size, m, dtype=torch.float32) / size.float())[:, None]
    src = ((r.float() + 0.5) * scale - 0.5).clamp_min(0)             # ATen's source index, float32
    i0 = src.long().clamp_max(m - 1)
    i1 = i0 + (i0 < m - 1).long()
    l1 = src - i0.float()
    w = torch.zeros(r.shape + (m,), dtype=torch.float32, device=pos.device)
    w.scatter_add_(2, i0[..., None], ((1 - l1) * inside)[..., None])
    w.scatter_add_(2, i1[..., None], (l1 * inside)[..., None])
    return w


def paste_masks_at(masks: torch.Tensor, boxes: torch.Tensor, image_hw: tuple[int, int],
                   out_hw: tuple[int, int]) -> torch.Tensor:
    """torchvision's ``paste_masks_in_image`` at ``image_hw`` followed by a nearest-exact resize to
    ``out_hw`` (what the seg class map gets), evaluated only at the ``out_hw`` samples.

    ``masks`` (K, 1, M, M) probabilities and ``boxes`` (K, 4) xyxy in image pixels, as the ROI
    heads give them after ``resize_boxes``. torchvision expands each mask and box by one cell,
    truncates the box to integers, resizes the mask into it and copies it into a full image: one
    Python iteration and one image-sized buffer per instance. Here each instance is a product
    ``Wy (out_h, M+2) @ mask @ Wx^T (M+2, out_w)`` with the same bilinear weights at the image rows
    and columns nearest-exact picks: the values the full-resolution path samples, up to float
    rounding order, for a quarter of the pixels (label scale 0.5) and no per-instance loop.
    Returns (K, out_h, out_w) float32 probabilities."""
    from torchvision.models.detection.roi_heads import expand_boxes, expand_masks

    k = masks.shape[0]
    if k == 0:
        return torch.zeros((0,) + tuple(out_hw), dtype=torch.float32, device=masks.device)
    padded, scale = expand_masks(masks.float(), padding=1)
    ib = expand_boxes(boxes.float(), scale).to(torch.int64)
    m = padded[:, 0]
    rows = _nearest_exact_rows(image_hw[0], out_hw[0], masks.device)
    cols = _nearest_exact_rows(image_hw[1], out_hw[1], masks.device)
    wy = _paste_weights(rows, ib[:, 1], ib[:, 3], m.shape[1])
    wx = _paste_weights(cols, ib[:, 0], ib[:, 2], m.shape[2])
    return torch.bmm(torch.bmm(wy, m), wx.transpose(1, 2))


# ----------------------------------------------------------------------------------------------
# detectron2


def _import_detectron2():
    try:
        import detectron2  # noqa: F401
        from detectron2.config import LazyConfig, instantiate
    except ImportError as e:
        raise MissingDependencyError(
            "backend='detectron2' needs detectron2, which is not importable here "
            f"({e}). Install it (https://detectron2.readthedocs.io/en/latest/tutorials/install.html, "
            "e.g. pip install 'git+https://github.com/facebookresearch/detectron2.git') or use "
            "backend='torchvision' (the default).") from e
    return LazyConfig, instantiate


def _find_vitdet_config(explicit: str | None) -> Path:
    if explicit:
        p = Path(explicit).expanduser()
        if p.is_file():
            return p
        raise FileNotFoundError(f"detectron2 config {p} does not exist")
    import detectron2

    # pip wheels do not ship projects/; an editable install from a clone does
    root = Path(detectron2.__file__).resolve().parent.parent
    p = root / VITDET_CONFIG
    if p.is_file():
        return p
    raise FileNotFoundError(
        f"ViTDet config not found at {p}: pass d2_config=/path/to/detectron2/{VITDET_CONFIG}")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """detectron2 model-zoo ``.pkl`` files hold numpy arrays; this refuses everything else, the
    equivalent of ``torch.load(weights_only=True)`` for that format."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from a checkpoint")


def load_detectron2_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix == ".pkl":
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    else:
        obj = W.load_tensors(path)
    sd = obj.get("model", obj) if isinstance(obj, dict) else obj
    return {k: torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v for k, v in sd.items()}


def build_detectron2(weights: str | None = None, d2_config: str | None = None):
    LazyConfig, instantiate = _import_detectron2()
    cfg = LazyConfig.load(str(_find_vitdet_config(d2_config)))
    filename = VITDET_URL.rsplit("/", 1)[1]
    path = W.resolve_file(filename, what="seg expert (detectron2 ViTDet-B Mask R-CNN)", subdir="detectron2",
                          explicit=weights, url=VITDET_URL)
    model = instantiate(cfg.model)
    missing, unexpected = model.load_state_dict(load_detectron2_weights(path), strict=False)
    # pixel_mean/std are non-persistent buffers in detectron2; anything else missing is an error
    missing = [k for k in missing if k not in ("pixel_mean", "pixel_std")]
    if missing:
        raise RuntimeError(f"{path} does not fit the ViTDet config: missing {missing[:8]}...")
    return model, {path.name: W.sha256_file(path)}, getattr(cfg.model, "input_format", "BGR")


# ----------------------------------------------------------------------------------------------


class MaskRCNNExpert(TorchExpert):
    task = "seg"

    def __init__(self, model, *, backend: str = "torchvision", name: str = "maskrcnn", device="cpu",
                 score_threshold: float = 0.5, overlap_threshold: float = 0.5, mask_threshold: float = 0.5,
                 ignore_threshold: float | None = None, confidence: bool = False, sam=None,
                 paste_at: str | None = None, max_batch: int = 4, input_format: str = "RGB",
                 checkpoints: dict | None = None, **common) -> None:
        super().__init__(device, max_batch, **common)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not 0 <= overlap_threshold <= 1:
            raise ValueError("overlap_threshold must be in [0, 1]")
        # SAM refines masks against the image, so with SAM they are pasted at the image's size
        paste_at = paste_at or ("image" if sam is not None else "label")
        if paste_at not in PASTE_AT:
            raise ValueError(f"paste_at must be one of {PASTE_AT}, got {paste_at!r}")
        if paste_at == "label" and sam is not None:
            raise ValueError("paste_at='label' cannot be combined with SAM refinement (it needs "
                             "masks at the image's resolution): use paste_at='image'")
        self.backend = backend
        self.name = name
        self.model = self.prepare(model)
        self.score_threshold = float(score_threshold)
        self.overlap_threshold = float(overlap_threshold)
        self.mask_threshold = float(mask_threshold)
        self.ignore_threshold = None if ignore_threshold is None else float(ignore_threshold)
        self.confidence = bool(confidence)
        self.sam = sam
        self.paste_at = paste_at
        self.input_format = input_format
        self.checkpoints.update(checkpoints or {})
        self.cuda_graphs = False  # torchvision's detection is no fixed-shape tensor program
        # Instances below every threshold the rule uses cannot change the map, and pasting their
        # masks is most of the post-processing cost: the detector drops them before the mask
        # head. The background confidence does use them: then the detector's own floor stays.
        lowest = score_floor(min(self.score_threshold,
                                 1.0 if self.ignore_threshold is None else self.ignore_threshold))
        heads = self.model.roi_heads
        if backend == "torchvision":
            heads.score_thresh = min(heads.score_thresh, lowest) if self.confidence else lowest
        elif hasattr(getattr(heads, "box_predictor", None), "test_score_thresh"):  # detectron2
            bp = heads.box_predictor
            bp.test_score_thresh = min(bp.test_score_thresh, lowest) if self.confidence else lowest

    def batch_key(self, image_hw: tuple[int, int]):
        """torchvision: the padded tensor shape its transform makes (images of one key batch without
        padding each other); detectron2's ViTDet pads every image to one square: any batch."""
        if self.backend != "torchvision":
            return None
        t = self.model.transform
        return torchvision_input_shape(image_hw, float(t.min_size[-1]), float(t.max_size), t.size_divisible)

    # backend-specific: images -> instances, masks pasted at ``sizes`` (default: each image's own)
    def detect(self, images: list[np.ndarray], sizes: list[tuple[int, int]] | None = None) -> list[Detections]:
        sizes = [tuple(im.shape[:2]) for im in images] if sizes is None else [tuple(hw) for hw in sizes]
        tensors = [t.float().div_(255.0) for t in self.to_device_many(images)]
        n = len(tensors)
        if self.pad_batches and n < self.max_batch:  # copies of the last image, dropped before pasting
            tensors += [tensors[-1]] * (self.max_batch - n)
        if self.backend == "torchvision":
            # MaskRCNN.forward up to the ROI heads, for the real images of a padded batch only
            m = self.model
            with self.autocast():
                batch, _ = m.transform(tensors)
                features = m.backbone(batch.tensors)
                proposals, _ = m.rpn(batch, features)
                detections, _ = m.roi_heads(features, proposals, batch.image_sizes)
                detections = detections[:n]
                if self.paste_at == "image" and all(hw == im.shape[:2] for hw, im in zip(sizes, images)):
                    outs = m.transform.postprocess(detections, batch.image_sizes[:n], sizes)  # as MaskRCNN
                    return [from_torchvision(o, self.mask_threshold) for o in outs]
            # the rest in float32: masks sampled at ``sizes`` as the full-resolution paste would give
            # them after a nearest-exact resize (paste_masks_at)
            from torchvision.models.detection.transform import resize_boxes

            out = []
            for d, in_hw, im, hw in zip(detections, batch.image_sizes, images, sizes):
                boxes = resize_boxes(d["boxes"].float(), list(in_hw), list(im.shape[:2]))
                probs = paste_masks_at(d["masks"], boxes, im.shape[:2], hw)
                out.append(from_torchvision({"boxes": boxes, "scores": d["scores"], "labels": d["labels"],
                                             "masks": probs}, self.mask_threshold))
            return out
        inputs = []
        for t, hw in zip(tensors, sizes + sizes[-1:] * (len(tensors) - n)):
            h, w = t.shape[-2:]
            s = VITDET_INPUT / max(h, w)
            x = F.interpolate(t[None], size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear",
                              align_corners=False, antialias=s < 1)[0] * 255.0
            if self.input_format == "BGR":
                x = x.flip(0)
            # detectron2 scales boxes and pastes masks at (height, width)
            inputs.append({"image": x, "height": hw[0], "width": hw[1]})
        with self.autocast():
            outs = self.model(inputs)
        return [from_detectron2(o["instances"]) for o in outs[:n]]

    def predict_batch(self, images: list[np.ndarray], sizes: list[tuple[int, int]], key, out: list[dict]):
        """Detections (masks at the label size, or at the image's with ``paste_at="image"``) ->
        SAM refinement -> the panoptic rule -> the class map at ``sizes``."""
        paste_hw = [hw if self.paste_at == "label" else im.shape[:2] for hw, im in zip(sizes, images)]
        entries = []
        for j, (im, det, hw) in enumerate(zip(images, self.detect(images, paste_hw), paste_hw)):
            if self.sam is not None:
                det = self.sam.refine(im, det)
            painted: list[int] = []
            seg, conf = instances_to_semantic(
                det, hw, score_threshold=self.score_threshold, overlap_threshold=self.overlap_threshold,
                ignore_threshold=self.ignore_threshold, confidence=self.confidence, painted=painted)
            out[j]["instance_classes"] = np.array(painted, np.int64)
            entries.append(("seg", resize_on_device("seg", seg, sizes[j])[None], [j]))
            if conf is not None:
                entries.append(("seg_conf", resize_on_device("seg_conf", conf, sizes[j])[None], [j]))
        return entries

    def describe(self) -> dict:
        d = super().describe()
        d.update(backend=self.backend, score_threshold=self.score_threshold,
                 overlap_threshold=self.overlap_threshold, mask_threshold=self.mask_threshold,
                 ignore_threshold=self.ignore_threshold, confidence=self.confidence, paste_at=self.paste_at,
                 sam=None if self.sam is None else {"model": self.sam.name, "iou_gate": self.sam.iou_gate})
        return d


def build(profile: str = "default", device: str = "cpu", *, backend: str = "torchvision",
          weights: str | None = None, sam: bool = False, sam_model: str | None = None,
          sam_weights: str | None = None, iou_gate: float | None = None, d2_config: str | None = None,
          min_size: int | None = None, max_size: int | None = None, seed: int = 0, **options) -> MaskRCNNExpert:
    """Options: score_threshold, overlap_threshold, mask_threshold, ignore_threshold, confidence,
    paste_at ('label': masks pasted at the asked size, default without SAM | 'image': at the
    image's, then the class map resized), the common ones of ``TorchExpert`` (max_batch,
    precision, pad_batches, pin_memory, memory_format); sam=True enables SAM refinement."""
    from . import sam as sam_mod

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    size_kw = {k: v for k, v in (("min_size", min_size), ("max_size", max_size)) if v is not None}
    checkpoints: dict[str, str] = {}
    input_format = "RGB"
    if backend == "detectron2":
        if profile in ("smoke", "random"):
            _import_detectron2()  # a missing detectron2 is the more useful error
            raise ValueError(f"the {profile} profile has no detectron2 variant; use backend='torchvision'")
        model, checkpoints, input_format = build_detectron2(weights, d2_config)
        name = "maskrcnn-vitdet-b (detectron2)"
    elif profile == "smoke":
        model = build_torchvision_smoke(seed, **size_kw)
        name = "maskrcnn-r18-fpn-smoke (torchvision, random weights)"
    elif profile == "random":
        model = build_torchvision_random(seed, **size_kw)
        name = "maskrcnn_resnet50_fpn_v2 architecture (torchvision, random weights)"
    else:
        model, checkpoints = build_torchvision_default(weights, **size_kw)
        name = "maskrcnn_resnet50_fpn_v2 COCO_V1 (torchvision)"

    refiner = None
    if sam:
        tdev = torch.device(device)
        gate_ = sam_mod.DEFAULT_IOU_GATE if iou_gate is None else iou_gate
        ignore = options.get("ignore_threshold")
        lowest = min(options.get("score_threshold", 0.5), 1.0 if ignore is None else ignore)
        if profile in ("smoke", "random"):  # no random full-size SAM: refinement is optional
            refiner = sam_mod.SamRefiner(sam_mod.build_smoke_sam(seed), tdev, gate_, lowest, name="sam-smoke")
        else:
            mt = sam_model or sam_mod.DEFAULT_SAM_MODEL
            sam_model_, sam_ckpt = sam_mod.build_default_sam(mt, sam_weights)
            checkpoints.update(sam_ckpt)
            refiner = sam_mod.SamRefiner(sam_model_, tdev, gate_, lowest, name=f"sam-{mt}")
    return MaskRCNNExpert(model, backend=backend, name=name, device=device, sam=refiner,
                          input_format=input_format, checkpoints=checkpoints, **options)
