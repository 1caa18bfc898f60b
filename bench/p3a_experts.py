"""P3a: what the expert wrappers cost on top of the models they wrap.

For each smoke expert and each of the wrapper's own batches: the bare batched forward (exactly
the tensors the wrapper feeds the model, prepared outside the timed region) vs ``expert.predict``
on the same decoded images (pre-processing, forward, post-processing, numpy), timed back to back.
One timed run over the sample, after an untimed warm-up pass.
``wrapper_overhead_ratio`` = sum of wrapper times / sum of bare times; goal <= 1.1, which needs
post-processing without per-pixel or per-instance Python loops.

Times are this process's CPU seconds (all its threads): the machine is shared, and CPU time is
not inflated by other processes the way wall time is. Wall times are reported alongside.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pipeline.labels import TASKS


def load_sample_images(sample_dir: str | Path, limit: int | None = None) -> list[np.ndarray]:
    """RGB uint8 images of the ``{key}.jpg`` members of ``sample_dir/*.tar``, in shard order."""
    from pipeline.shards import Sample, iter_samples

    images = []
    for shard in sorted(Path(sample_dir).glob("*.tar")):
        for s in iter_samples(shard):
            if isinstance(s, Sample):
                images.append(s.image)
                if limit is not None and len(images) >= limit:
                    return images
    if not images:
        raise FileNotFoundError(f"no decodable images in {sample_dir}/*.tar (run `make sample`)")
    return images


def _batches(expert, images: list[np.ndarray]) -> list[list[int]]:
    """The wrapper's own batching: groups of equal network input shape (``batch_key``)."""
    from expert_wrappers._torch import shape_groups

    return shape_groups([expert.batch_key(im.shape[:2]) for im in images], expert.max_batch)


def _bare(task: str, expert, images: list[np.ndarray], idx: list[int]):
    """The exact model input the wrapper builds for this batch, and the bare model call on it."""
    if task == "seg":
        x = [t.float().div_(255.0) for t in expert.to_device_many([images[i] for i in idx])]
        return x, expert.model
    x = expert.in_memory_format(expert.padded(expert.preprocess([images[i] for i in idx],
                                                              expert.batch_key(images[idx[0]].shape[:2]))))
    if task == "depth":
        from expert_wrappers.depth import dpt_forward

        return x, lambda t: dpt_forward(expert.model, t)
    return x, expert.model


def _timed(fn) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.process_time() - c0, time.perf_counter() - w0


def run_on_images(images: list[np.ndarray], tasks=TASKS, device: str = "cpu", threads: int | None = 1) -> dict:
    """``threads=1`` by default: with several OpenMP threads on a shared machine, spin-waiting
    threads bill CPU time that neither side of the ratio actually needs."""
    import torch

    from expert_wrappers import build_experts

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(images, tasks, device, build_experts)
    finally:
        torch.set_num_threads(old_threads)


def _run(images, tasks, device, build_experts) -> dict:
    import torch

    experts = build_experts(list(tasks), "smoke", device)
    per: dict[str, dict] = {}
    for task, expert in experts.items():
        # warm-up over every image: oneDNN builds kernels per input shape on first use, and
        # whichever side ran first would otherwise pay for all of them
        expert.predict(images)
        bare_cpu = bare_wall = wrap_cpu = wrap_wall = 0.0
        for j, idx in enumerate(_batches(expert, images)):
            with torch.inference_mode():
                x, model = _bare(task, expert, images, idx)

                def bare():
                    with torch.inference_mode():
                        model(x)

                subset = [images[i] for i in idx]
                # bare and wrapper back to back on the same batch, alternating which goes first,
                # so load from other processes hits both sides alike
                sides = [("bare", bare), ("wrap", lambda: expert.predict(subset))]
                for side, fn in (sides if j % 2 == 0 else sides[::-1]):
                    c, w = _timed(fn)
                    if side == "bare":
                        bare_cpu, bare_wall = bare_cpu + c, bare_wall + w
                    else:
                        wrap_cpu, wrap_wall = wrap_cpu + c, wrap_wall + w
        per[task] = {"bare_cpu_s": round(bare_cpu, 4), "wrapper_cpu_s": round(wrap_cpu, 4),
                     "bare_wall_s": round(bare_wall, 4), "wrapper_wall_s": round(wrap_wall, 4),
                     "ratio": round(wrap_cpu / bare_cpu, 4)}
    bare_total = sum(p["bare_cpu_s"] for p in per.values())
    wrap_total = sum(p["wrapper_cpu_s"] for p in per.values())
    return {
        "wrapper_overhead_ratio": round(wrap_total / bare_total, 4),
        "wall_ratio": round(sum(p["wrapper_wall_s"] for p in per.values())
                            / sum(p["bare_wall_s"] for p in per.values()), 4),
        "bare_cpu_s": round(bare_total, 3), "wrapper_cpu_s": round(wrap_total, 3),
        "per_expert": per, "images": len(images), "profile": "smoke", "device": device,
        "torch_threads": torch.get_num_threads(),
    }


GOAL = 1.1  # wrapper_overhead_ratio


def run(sample_dir: str = "data/sample") -> dict:
    r = run_on_images(load_sample_images(sample_dir))
    r["meets_goal"] = bool(r["wrapper_overhead_ratio"] <= GOAL)
    return r


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else "data/sample"), indent=1))
