"""P4 and P5: what the dense pseudo-labels cost the trainer.

P4  loader throughput (samples/s) of image + caption + seg + depth + normal vs image + caption only:
    the same shards, the same batch shapes (same seed), one DataLoader worker, default data settings
    (base 512, variable resolution, labels at 1/2 of the crop). ratio = with labels / without; goal >= 0.8.
P5  one full training step (forward, losses, backward, AdamW) with PSP + all three heads vs CLIP only:
    the same backbone (ViT-B/16, random weights: the weights do not change the time), resolution and
    batch. ratio = dense / CLIP-only; goal <= 1.15. CPU-sized here (256 px, batch 2); the ratio is what
    the goal is about.

P4 runs the two loaders side by side (consumed in lockstep) and counts each worker's own CPU time;
P5 alternates the two configurations. Both keep each side's best round, so a neighbour's load on a
shared machine does not land on one side only.
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

from pipeline.labels import TASKS

P4_BATCH, P4_BATCHES, P4_ROUNDS = 8, 8, 4
P5_ARCH, P5_RES, P5_BATCH, P5_STEPS, P5_ROUNDS = "ViT-B-16", 256, 2, 2, 3


def _loader_rates(sides: dict, shards, data_cfg) -> dict[str, float]:
    """Samples per CPU-second of each side's one DataLoader worker, the sides' loaders running side
    by side and consumed in lockstep, so that whatever else loads the machine (on a 2-vCPU VM even
    the sibling hyperthread) weighs on both sides at the same moments."""
    from trainer import data as D

    its, cpu0 = {}, {}
    for side, (label_tars, tasks) in sides.items():
        ds = D.TrainStream(shards, label_tars, tasks, data_cfg, seed=0, rank=0, world_size=1, num_streams=1,
                           arch="ViT-B-16")
        its[side] = iter(D.make_loader(ds, num_workers=1, pin_memory=False, prefetch_factor=2))
    for side, it in its.items():
        cpu0[side] = next(it)["worker_cpu_s"]  # worker start-up, tokenizer, first chunk
    n = dict.fromkeys(its, 0)
    last = {}
    for _ in range(P4_BATCHES):
        for side, it in its.items():
            last[side] = next(it)
            n[side] += last[side]["image"].shape[0]
    rates = {side: n[side] / (last[side]["worker_cpu_s"] - cpu0[side]) for side in its}
    del its
    return rates


def p4(sample_dir: str, labels_dir: str) -> dict:
    """``ratio``: samples per CPU-second of the one worker with labels / without, each side's best
    round; the two loaders run side by side (see ``_loader_rates``)."""
    from trainer import data as D
    from trainer import params

    cfg = params.load_config("default", overrides=[f"data.batch_size={P4_BATCH}"])
    _, shards, _, _ = D.resolve_shards(str(sample_dir))
    tasks = list(TASKS)
    shards, label_tars, _ = D.label_files(Path(labels_dir), tasks, shards)
    sides = {"plain": ({}, []), "labels": (label_tars, tasks)}
    runs: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(P4_ROUNDS):
        for side, rate in _loader_rates(sides, shards, cfg.data).items():
            runs[side].append(rate)
    best = {side: max(r) for side, r in runs.items()}
    return {"ratio": round(best["labels"] / best["plain"], 3),
            "samples_per_cpu_s_with_labels": round(best["labels"], 1),
            "samples_per_cpu_s_image_caption": round(best["plain"], 1),
            "samples_per_cpu_s_runs": {side: [round(x, 1) for x in r] for side, r in runs.items()},
            "setup": f"default data config, batch {P4_BATCH} at base 512 (variable 256-768), labels at 1/2, "
                     f"1 DataLoader worker per side, both sides side by side, {P4_BATCHES} batches x "
                     f"best of {P4_ROUNDS} rounds"}


def _step_fn(tasks):
    from trainer import params
    from trainer.losses import CLIPTeXLoss
    from trainer.model import build_model

    cfg = params.load_config("default", overrides=[f"model.arch={P5_ARCH}", "model.pretrained=null",
                                                   f"data.base_resolution={P5_RES}"])
    cfg.tasks = tasks
    torch.manual_seed(0)
    model, _, _ = build_model(cfg)
    model.train()
    crit = CLIPTeXLoss(vars(cfg.loss), tasks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    lh = lw = round(P5_RES * cfg.data.label_scale)
    batch = {"seg": torch.randint(0, 81, (P5_BATCH, lh, lw), generator=g).to(torch.uint8),
             "depth": torch.rand(P5_BATCH, lh, lw, generator=g),
             "normal": torch.nn.functional.normalize(torch.randn(P5_BATCH, 3, lh, lw, generator=g), dim=1)}  # as train.py feeds it
    images = torch.randn(P5_BATCH, 3, P5_RES, P5_RES, generator=g)
    texts = torch.randint(1, 49000, (P5_BATCH, 77), generator=g)

    def step():
        out = model(images, texts, (lh, lw) if tasks else None)
        loss, _ = crit(out, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up (allocations, first-call costs)
    return step


def p5() -> dict:
    fns = {"dense": _step_fn(list(TASKS)), "clip": _step_fn([])}
    times = {k: [] for k in fns}
    for _ in range(P5_ROUNDS):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(P5_STEPS):
                fn()
            times[k].append((time.perf_counter() - t0) / P5_STEPS)
    best = {k: min(v) for k, v in times.items()}
    return {"ratio": round(best["dense"] / best["clip"], 3),
            "step_s_dense": round(best["dense"], 3), "step_s_clip_only": round(best["clip"], 3),
            "step_s_dense_median": round(statistics.median(times["dense"]), 3),
            "step_s_clip_only_median": round(statistics.median(times["clip"]), 3),
            "setup": f"{P5_ARCH} random weights, {P5_RES}px, batch {P5_BATCH}, labels at 1/2, PSP 256 + 1x1 heads, "
                     f"fp32 CPU, {torch.get_num_threads()} threads, best of {P5_ROUNDS} x {P5_STEPS} steps"}


def run(sample_dir: str, labels_dir: str) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return {"P4": p4(sample_dir, labels_dir), "P5": p5()}


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else "data/sample",
                         sys.argv[2] if len(sys.argv) > 2 else "data/labels/sample"), indent=1))
