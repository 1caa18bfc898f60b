"""G1, G2, G4 (and the option variants): the labelling job on a GPU, without Ray.

``make bench-gpu`` = ``python -m bench.run --device cuda``; ``python -m bench.run --device cpu G1 G2
G4`` runs the same code with the smoke experts on a few images (a check of the code path, not a
measurement). Needs only torch, torchvision, transformers and the small dependencies (zstandard,
geffnet, Pillow, numpy): ``pipeline.worker.process_shard`` is called directly.

Experts: on CUDA the default architectures with seeded random weights (profile ``random``:
``maskrcnn_resnet50_fpn_v2`` with a classifier init that lets some detections pass 0.5, DPT with
dpt-large's config, NLL-AngMF BN on EfficientNet-B5), ``max_batch`` 8, the job's defaults
otherwise (seg fp32, depth and normal bf16 autocast, label codes on the device, padded batches,
the deferred hand-over). Input: the sample's photos cycled into 2 shards of 256 (16 sizes, 7
DPT/NLL input shapes).

G1  per expert: samples/s of ``process_shard`` with that expert alone on one shard of 1024 (worker
    order: buckets, padding, codes, decode/encode overlapped; depth and normals also on the 2
    shards of 256, where the per-shard start and end weigh 4 x more) vs its bare forward on full batches of one input
    shape (each image costed at its own shape's full-batch time; seg: transform, backbone, RPN
    and ROI heads, without the paste). Goal >= 0.8. Also the first-use cost: the expert's
    ``warm_up`` over the images' shapes in a fresh process minus the same call once warm. Depth
    and normals: the same job with the options of ``G1_VARIANTS`` (CUDA graphs off, ``pin_memory``
    off: a pageable, stream-synchronising copy per image, 2 ``queued_batches``) and the
    host-device synchronisations per batch (torch's sync debug mode) and where one profiled
    shard of 96 left the GPU idle (``lane_timeline``); seg: its
    bare forward in NCHW, under cuDNN's autotuner, in TF32 and in bf16.
G2  samples/s of ``process_shard`` with all three experts vs 1 / (sum of the bare per-image
    times). Goal >= 0.85, and >= 3 x 11.6 = 34.8 samples/s on an H100-class GPU (11.6: the job
    before issue 9's changes, ../shared/GPU.md). Variants of the job's options on one shard
    (``VARIANTS``: CUDA graphs, uploads, seg memory format, seg precision, queued batches)
    decide the defaults.
G4  labels of the GPU path (bf16 autocast, codes on the device) vs the fp32 path (codes on the
    host) on the same images, as stored (encoded, decoded): seg pixel agreement, depth mean
    relative error, normal angular error median / p99, on the sample's 16 distinct photos; tf32
    the same way. Goal: seg >= 99 %,
    depth <= 1 %, normals median <= 1 degree; prints the precision to use per expert. The yardstick
    beside them: fp32 labels of the same photos with 1 % of their pixels one grey level brighter.
    Random weights put many scores and mask logits right at their thresholds, so confirm with the
    real weights: ``python -m bench.run --device cuda --profile default G4``.

Everything runs within a time budget (``budget_s`` or $BENCH_BUDGET_S, default 270 s on CUDA): variants that would
start after it are skipped and say so. Results are saved after every part (``save``).
"""
from __future__ import annotations

import contextlib
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TASKS = ("seg", "depth", "normal")
BEFORE_ISSUE_9 = 11.6  # samples/s of process_shard, three experts, H100 (../shared/GPU.md)


def _log(msg: str) -> None:
    print(f"[bench-gpu {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class _Setup:
    def __init__(self, device: str, sample_dir: str, quick: bool, tmp: Path, profile: str | None = None):
        import torch

        from bench.p2_p3_p6_job import make_shards
        from pipeline.shards import Sample, iter_samples

        self.torch = torch
        self.device = device
        self.cuda = device.startswith("cuda")
        self.quick = quick
        self.profile = profile or ("smoke" if quick else "random")
        # shards of 256: each shard's end flushes its partial buckets (padded); CC3M's shards hold
        # ~10k images, so at 128 that tail weighed several times more than it does in the job
        n_shards, per_shard = (2, 6) if quick else (2, 256)
        self.shards = make_shards(Path(sample_dir), tmp / "src", n_shards, per_shard)
        # G1's jobs: one shard of 1024. A shard costs its worker a fixed ~60 ms with the GPU idle
        # (H100, profiled depth lane: decoding until the first bucket is full, then after the last
        # forward the encodes, the writes and the commit); CC3M's shards of ~10k images pay that
        # once per ~4 s of depth forwards, shards of 256 once per 0.56 s
        self.long_shard = make_shards(Path(sample_dir), tmp / "src-long", 1, 12 if quick else 1024)[0]
        self.images = [s.image for p in self.shards for s in iter_samples(p) if isinstance(s, Sample)]
        self.batch = 2 if quick else 8
        self.options = {t: {"max_batch": self.batch} for t in TASKS}
        self.tmp = tmp
        self.t0 = time.perf_counter()
        self.budget_s = float("inf")
        self.gpu = torch.cuda.get_device_name(torch.device(device)) if self.cuda else (platform.processor() or "cpu")
        self.env = {"device": device, "gpu_name": self.gpu, "torch": torch.__version__,
                    "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if self.cuda else None,
                    "profile": self.profile, "images": len(self.images), "shards": len(self.shards),
                    "batch": self.batch, "python": sys.version.split()[0]}

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def build(self):
        from expert_wrappers import build_experts

        t0 = time.perf_counter()
        experts = build_experts(TASKS, self.profile, self.device, self.options)
        self.sync()
        return experts, time.perf_counter() - t0

    def worker(self, tasks=TASKS, **kw):
        from pipeline.worker import WorkerConfig

        return WorkerConfig(tasks=tuple(tasks), profile=self.profile, device=self.device,
                            batch_size=self.batch, **kw)

    def job(self, experts: dict, cfg, shards=None, name: str = "job") -> dict:
        """process_shard over the shards; samples/s over the sum of shard wall times."""
        from pipeline.worker import process_shard

        out = self.tmp / f"out-{name}"
        ok = seconds = 0.0
        timing: dict = {}
        for shard in shards or self.shards:
            st = process_shard(shard, out, experts, cfg)
            ok += st["ok"]
            seconds += st["seconds"]
            for k, v in st["timing"].items():
                timing[k] = round(timing.get(k, 0.0) + v, 3)
        shutil.rmtree(out, ignore_errors=True)
        return {"samples": int(ok), "seconds": round(seconds, 3), "samples_per_s": round(ok / seconds, 3),
                "timing_s": timing}


# ----------------------------------------------------------------------------------------------
# bare forwards


def _bare_call(task: str, expert, batch: list[np.ndarray]):
    """The model call the expert makes for one full batch, inputs prepared once (untimed)."""
    import torch

    if task == "seg":
        tensors = [t.float().div_(255.0) for t in expert.to_device_many(batch)]
        m = expert.model

        def call():
            with torch.inference_mode(), expert.autocast():
                b, _ = m.transform(tensors)
                feats = m.backbone(b.tensors)
                proposals, _ = m.rpn(b, feats)
                m.roi_heads(feats, proposals, b.image_sizes)
        return call
    with torch.inference_mode():
        x = expert.in_memory_format(expert.preprocess(batch, expert.batch_key(batch[0].shape[:2])))

    def call():
        with torch.inference_mode():
            expert.run_forward(x)  # as the expert runs it: replayed from a CUDA graph where it uses them
    return call


def bare_seconds_per_image(s: _Setup, task: str, expert, reps: int | None = None) -> dict:
    """Per input shape the full-batch forward time / batch; per image its shape's time."""
    from expert_wrappers._torch import shape_groups

    reps = reps or (1 if s.quick else 3)
    keys = [expert.batch_key(im.shape[:2]) for im in s.images]
    per_key: dict = {}
    for idx in shape_groups(keys, len(keys)):
        key = keys[idx[0]]
        batch = [s.images[idx[j % len(idx)]] for j in range(expert.max_batch)]  # a full batch of that shape
        call = _bare_call(task, expert, batch)
        call()
        s.sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            call()
        s.sync()
        per_key[key] = (time.perf_counter() - t0) / reps / expert.max_batch
    per_image = [per_key[k] for k in keys]
    return {"seconds_per_image": float(np.mean(per_image)), "shapes": len(per_key),
            "ms_per_image_by_shape": {str(k): round(v * 1e3, 3) for k, v in per_key.items()}}


# ----------------------------------------------------------------------------------------------
# parts


def g1(s: _Setup, experts: dict) -> dict:
    out: dict = {"gpu_name": s.gpu, "goal": "wrapper / bare >= 0.8 per expert", "per_expert": {}}
    sizes = [im.shape[:2] for im in s.images]
    for task in TASKS:
        try:
            out["per_expert"][task] = _g1_expert(s, task, experts[task], sizes)
        except Exception as e:  # noqa: BLE001 - the other experts still run
            _log(f"G1 {task} failed: {type(e).__name__}: {e}")
            out["per_expert"][task] = {"error": f"{type(e).__name__}: {e}"}
    ok = {t: p for t, p in out["per_expert"].items() if "ratio" in p}
    if len(ok) < len(TASKS):
        out["error"] = "an expert failed (see per_expert)"
    if ok:
        out["ratio"] = min(p["ratio"] for p in ok.values())
        out["bare_ms_per_image"] = {t: p["bare_ms_per_image"] for t, p in ok.items()}
    return out


def _g1_expert(s: _Setup, task: str, e, sizes) -> dict:
    first = e.warm_up(sizes)  # a fresh process: every (batch, shape) pair is new here
    again = e.warm_up(sizes)
    bare = bare_seconds_per_image(s, task, e)
    if getattr(e, "cuda_graphs", False):
        with _set({task: e}, cuda_graphs=False):
            eager = bare_seconds_per_image(s, task, e)
    job = s.job({task: e}, s.worker(tasks=(task,)), shards=[s.long_shard], name=f"g1-{task}")
    bare_rate = 1.0 / bare["seconds_per_image"]
    r = {"ratio": round(job["samples_per_s"] / bare_rate, 4), "shard_images": job["samples"],
         "wrapper_samples_per_s": job["samples_per_s"], "bare_samples_per_s": round(bare_rate, 3),
         "bare_ms_per_image": round(bare["seconds_per_image"] * 1e3, 3),
         "bare_ms_per_image_by_shape": bare["ms_per_image_by_shape"], "input_shapes": bare["shapes"],
         "bare_forward": "CUDA graph replay" if getattr(e, "cuda_graphs", False) else "eager",
         "job_timing_s": job["timing_s"],
         "first_use": {"shapes": first["shapes"], "first_s": first["seconds"], "warm_s": again["seconds"],
                       "s_per_new_shape": round((first["seconds"] - again["seconds"]) / max(1, first["shapes"]), 3)},
         "describe": {k: v for k, v in e.describe().items() if k in ("name", "precision", "device_codes",
                                                                     "max_batch", "pad_batches")}}
    _log(f"G1 {task}: wrapper {job['samples_per_s']:.1f}/s vs bare {bare_rate:.1f}/s -> {r['ratio']:.3f}; "
         f"first use {first['seconds']:.1f} s for {first['shapes']} shapes (warm {again['seconds']:.2f} s)")
    if getattr(e, "cuda_graphs", False):
        r["bare_eager_ms_per_image"] = round(eager["seconds_per_image"] * 1e3, 3)
        r["ratio_vs_bare_eager"] = round(job["samples_per_s"] * eager["seconds_per_image"], 4)
        _log(f"G1 {task}: bare eager forward {r['bare_eager_ms_per_image']} ms/image (graph replay "
             f"{r['bare_ms_per_image']}); wrapper / bare eager {r['ratio_vs_bare_eager']:.3f}")
    if task == "seg":
        if os.environ.get("BENCH_SEG_VARIANTS", "1") != "0":
            r["bare_variants_ms_per_image"] = _seg_bare_variants(s, e)
    else:
        short = s.job({task: e}, s.worker(tasks=(task,)), name=f"g1-{task}-256")
        r["shards_of_256"] = {"ratio": round(short["samples_per_s"] / bare_rate, 4),
                              "wrapper_samples_per_s": short["samples_per_s"], "shards": len(s.shards)}
        _log(f"G1 {task} on shards of 256: {short['samples_per_s']:.1f}/s -> {r['shards_of_256']['ratio']:.3f}")
        for name, attrs, cfg_kw in G1_VARIANTS:
            if attrs and not hasattr(e, next(iter(attrs))):
                continue
            with _set({task: e}, **attrs):
                off = s.job({task: e}, s.worker(tasks=(task,), **cfg_kw), shards=[s.long_shard],
                            name=f"g1-{task}-{name}")
            r[name] = {"wrapper_samples_per_s": off["samples_per_s"],
                       "ratio": round(off["samples_per_s"] / bare_rate, 4), "job_timing_s": off["timing_s"]}
            _log(f"G1 {task} with {name}: {off['samples_per_s']:.1f}/s -> {r[name]['ratio']:.3f}")
        r["syncs"] = count_syncs(s, {task: e}, s.worker(tasks=(task,)))
        _log(f"G1 {task}: {r['syncs']}")
        try:
            r["timeline"] = lane_timeline(s, task, e)
        except Exception as ex:  # noqa: BLE001 - a diagnostic: never costs G1 its figure
            r["timeline"] = {"error": f"{type(ex).__name__}: {ex}"}
        _log(f"G1 {task} timeline: {r['timeline']}")
    return r


def gpu_idle(events: list[dict], min_gap_us: float = 50.0) -> dict:
    """Where a profiled job left the GPU idle, from a chrome trace's complete ("X") events: the
    ``JOB`` annotation spans ``process_shard``; ``LAUNCH`` / ``FINISH`` span each batch's queuing
    and its hand-over; kernels, copies and memsets are the GPU's work. Returns the GPU's busy time
    (union of its intervals), the idle time before the first and after the last of them within the
    job, the gaps of at least ``min_gap_us`` between them and how much of those the host spent
    queuing or finishing a batch (milliseconds)."""
    def spans(pred):
        return sorted((x["ts"], x["ts"] + x["dur"]) for x in events if x.get("ph") == "X" and pred(x))

    device = spans(lambda x: x.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    host = {n: spans(lambda x, n=n: x.get("name") == n and x.get("cat") == "user_annotation")
            for n in ("JOB", "LAUNCH", "FINISH")}
    if not device or not host["JOB"]:
        return {"skipped": "no GPU activity or no JOB annotation in the trace"}
    busy, gaps = 0.0, []
    start, end = device[0]
    for a, b in device[1:]:
        if a > end:
            busy += end - start
            if a - end >= min_gap_us:
                gaps.append((end, a))
            start, end = a, b
        else:
            end = max(end, b)
    busy += end - start
    job_start, job_end = host["JOB"][0]

    def overlap(gap, intervals):
        return sum(max(0.0, min(gap[1], b) - max(gap[0], a)) for a, b in intervals)

    ms = lambda us: round(us / 1e3, 2)  # noqa: E731
    return {"job_ms": ms(job_end - job_start), "gpu_busy_ms": ms(busy),
            "idle_before_first_ms": ms(device[0][0] - job_start), "idle_after_last_ms": ms(job_end - device[-1][1]),
            "gaps": len(gaps), "gap_ms": ms(sum(b - a for a, b in gaps)),
            "gap_ms_while_host": {n.lower(): ms(sum(overlap(g, host[n]) for g in gaps)) for n in ("LAUNCH", "FINISH")},
            "batches": len(host["LAUNCH"])}


def lane_timeline(s: _Setup, task: str, e, n: int = 96) -> dict:
    """``gpu_idle`` of ``process_shard`` with this expert alone on one shard of ``n`` images (its
    shapes warmed first), under torch.profiler. How run 9 found that a depth lane keeps the GPU
    busy between its first and last forward and loses its time at the shard's start and end."""
    import json

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from bench.p2_p3_p6_job import make_shards

    if not s.cuda:
        return {"skipped": "CUDA only"}
    shard = make_shards(Path(s.tmp / "src"), s.tmp / f"timeline-{task}", 1, n)[0]
    queue = type(e).predict_deferred.__get__(e)

    def annotated(images, sizes=None):
        with record_function("LAUNCH"):
            finish = queue(images, sizes)

        def done():
            with record_function("FINISH"):
                return finish()
        return done

    e.predict_deferred = annotated
    try:
        s.job({task: e}, s.worker(tasks=(task,)), shards=[shard], name="timeline-warm")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            with record_function("JOB"):
                s.job({task: e}, s.worker(tasks=(task,)), shards=[shard], name="timeline")
            torch.cuda.synchronize(s.device)
    finally:
        del e.predict_deferred
    trace = s.tmp / f"timeline-{task}.json"
    prof.export_chrome_trace(str(trace))
    out = gpu_idle(json.loads(trace.read_text())["traceEvents"])
    trace.unlink()
    return {"images": n, **out}


G1_VARIANTS = [  # depth and normals: (name, expert attribute changes, WorkerConfig changes)
    ("cuda_graphs_off", {"cuda_graphs": False}, {}),
    ("pin_memory_off", {"pin_memory": False}, {}),
    ("queued_batches_2", {}, {"queued_batches": 2}),
]


def _seg_bare_variants(s: _Setup, e) -> dict:
    """The seg forward's speed (default: fp32, NCHW) in NHWC, under cuDNN's autotuner, and under
    TF32 / bf16: ms per image, each image at its shape's
    full-batch time (one repetition after one warm-up pass per shape)."""
    import torch

    out: dict = {}
    variants = [("fp32 channels_last", {"memory_format": "channels_last"}, False),
                ("fp32 contiguous + cudnn.benchmark", {"memory_format": "contiguous"}, True),
                ("tf32", {"precision": "tf32"}, False), ("bf16", {"precision": "bf16"}, False)]
    for name, attrs, bench_mode in variants:
        if s.elapsed() > s.budget_s / 2:
            out[name] = "skipped: time budget"
            continue
        old = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = bench_mode
        try:
            with _set({"seg": e}, **attrs):
                out[name] = round(bare_seconds_per_image(s, "seg", e, reps=1)["seconds_per_image"] * 1e3, 3)
        except Exception as ex:  # noqa: BLE001 - a diagnostic
            out[name] = f"error: {type(ex).__name__}: {ex}"
        finally:
            torch.backends.cudnn.benchmark = old
        _log(f"G1 seg bare, {name}: {out[name]} ms/image")
    return out


def count_syncs(s: _Setup, experts: dict, cfg) -> dict:
    """Host-device synchronisations while ``process_shard`` labels the first shard, as torch's
    sync debug mode reports them (a prototype: it misses some), per forward batch."""
    import warnings

    if not s.cuda:
        return {"skipped": "CUDA only"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s.torch.cuda.set_sync_debug_mode("warn")
        try:
            job = s.job(experts, cfg, shards=s.shards[:1], name="syncs")
        finally:
            s.torch.cuda.set_sync_debug_mode("default")
    msgs = [str(w.message).splitlines()[0][:120] for w in caught if "ynchroniz" in str(w.message)]
    # where the first one comes from: in "error" mode the synchronising call raises, with its stack
    first_site = None
    e = next(iter(experts.values()))
    images = s.images[:s.batch]
    from pipeline.labels import label_shape

    s.torch.cuda.set_sync_debug_mode("error")
    try:
        e.predict(images, [label_shape(im.shape[:2], cfg.label_scale) for im in images])
    except Exception as ex:  # noqa: BLE001 - the synchronising call (a diagnostic: never fails G1)
        import traceback

        frames = [f for f in traceback.extract_tb(ex.__traceback__) if "site-packages" not in f.filename]
        first_site = [f"{type(ex).__name__}: {str(ex)[:80]}"] + [f"{Path(f.filename).name}:{f.lineno} {f.line}"
                                                                  for f in frames[-3:]]
    finally:
        s.torch.cuda.set_sync_debug_mode("default")
    batches = max(1, -(-job["samples"] // s.batch))
    kinds: dict = {}
    for m in msgs:
        kinds[m] = kinds.get(m, 0) + 1
    return {"syncs": len(msgs), "batches": batches, "per_batch": round(len(msgs) / batches, 2),
            "kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1])[:5]),
            "first_in_predict": first_site or "none raised in one predict call"}


@contextlib.contextmanager
def _set(experts: dict, **attrs):
    """Expert attributes changed inside the block: ``name=value`` for every expert that has it,
    ``task={name: value}`` for one; ``precision`` goes through ``set_precision``."""
    per_task = {t: {**{k: v for k, v in attrs.items() if k not in experts}, **attrs.get(t, {})} for t in experts}

    setters = {"precision": ("set_precision", "precision_option"), "memory_format": ("set_memory_format", "memory_format")}

    def assign(e, k, v):
        if k in setters:
            getattr(e, setters[k][0])(v)
        elif hasattr(e, k):
            setattr(e, k, v)

    old = {t: {k: getattr(e, setters[k][1] if k in setters else k) for k in per_task[t] if hasattr(e, k) or k in setters}
           for t, e in experts.items()}
    for t, e in experts.items():
        for k, v in per_task[t].items():
            assign(e, k, v)
    try:
        yield
    finally:
        for t, e in experts.items():
            for k, v in old[t].items():
                assign(e, k, v)


def g2(s: _Setup, experts: dict, bare_ms: dict) -> dict:
    bare_rate = 1000.0 / sum(bare_ms.values())
    job = s.job(experts, s.worker(), name="g2")
    out = {"gpu_name": s.gpu, "ratio": round(job["samples_per_s"] / bare_rate, 4),
           "samples_per_s": job["samples_per_s"], "bare_samples_per_s": round(bare_rate, 3),
           "vs_before_issue_9": round(job["samples_per_s"] / BEFORE_ISSUE_9, 3),
           "goal": f"ratio >= 0.85 and samples_per_s >= {3 * BEFORE_ISSUE_9:.1f} on an H100-class GPU",
           "job": job, "variants": {}}
    _log(f"G2: job {job['samples_per_s']:.1f}/s vs bare {bare_rate:.1f}/s -> {out['ratio']:.3f} "
         f"({out['vs_before_issue_9']:.2f} x the {BEFORE_ISSUE_9}/s before)")
    return out


VARIANTS = [  # (name, WorkerConfig changes, expert attribute changes (per task: {task: {...}}))
    ("default", {}, {}),
    ("cuda_graphs_off", {}, {"cuda_graphs": False}),
    ("pin_memory_off (a pageable copy per image)", {}, {"pin_memory": False}),
    ("seg channels_last", {}, {"seg": {"memory_format": "channels_last"}}),
    ("seg bf16", {}, {"seg": {"precision": "bf16", "memory_format": "channels_last"}}),
    ("seg tf32", {}, {"seg": {"precision": "tf32"}}),
    ("queued_batches 2", {"queued_batches": 2}, {}),
]
# measured on an H100 in run 3 (one shard of 256, samples/s; seg fp32 channels_last, no graphs,
# pinned ring): default 20.0, per-image pageable uploads 19.2, seg NCHW 21.4, cudnn.benchmark 19.7,
# decode/encode threads 6 19.8, seg bf16 42.0, seg tf32 40.5, deferred hand-over off 19.4.
# In earlier runs: run 2 (seg fp32, per-image
# pageable uploads): default 19.5, deferred hand-over off 17.8, per-image pinning 17.8, device codes
# off 19.2, seg bf16 38.3, concurrent experts 8.1, window = batch 4.9; run 1 (seg bf16, before the
# deferred hand-over, shards of 128): default (per-image pinning) 38.7, pinning off 47.3, padding
# off 36.4 (first pass) / 37.7


def g2_variants(s: _Setup, experts: dict, budget_s: float, save) -> dict:
    """The job's options one at a time against the default, on the first shard; each variant is
    skipped once the run has used ``budget_s``."""
    out: dict = {}
    for name, cfg_kw, attrs in VARIANTS:
        if s.elapsed() > budget_s:
            out[name] = {"skipped": f"time budget ({budget_s:.0f} s) spent"}
            continue
        try:
            with _set(experts, **attrs):
                r = s.job(experts, s.worker(**cfg_kw), shards=s.shards[:1], name="variant")
            out[name] = r
            _log(f"G2 variant {name}: {r['samples_per_s']:.1f}/s")
        except Exception as e:  # noqa: BLE001 - one variant must not hide the others
            out[name] = {"error": f"{type(e).__name__}: {e}"}
            _log(f"G2 variant {name} failed: {e}")
        save(out)
    return out


def profile_job(s: _Setup, experts: dict, path: Path, n: int) -> dict:
    """torch.profiler over ``process_shard`` on the first ``n`` images: the top ops by device and
    by host time, written to ``path`` (for reading when a goal is missed)."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from bench.p2_p3_p6_job import make_shards

    shard = make_shards(Path(s.tmp / "src"), s.tmp / "prof-src", 1, n)[0]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if s.cuda else [])
    t0 = time.perf_counter()
    tasks = ("depth", "normal")  # the seg path (torchvision's detection internals) was profiled in run 1
    with torch_profile(activities=activities) as prof:
        s.job({t: experts[t] for t in tasks}, s.worker(tasks=tasks), shards=[shard], name="profile")
    table = prof.key_averages()
    text = []
    if s.cuda:
        text.append(table.table(sort_by="self_cuda_time_total", row_limit=40))
    text.append(table.table(sort_by="self_cpu_time_total", row_limit=40))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"process_shard (depth, normal) on {n} images, {s.gpu}\n\n" + "\n\n".join(text))
    return {"path": str(path), "images": n, "seconds": round(time.perf_counter() - t0, 2)}


def _stored_values(kind: str, value) -> np.ndarray:
    """What a label member gives back for a map: encoded (codes or float map) and decoded."""
    from pipeline import labels

    data = labels.pack(value) if isinstance(value, labels.Codes) else labels.encode(kind, np.asarray(value))
    return labels.decode(labels.member_name("k", kind), data)


def _compare(task: str, a: list[dict], b: list[dict]) -> dict:
    """Labels ``a`` (the path under test) against ``b`` (fp32, host codes)."""
    if task == "seg":
        same = [float((_stored_values("seg", x["seg"]) == _stored_values("seg", y["seg"])).mean()) for x, y in zip(a, b)]
        return {"pixel_agreement": round(float(np.mean(same)), 5), "worst_image": round(min(same), 5)}
    if task == "depth":
        rel = []
        for x, y in zip(a, b):
            da, db = _stored_values("depth", x["depth"]), _stored_values("depth", y["depth"])
            ok = db > 1e-6 * max(float(db.max()), 1e-12)
            rel.append(float((np.abs(da - db)[ok] / db[ok]).mean()) if ok.any() else 0.0)
        return {"mean_relative_error": round(float(np.mean(rel)), 6), "worst_image": round(max(rel), 6)}
    ang = []
    for x, y in zip(a, b):
        na, nb = _stored_values("normal", x["normal"]), _stored_values("normal", y["normal"])
        ang.append(np.degrees(np.arccos(np.clip((na * nb).sum(-1), -1, 1))).ravel())
    ang = np.concatenate(ang)
    return {"angle_median_deg": round(float(np.median(ang)), 4), "angle_p99_deg": round(float(np.percentile(ang, 99)), 4)}


def _meets(task: str, m: dict) -> bool:
    if task == "seg":
        return m["pixel_agreement"] >= 0.99
    if task == "depth":
        return m["mean_relative_error"] <= 0.01
    return m["angle_median_deg"] <= 1.0


def g4(s: _Setup, experts: dict, n_images: int) -> dict:
    from pipeline.labels import label_shape

    images = s.images[:n_images]  # the shards cycle the sample's 16 photos: the first 16 are distinct
    sizes = [label_shape(im.shape[:2], 0.5) for im in images]
    out: dict = {"gpu_name": s.gpu, "images": len(images), "per_expert": {}, "recommended_precision": {},
                 "goal": "seg >= 0.99, depth <= 0.01, normal median <= 1 deg (the GPU path at its default precision "
                         "per expert + device codes vs fp32 + host codes)",
                 "note": "random weights: scores near the 0.5 threshold flip more than a trained model's"}
    for task in TASKS:
        try:
            res = _g4_expert(experts[task], task, images, sizes)
        except Exception as e:  # noqa: BLE001 - the other experts still run
            _log(f"G4 {task} failed: {type(e).__name__}: {e}")
            out["per_expert"][task] = {"error": f"{type(e).__name__}: {e}"}
            continue
        pick = next((p for p in ("bf16", "tf32") if _meets(task, res[p])), "fp32")
        out["per_expert"][task] = res
        out["recommended_precision"][task] = pick
        _log(f"G4 {task}: bf16 {res['bf16']}, tf32 {res['tf32']}, fp32 with 1 % of pixels +1 grey level "
             f"{res['fp32_input_noise']} -> {pick}")
    rec = out["recommended_precision"]
    out["recommended_cli"] = "--precision " + ",".join(f"{t}={p}" for t, p in rec.items())
    from expert_wrappers._torch import CUDA_DEFAULT_PRECISION

    out["default_precision"] = {t: CUDA_DEFAULT_PRECISION[t] for t in TASKS}
    # the headline is the default path: an fp32 expert differs from the reference by its device codes only
    got = {t: out["per_expert"][t].get("device_codes_vs_host_fp32" if p == "fp32" else p)
           for t, p in out["default_precision"].items()}
    if got["seg"]:
        out["seg_pixel_agreement"] = got["seg"]["pixel_agreement"]
    if got["depth"]:
        out["depth_mean_rel_err"] = got["depth"]["mean_relative_error"]
    if got["normal"]:
        out["normal_median_deg"] = got["normal"]["angle_median_deg"]
        out["normal_p99_deg"] = got["normal"]["angle_p99_deg"]
    return out


def _nudged(images: list[np.ndarray], share: float = 0.01, seed: int = 0) -> list[np.ndarray]:
    """The images with ``share`` of their pixels one grey level brighter (all channels): a change no
    one would see, and the yardstick for a precision's label changes (random weights put many
    decisions right at their thresholds)."""
    rng = np.random.default_rng(seed)
    out = []
    for im in images:
        x = im.copy()
        hit = rng.random(im.shape[:2]) < share
        x[hit] = np.minimum(x[hit].astype(np.int16) + 1, 255).astype(np.uint8)
        out.append(x)
    return out


def _g4_expert(e, task: str, images, sizes) -> dict:
    old = (e.precision_option, e.device_codes)
    try:
        e.set_precision("fp32")
        e.device_codes = False
        reference = e.predict(images, sizes)
        e.device_codes = True
        codes_fp32 = e.predict(images, sizes)
        res = {"device_codes_vs_host_fp32": _compare(task, codes_fp32, reference),
               # the model's own sensitivity: fp32 again, 1 % of the pixels one grey level brighter
               "fp32_input_noise": _compare(task, e.predict(_nudged(images), sizes), reference)}
        for prec in ("bf16", "tf32"):
            e.set_precision(prec)
            res[prec] = _compare(task, e.predict(images, sizes), reference)
        if getattr(e, "cuda_graphs", False):  # graph replays vs eager forwards, default precision: identical?
            e.set_precision(old[0])
            graphed = e.predict(images, sizes)
            with _set({task: e}, cuda_graphs=False):
                eager = e.predict(images, sizes)
            res["cuda_graphs_vs_eager"] = {"identical_maps": sum(
                all(np.array_equal(_stored_values(k, g[k]), _stored_values(k, x[k])) for k in g if k in ("depth", "normal", "normal_conf"))
                for g, x in zip(graphed, eager)), "images": len(images)}
    finally:
        e.set_precision(old[0])
        e.device_codes = old[1]
    return res


def run(device: str = "cuda", parts=("G1", "G2", "G4"), sample_dir: str = "data/sample",
        quick: bool | None = None, budget_s: float | None = None, save=None,
        profile_path: str | None = None, profile: str | None = None) -> dict:
    """Returns {"G1": ..., "G2": ..., "G4": ...} (whichever of ``parts``), each with the GPU's name;
    ``save(results)`` is called after every part. Order: G1 (warms the experts up and measures the
    bare forwards), G2, G4, then G2's option variants and a profile while time is left."""
    import torch

    quick = (not device.startswith("cuda")) if quick is None else quick
    if budget_s is None:
        budget_s = float(os.environ.get("BENCH_BUDGET_S") or (600.0 if quick else 270.0))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch sees no CUDA device")
    if quick and not device.startswith("cuda"):
        torch.set_num_threads(1)  # a shared CPU: spinning OpenMP threads would dominate the figures
    save = save or (lambda r: None)
    tmp = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    results: dict = {}
    try:
        s = _Setup(device, sample_dir, quick, tmp, profile)
        s.budget_s = budget_s
        _log(f"{s.gpu}: {len(s.images)} images in {len(s.shards)} shards, experts '{s.profile}', batch {s.batch}")
        experts, build_s = s.build()
        _log(f"experts built in {build_s:.1f} s")
        env = {**s.env, "experts_build_s": round(build_s, 2)}

        def part(name: str, fn):
            """One part; its failure is recorded in its place and the others still run."""
            try:
                r = fn()
            except Exception as e:  # noqa: BLE001
                import traceback

                traceback.print_exc()
                _log(f"{name} failed: {type(e).__name__}: {e}")
                r = {"error": f"{type(e).__name__}: {e}"}
            r["env"] = env
            return r

        g1r: dict = {}
        if {"G1", "G2"} & set(parts):
            g1r = part("G1", lambda: g1(s, experts))  # G2 needs its bare times and warmed experts
            if "G1" in parts:
                results["G1"] = g1r
                save(results)
        if "G2" in parts:
            results["G2"] = part("G2", lambda: g2(s, experts, g1r["bare_ms_per_image"]))
            save(results)
        if "G4" in parts:
            results["G4"] = part("G4", lambda: g4(s, experts, 4 if quick else 16))
            save(results)
        if "G2" in parts and "error" not in results["G2"]:
            results["G2"]["variants"] = part("G2 variants", lambda: g2_variants(
                s, experts, budget_s, lambda v: save({**results, "G2": {**results["G2"], "variants": v}})))
            results["G2"]["variants"].pop("env", None)
            save(results)
            if profile_path and s.elapsed() < budget_s:
                results["G2"]["profile"] = part("profile", lambda: profile_job(s, experts, Path(profile_path),
                                                                         4 if quick else 32))
                results["G2"]["profile"].pop("env", None)
                save(results)
        _log(f"done in {s.elapsed():.0f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results


if __name__ == "__main__":
    import json

    dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    print(json.dumps(run(dev), indent=1, default=str))
