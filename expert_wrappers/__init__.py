"""Expert models behind one interface (see base.py).

    from expert_wrappers import build_expert, build_experts
    seg = build_expert("seg", profile="smoke")            # default | smoke | random | null
    maps = seg.predict([rgb_uint8_hxwx3, ...])            # [{"seg": uint8 (H, W)}, ...]

Profiles: "default" — the real pretrained experts (weights resolved as in weights.py; may download
on a machine with internet); "smoke" — the same architectures with small seeded random weights,
offline, about a second per image for all three on one CPU core; "random" — the default
architectures at full size with seeded random weights (throughput on a GPU without any weight
file: ``make bench-gpu``); "null" — constant maps, no model.

Importing this package is cheap; torch and the model libraries load when an expert is built.
"""
from __future__ import annotations

from pipeline.labels import TASKS

from .base import Expert, MissingDependencyError, MissingWeightsError

PROFILES = ("default", "smoke", "random", "null")

__all__ = ["Expert", "MissingWeightsError", "MissingDependencyError", "build_expert", "build_experts",
           "TASKS", "PROFILES", "NORMAL_CONVENTION"]


def build_expert(task: str, profile: str = "default", device: str = "cpu", **options) -> Expert:
    """One expert. Options per task (all optional):

    seg    — backend ("torchvision" | "detectron2"), weights, score_threshold (0.5),
             overlap_threshold (0.5), mask_threshold (0.5), ignore_threshold (None = off),
             confidence (False: also return "seg_conf"), sam (False), sam_model ("vit_h"),
             sam_weights, iou_gate (0.5), min_size / max_size (detector input), d2_config, max_batch
    depth  — checkpoint ("Intel/dpt-large" | "Intel/dpt-hybrid-midas" | local dir), weights
             (local model dir), net_size (384), max_batch
    normal — variant ("BN" = scannet.pt | "GN" = nyu.pt), weights (path), target_pixels, max_batch
    all    — seed (smoke and random profiles); torch experts: max_batch, precision (auto | bf16 |
             fp16 | fp32 | tf32), pad_batches, pin_memory, memory_format (see expert_wrappers._torch.TorchExpert)

    Raises MissingWeightsError (default profile, weights not available) or
    MissingDependencyError (an optional backend is not installed).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {TASKS}")
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; known: {PROFILES}")
    if profile == "null":
        from . import null

        return null.build(task, profile, device, **options)
    if task == "seg":
        from . import seg as mod
    elif task == "depth":
        from . import depth as mod
    else:
        from . import normal as mod
    return mod.build(profile, device, **options)


def build_experts(tasks, profile: str = "default", device: str = "cpu",
                  options: dict[str, dict] | None = None) -> dict[str, Expert]:
    """``{task: expert}`` for each task (a list or a comma-separated string); ``options`` maps a
    task to its keyword options (options of tasks not requested are ignored, so one options
    dict serves every task subset). When checkpoints are missing, one MissingWeightsError lists
    every missing file, not just the first."""
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    options = options or {}
    unknown = set(options) - set(TASKS)
    if unknown:  # a misspelt task would otherwise drop its options silently
        raise ValueError(f"options given for unknown tasks {sorted(unknown)}; known: {TASKS}")
    experts, missing = {}, []
    for t in tasks:
        try:
            experts[t] = build_expert(t, profile, device, **options.get(t, {}))
        except MissingWeightsError as e:
            missing.append(str(e))
    if missing:
        raise MissingWeightsError("\n".join(missing))
    return experts


def __getattr__(name: str):
    if name == "NORMAL_CONVENTION":
        from .normal import NORMAL_CONVENTION

        return NORMAL_CONVENTION
    raise AttributeError(name)
