"""G3 (and P5, its CPU-sized twin): what the dense heads cost one training step.

One full step (labels from their wire codes to values, forward, losses, backward, AdamW step) with
PSP + seg/depth/normal heads vs the same step with CLIP only: the same ViT-B/16 (random weights: the
weights do not change the time; both sides share one backbone), resolution, batch and precision.
``ratio`` = dense / CLIP-only step time, each side's best round; goal <= 1.15. The sides alternate
round by round, so a neighbour's load or a clock change lands on both.

G3 is the paper's setting on a GPU: ViT-B/16, 512 px, batch 32, bf16 autocast, labels at 1/2.

    python -m bench.g3_train --device cuda                  # G3 (about a minute on an H100)
    python -m bench.g3_train --device cpu --quick           # a tiny smoke run of the same code

Besides the ratio, on CUDA it reports (each can be switched off):
- ``host_syncs``: how many synchronising CUDA calls one step of each side makes
  (``torch.cuda.set_sync_debug_mode("warn")``); the dense side should add none;
- ``grad_stride_mismatches``: parameters whose gradient's strides differ from the parameter's (what
  makes DDP warn "Grad strides do not match bucket view strides"); should be empty;
- ``profile``: torch.profiler's kernels by device time per step for each side, the kernels the dense
  side adds, and how busy the device is (device time / wall time);
- ``variants``: the ratio again with ``cudnn.benchmark`` on, and with the dense branch and dense losses
  compiled (``trainer.model.compile_dense``), so one GPU run can decide whether either pays.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
import warnings

import torch

G3 = dict(arch="ViT-B-16", res=512, batch=32, precision="bf16", label_scale=0.5)
QUICK = dict(arch="CLIPTeX-Tiny-ViT", res=96, batch=2, precision="fp32", label_scale=0.5)  # trainer/configs/models
TASKS = ["seg", "depth", "normal"]
GOAL = 1.15  # ratio, dense / CLIP-only step time


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(device: str, arch: str, res: int, batch: int, precision: str, label_scale: float, seed: int = 0):
    """Both sides' step functions and what they share: one backbone, two optimizers (each side's
    AdamW updates its own parameters), one batch already on the device (uint8 images, token ids, and
    the labels in the trainer's wire form: seg ids, quantised depth codes, octahedral normal codes)."""
    from trainer import params
    from trainer.losses import CLIPTeXLoss
    from trainer.model import CLIPTeX, build_model

    dev = torch.device(device)
    cfg = params.load_config("default", overrides=[f"model.arch={arch}", "model.pretrained=null",
                                                   f"data.base_resolution={res}", f"data.min_resolution={res}"])
    cfg.tasks = list(TASKS)
    torch.manual_seed(seed)
    dense, _, pp = build_model(cfg)
    clip_only = CLIPTeX(dense.clip, [])
    dense.to(dev).train()
    g = torch.Generator().manual_seed(seed)
    lh = lw = round(res * label_scale)
    b = {"image": torch.randint(0, 256, (batch, res, res, 3), generator=g, dtype=torch.uint8),
         "text": torch.randint(1, 49000, (batch, 77), generator=g),
         "seg": torch.randint(0, 81, (batch, lh, lw), generator=g, dtype=torch.uint8),
         "depth": torch.randint(0, 65536, (batch, lh, lw), generator=g, dtype=torch.int32).to(torch.uint16),
         "depth_lo": torch.rand(batch, generator=g), "depth_scale": torch.rand(batch, generator=g) * 1e-3 + 1e-5,
         "normal": torch.randint(0, 65536, (batch, lh, lw), generator=g, dtype=torch.int32).to(torch.uint16)}
    b = {k: v.to(dev) for k, v in b.items()}
    mean = torch.tensor(pp["mean"], device=dev).view(1, 3, 1, 1) * 255
    std = torch.tensor(pp["std"], device=dev).view(1, 3, 1, 1) * 255
    autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    sides = {}
    for name, model, tasks in (("dense", dense, TASKS), ("clip", clip_only, [])):
        crit = CLIPTeXLoss(vars(cfg.loss), tasks)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
        sides[name] = (model, crit, opt, tasks)

    def make_step(model, crit, opt, tasks):
        from trainer.data import labels_to_values

        def step():  # as trainer/train.py does it, less the logging and the all-rank NaN guard
            images = (b["image"].permute(0, 3, 1, 2).float().contiguous() - mean) / std
            targets = labels_to_values(b, tasks, dev)
            if "normal" in targets:
                targets["normal"] = targets["normal"].permute(0, 3, 1, 2)
            with autocast:
                out = model(images, b["text"])
            loss, _ = crit(out, targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    steps = {name: make_step(*side) for name, side in sides.items()}
    return steps, sides, dev


def time_sides(steps: dict, dev: torch.device, rounds: int, per_round: int) -> dict[str, list[float]]:
    """Seconds per step of each side, one entry per round; the sides alternate round by round."""
    times = {k: [] for k in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            _sync(dev)
            t0 = time.perf_counter()
            for _ in range(per_round):
                fn()
            _sync(dev)
            times[name].append((time.perf_counter() - t0) / per_round)
    return times


def summarise(times: dict[str, list[float]]) -> dict:
    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"ratio": round(best["dense"] / best["clip"], 3), "ratio_median": round(med["dense"] / med["clip"], 3),
            "step_s_dense": round(best["dense"], 4), "step_s_clip_only": round(best["clip"], 4),
            "step_s_dense_median": round(med["dense"], 4), "step_s_clip_only_median": round(med["clip"], 4),
            "step_s_runs": {k: [round(x, 4) for x in v] for k, v in times.items()}}


def count_host_syncs(fn, dev: torch.device) -> dict:
    """Synchronising CUDA calls during one call of ``fn`` (CUDA's sync debug mode, as warnings)."""
    if dev.type != "cuda":
        return {"skipped": "CUDA only"}
    _sync(dev)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    _sync(dev)
    msgs = [str(w.message).splitlines()[0][:160] for w in caught if "synchroniz" in str(w.message)]
    return {"count": len(msgs), "first": msgs[:5]}


def grad_stride_mismatches(model) -> list[str]:
    return [f"{n}: param {tuple(p.stride())} grad {tuple(p.grad.stride())}"
            for n, p in model.named_parameters() if p.grad is not None and p.grad.stride() != p.stride()]


def _profile_side(fn, dev: torch.device, steps: int) -> tuple[dict[str, float], float, float]:
    """({kernel or op name: ms per step}, device-busy ms per step, wall ms per step)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = dev.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(dev)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(dev)
        wall = (time.perf_counter() - t0) / steps * 1e3
    per = {}
    for e in prof.key_averages():
        if cuda:
            if e.device_type != DeviceType.CUDA:
                continue
            us = getattr(e, "self_device_time_total", None)
            us = us if us is not None else e.self_cuda_time_total
        else:
            us = e.self_cpu_time_total
        if us > 0:
            per[e.key[:100]] = per.get(e.key[:100], 0.0) + us / 1e3 / steps
    busy = sum(per.values())
    return per, busy, wall


def profile_sides(steps: dict, dev: torch.device, n: int = 3, top: int = 12) -> dict:
    per, out = {}, {}
    for name, fn in steps.items():
        per[name], busy, wall = _profile_side(fn, dev, n)
        out[name] = {"wall_ms_per_step": round(wall, 2), "busy_ms_per_step": round(busy, 2),
                     "top_ms_per_step": {k: round(v, 3) for k, v in sorted(per[name].items(), key=lambda kv: -kv[1])[:top]}}
    diff = {k: per["dense"].get(k, 0.0) - per["clip"].get(k, 0.0) for k in set(per["dense"]) | set(per["clip"])}
    out["dense_adds_ms_per_step"] = {k: round(v, 3) for k, v in sorted(diff.items(), key=lambda kv: -kv[1])[:top]}
    out["what"] = ("device kernels (self device time)" if dev.type == "cuda" else "CPU ops (self CPU time)") + \
        f", averaged over {n} profiled steps per side"
    return out


def measure(device: str = "cuda", *, arch: str, res: int, batch: int, precision: str, label_scale: float = 0.5,
            rounds: int = 5, per_round: int = 8, warmup: int = 3, profile: bool = False, variants: bool = False,
            compile_backend: str = "inductor", budget_s: float = 80.0) -> dict:
    """Build, warm up, time both sides; optionally the diagnostics and variants of the module doc."""
    t_start = time.perf_counter()
    steps, sides, dev = build(device, arch, res, batch, precision, label_scale)
    for _ in range(warmup):  # allocator, cuDNN/cuBLAS handles and kernel choice, first-call costs
        for fn in steps.values():
            fn()
    result = summarise(time_sides(steps, dev, rounds, per_round))
    result["meets_goal"] = bool(result["ratio"] <= GOAL)
    result["setup"] = (f"{arch} random weights, {res}px, batch {batch}, labels at {label_scale:g} "
                     f"({round(res * label_scale)}px), PSP 256 + 1x1 heads, {precision}"
                     f"{' autocast' if precision == 'bf16' else ''}, AdamW, {dev.type}, best of {rounds} rounds x "
                     f"{per_round} steps after {warmup} warm-up steps")
    result["device"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    result["torch"] = torch.__version__
    if dev.type == "cuda":
        result["host_syncs"] = {name: count_host_syncs(fn, dev) for name, fn in steps.items()}
    steps["dense"]()
    result["grad_stride_mismatches"] = grad_stride_mismatches(sides["dense"][0])
    if profile:
        result["profile"] = profile_sides(steps, dev)
    if variants:
        result["variants"] = run_variants(steps, sides, dev, rounds=3, per_round=per_round, backend=compile_backend,
                                        deadline=t_start + budget_s)
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    return result


def run_variants(steps, sides, dev, rounds: int, per_round: int, backend: str, deadline: float) -> dict:
    """The ratio with cudnn.benchmark on (CUDA), then with the dense branch and losses compiled."""
    from trainer.model import compile_dense

    out = {}
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        try:
            for fn in steps.values():
                fn()
            out["cudnn_benchmark"] = summarise(time_sides(steps, dev, rounds, per_round))
        finally:
            torch.backends.cudnn.benchmark = False
    if time.perf_counter() > deadline:
        out["compile"] = {"skipped": "out of time budget"}
        return out
    model, crit, _, _ = sides["dense"]
    try:
        t0 = time.perf_counter()
        compile_dense(model, crit, backend=backend)
        steps["dense"]()  # compiles (forward and backward graphs)
        _sync(dev)
        compile_s = time.perf_counter() - t0
        steps["dense"]()
        out["compile"] = {**summarise(time_sides(steps, dev, rounds, per_round)), "backend": backend,
                          "compile_s": round(compile_s, 1)}
    except Exception as e:  # a compiler problem must not hide the eager figures
        out["compile"] = {"error": f"{type(e).__name__}: {str(e)[:500]}", "backend": backend}
    return out


def run(device: str = "cuda", quick: bool = False, profile: bool = True, variants: bool = True) -> dict:
    """G3 at the paper's setting on ``device`` (the GPU harness calls this), or a tiny ``quick`` run."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if quick:
        # the same code on a tiny input; the compile variant only traces (aot_eager: no code generation)
        return measure(device, **QUICK, rounds=1, per_round=1, warmup=1, profile=profile, variants=variants,
                       compile_backend="aot_eager", budget_s=float("inf"))
    return measure(device, **G3, profile=profile, variants=variants)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.g3_train", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny input (a smoke run of the code, not a measurement)")
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument("--no-variants", dest="variants", action="store_false")
    args = p.parse_args(argv)
    print(json.dumps({"G3": run(args.device, args.quick, args.profile, args.variants)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
