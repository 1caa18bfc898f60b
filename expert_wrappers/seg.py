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

import os
import pickle
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import weights as W
from ._torch import TorchExpert, check_images, chunks, output_sizes, resize_on_device, seeded
from .base import MissingDependencyError
from .panoptic import Detections, from_detectron2, from_torchvision, instances_to_semantic

TV_WEIGHTS_ENUM = "MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1"
VITDET_CONFIG = "projects/ViTDet/configs/COCO/mask_rcnn_vitdet_b_100ep.py"
VITDET_URL = ("https://dl.fbaipublicfiles.com/detectron2/ViTDet/COCO/mask_rcnn_vitdet_b/f325346929/"
              "model_final_61ccd1.pkl")
VITDET_INPUT = 1024
BACKENDS = ("torchvision", "detectron2")


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
                 max_batch: int = 4, input_format: str = "RGB", checkpoints: dict | None = None) -> None:
        super().__init__(device, max_batch)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not 0 <= overlap_threshold <= 1:
            raise ValueError("overlap_threshold must be in [0, 1]")
        self.backend = backend
        self.name = name
        self.model = self.prepare(model)
        self.score_threshold = float(score_threshold)
        self.overlap_threshold = float(overlap_threshold)
        self.mask_threshold = float(mask_threshold)
        self.ignore_threshold = None if ignore_threshold is None else float(ignore_threshold)
        self.confidence = bool(confidence)
        self.sam = sam
        self.input_format = input_format
        self.checkpoints.update(checkpoints or {})
        if backend == "torchvision":
            # instances below every threshold we use cannot change the map, and not pasting their
            # full-resolution masks is most of the post-processing cost; the background confidence
            # does use them, so then torchvision's own floor (0.05) stays
            lowest = min(self.score_threshold, 1.0 if self.ignore_threshold is None else self.ignore_threshold)
            heads = self.model.roi_heads
            heads.score_thresh = min(heads.score_thresh, lowest) if self.confidence else lowest

    # backend-specific: images -> instances at image resolution
    def detect(self, images: list[np.ndarray]) -> list[Detections]:
        tensors = [self.to_device(im).float().div_(255.0) for im in images]
        if self.backend == "torchvision":
            # GeneralizedRCNNTransform resizes, normalises and pads the batch itself, and pastes
            # the masks back at each input's own size
            with self.autocast():
                outs = self.model(tensors)
            return [from_torchvision(o, self.mask_threshold) for o in outs]
        inputs = []
        for t, im in zip(tensors, images):
            h, w = im.shape[:2]
            s = VITDET_INPUT / max(h, w)
            x = F.interpolate(t[None], size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear",
                              align_corners=False, antialias=s < 1)[0] * 255.0
            if self.input_format == "BGR":
                x = x.flip(0)
            inputs.append({"image": x, "height": h, "width": w})
        with self.autocast():
            outs = self.model(inputs)
        return [from_detectron2(o["instances"]) for o in outs]

    def predict(self, images: list[np.ndarray], sizes=None) -> list[dict]:
        check_images(images)
        out_hw = output_sizes(images, sizes)
        results: list[dict] = []
        with torch.inference_mode():
            for idx in chunks(len(images), self.max_batch):
                batch = [images[i] for i in idx]
                for i, im, det in zip(idx, batch, self.detect(batch)):
                    if self.sam is not None:
                        det = self.sam.refine(im, det)
                    painted: list[int] = []
                    seg, conf = instances_to_semantic(
                        det, im.shape[:2], score_threshold=self.score_threshold,
                        overlap_threshold=self.overlap_threshold, ignore_threshold=self.ignore_threshold,
                        confidence=self.confidence, painted=painted)
                    out = {"seg": self.emit("seg", resize_on_device("seg", seg, out_hw[i])),
                           "instance_classes": np.array(painted, np.int64)}
                    if conf is not None:
                        out["seg_conf"] = self.emit("seg_conf", resize_on_device("seg_conf", conf, out_hw[i]))
                    results.append(out)
        return results

    def describe(self) -> dict:
        d = super().describe()
        d.update(backend=self.backend, score_threshold=self.score_threshold,
                 overlap_threshold=self.overlap_threshold, mask_threshold=self.mask_threshold,
                 ignore_threshold=self.ignore_threshold, confidence=self.confidence,
                 sam=None if self.sam is None else {"model": self.sam.name, "iou_gate": self.sam.iou_gate})
        return d


def build(profile: str = "default", device: str = "cpu", *, backend: str = "torchvision",
          weights: str | None = None, sam: bool = False, sam_model: str | None = None,
          sam_weights: str | None = None, iou_gate: float | None = None, d2_config: str | None = None,
          min_size: int | None = None, max_size: int | None = None, seed: int = 0, **options) -> MaskRCNNExpert:
    """Options: score_threshold, overlap_threshold, mask_threshold, ignore_threshold, confidence,
    max_batch (see MaskRCNNExpert); sam=True enables SAM refinement."""
    from . import sam as sam_mod

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    size_kw = {k: v for k, v in (("min_size", min_size), ("max_size", max_size)) if v is not None}
    checkpoints: dict[str, str] = {}
    input_format = "RGB"
    if backend == "detectron2":
        if profile == "smoke":
            _import_detectron2()  # a missing detectron2 is the more useful error
            raise ValueError("the smoke profile has no detectron2 variant; use backend='torchvision'")
        model, checkpoints, input_format = build_detectron2(weights, d2_config)
        name = "maskrcnn-vitdet-b (detectron2)"
    elif profile == "smoke":
        model = build_torchvision_smoke(seed, **size_kw)
        name = "maskrcnn-r18-fpn-smoke (torchvision, random weights)"
    else:
        model, checkpoints = build_torchvision_default(weights, **size_kw)
        name = "maskrcnn_resnet50_fpn_v2 COCO_V1 (torchvision)"

    refiner = None
    if sam:
        tdev = torch.device(device)
        gate_ = sam_mod.DEFAULT_IOU_GATE if iou_gate is None else iou_gate
        ignore = options.get("ignore_threshold")
        lowest = min(options.get("score_threshold", 0.5), 1.0 if ignore is None else ignore)
        if profile == "smoke":
            refiner = sam_mod.SamRefiner(sam_mod.build_smoke_sam(seed), tdev, gate_, lowest, name="sam-smoke")
        else:
            mt = sam_model or sam_mod.DEFAULT_SAM_MODEL
            sam_model_, sam_ckpt = sam_mod.build_default_sam(mt, sam_weights)
            checkpoints.update(sam_ckpt)
            refiner = sam_mod.SamRefiner(sam_model_, tdev, gate_, lowest, name=f"sam-{mt}")
    return MaskRCNNExpert(model, backend=backend, name=name, device=device, sam=refiner,
                          input_format=input_format, checkpoints=checkpoints, **options)
