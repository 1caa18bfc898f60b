"""P4 and P5: what the dense pseudo-labels cost the trainer.

P4  loader throughput (samples/s) of image + caption + seg + depth + normal vs image + caption only:
    the same shards, the same batch shapes (same seed), one DataLoader worker, default data settings
    (base 512, variable resolution, labels at 1/2 of the crop). ratio = with labels / without; goal >= 0.8.
P5  one full training step (labels from wire codes, forward, losses, backward, AdamW) with PSP + all
    three heads vs CLIP only: the same backbone (ViT-B/16, random weights: the weights do not change
    the time), resolution and batch. ratio = dense / CLIP-only; goal <= 1.15. CPU-sized here (256 px,
    batch 2); the ratio is what the goal is about. The code is G3's (bench/g3_train.py, the GPU
    twin at the paper's 512 px, batch 32, bf16).

P4 runs the two loaders side by side (consumed in lockstep) and counts each worker's own CPU time;
P5 alternates the two configurations round by round. Both keep each side's best round, so a
neighbour's load on a shared machine does not land on one side only.
"""
from __future__ import annotations

import os
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


def p5() -> dict:
    """G3's measurement (bench/g3_train.py) at a CPU size."""
    from bench.g3_train import measure

    r = measure("cpu", arch=P5_ARCH, res=P5_RES, batch=P5_BATCH, precision="fp32", rounds=P5_ROUNDS,
                per_round=P5_STEPS, warmup=1)
    r["setup"] += f", {torch.get_num_threads()} threads"
    return r


def run(sample_dir: str, labels_dir: str) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return {"P4": p4(sample_dir, labels_dir), "P5": p5()}


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else "data/sample",
                         sys.argv[2] if len(sys.argv) > 2 else "data/labels/sample"), indent=1))
