"""How many distinct network input shapes CC3M-like images give each expert, and what a small fixed
set of shapes (the experts' ``input_shapes`` option) changes in the labels.

    python -m bench.shapes                 # shape counts (no model: the experts' own size rules)
    python -m bench.shapes --labels        # + label difference of the fixed sets, smoke experts on the sample

Every distinct (batch size, input shape) pays a first-use cost on a GPU (cuDNN picks, and for fused
engines compiles, kernels per shape: about 2.5 s for NLL-AngMF on an H100, ../shared/GPU.md).
With padded batches (the CUDA default) a worker meets one batch size, so the count of input shapes
is the count of first-use costs per worker process.
"""
from __future__ import annotations

import argparse
import json
import sys

# Example fixed sets: the aspect ratios 1:1, 4:3, 3:2, 16:9 and 2:1 (both orientations), at each
# expert's own scale (DPT: short side 384; NLL-AngMF: about 640 x 480 pixels; multiples of 32).
DPT_SHAPES = [(384, 384), (384, 512), (512, 384), (384, 576), (576, 384), (384, 672), (672, 384),
              (384, 768), (768, 384)]
NLL_SHAPES = [(544, 544), (480, 640), (640, 480), (448, 672), (672, 448), (416, 736), (736, 416),
              (384, 800), (800, 384)]


def key_functions() -> dict:
    """The default experts' input-shape rules, without building any model."""
    from expert_wrappers.depth import NET_SIZE, dpt_input_size
    from expert_wrappers.normal import TARGET_PIXELS, nll_input_size
    from expert_wrappers.seg import torchvision_input_shape

    return {"seg": lambda hw: torchvision_input_shape(hw, 800.0, 1333.0, 32),  # maskrcnn_resnet50_fpn_v2's transform
            "depth": lambda hw: dpt_input_size(*hw, NET_SIZE),
            "normal": lambda hw: nll_input_size(*hw, TARGET_PIXELS)}


def size_sets() -> dict:
    from pipeline.sizes import aspect_sweep, cc3m_like_sizes

    smaller = [(s, round(s * r / 100)) for s in range(160, 512, 8) for r in range(100, 301, 5)]
    smaller += [(w, h) for h, w in smaller]
    return {"common aspect ratios (pipeline.sizes.COMMON_ASPECTS) at short side 512": list(cc3m_like_sizes()),
            "every aspect ratio 1:1..3:1 at short side 512 (both orientations)": aspect_sweep(512, 3.0),
            "smaller originals: short side 160..504, aspect 1:1..3:1 in 5 % steps": smaller}


def counts() -> dict:
    keys = key_functions()
    return {name: {"sizes": len(sizes), **{t: len({k(hw) for hw in sizes}) for t, k in keys.items()}}
            for name, sizes in size_sets().items()}


def label_difference(sample_dir: str = "data/sample") -> dict:
    """Smoke experts on the sample: labels with the fixed sets vs with each image's exact shape
    (random weights: a check of the option, not a measure of a trained model's sensitivity)."""
    import numpy as np
    import torch

    from bench.p3a_experts import load_sample_images
    from expert_wrappers import build_expert
    from pipeline.labels import label_shape

    torch.set_num_threads(1)
    images = load_sample_images(sample_dir)
    sizes = [label_shape(im.shape[:2], 0.5) for im in images]
    # the smoke NLL-AngMF runs at a quarter of the area: halve the sides of the example set
    out = {}
    exact = build_expert("depth", "smoke").predict(images, sizes)
    fixed = build_expert("depth", "smoke", input_shapes=DPT_SHAPES).predict(images, sizes)
    rel = [float(np.abs(a["depth"] - b["depth"]).mean() / np.abs(b["depth"]).mean()) for a, b in zip(fixed, exact)]
    out["depth"] = {"mean_relative_error": round(float(np.mean(rel)), 4), "worst_image": round(max(rel), 4)}
    half = [(h // 2 // 32 * 32 or 32, w // 2 // 32 * 32 or 32) for h, w in NLL_SHAPES]
    exact = build_expert("normal", "smoke").predict(images, sizes)
    fixed = build_expert("normal", "smoke", input_shapes=half).predict(images, sizes)
    ang = np.concatenate([np.degrees(np.arccos(np.clip((a["normal"] * b["normal"]).sum(-1), -1, 1))).ravel()
                          for a, b in zip(fixed, exact)])
    out["normal"] = {"angle_median_deg": round(float(np.median(ang)), 3), "angle_p99_deg": round(float(np.percentile(ang, 99)), 3)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.shapes", description=__doc__.splitlines()[0])
    ap.add_argument("--labels", action="store_true", help="also the label difference of the fixed sets")
    ap.add_argument("--sample", default="data/sample")
    args = ap.parse_args(argv)
    res = {"input_shapes": counts(),
           "fixed_sets": {"depth": len(DPT_SHAPES), "normal": len(NLL_SHAPES)}}
    if args.labels:
        res["label_difference_with_fixed_sets"] = label_difference(args.sample)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
