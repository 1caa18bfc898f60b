"""The pseudo-label job's driver: plan, resume, a pool of Ray worker actors, progress, manifest.

The driver is deliberately thin. It

1. lists the shard set's source shards and keeps those that are not complete — a shard is complete
   when ``<out>/_stats/<shard>.json`` exists, was written with this job's config fingerprint, and
   every task tar it names has the recorded size and sha256;
2. starts (or joins) Ray and creates ``workers`` ``ShardWorker`` actors (experts load once per
   actor), hands one shard per call to whichever actor is free, and redoes a shard whose actor or
   node died (Ray restarts the actor and retries the call; the driver also retries with a fresh
   actor, up to ``max_attempts`` per shard);
3. when every shard is complete, writes ``<out>/_manifest.json`` and ``<out>/_manifest.parquet``
   from the markers.

Workers write every tar under a temporary name and rename it into place, then the marker; so an
interruption anywhere leaves only whole files under final names, and a rerun redoes exactly the
shards without a valid marker. Output bytes depend only on the inputs, the config fingerprint, the
batch size and the torch thread count — not on which worker, node or attempt produced them.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipeline import labels
from pipeline.coco import class_name
from pipeline.manifest import ShardSet
from pipeline.storage import sha256, write_bytes_atomic, write_json_atomic
from pipeline.worker import (STATS_VERSION, ShardWorker, WorkerConfig, build_experts, label_settings,
                             stats_path, tar_path)

MANIFEST_JSON = "_manifest.json"
MANIFEST_PARQUET = "_manifest.parquet"
PIPELINE_VERSION = 3  # 2: experts resize to the label resolution on their device; 3: seg masks
#                      sampled at the label resolution, NLL input resized on float, shape buckets
# fields of an expert's description that only change throughput (or, for precision and device
# codes, enter the fingerprint as the settings predicted for the workers' device instead)
_NOT_LABELS = ("device", "precision", "device_codes", "max_batch", "pad_batches", "pin_memory")


class JobError(RuntimeError):
    """The job could not finish (shards failed after all attempts, actors could not start)."""


class JobConfigError(ValueError):
    """A setting the cluster cannot satisfy (e.g. GPUs per worker on a cluster without GPUs)."""


@dataclass
class JobSpec:
    shard_set: ShardSet
    out: Path
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    workers: int | None = None            # default: one per GPU; CPU-only: min(#CPUs, 4)
    gpus_per_worker: float | None = None  # default: 1 if the cluster has GPUs, else 0
    cpus_per_worker: float | None = None  # Ray logical CPUs per actor; default: fits all actors
    ray_address: str | None = None        # None: $RAY_ADDRESS if set, else a local Ray
    verify: str = "sha256"                # how completed shards are checked: "sha256" | "size"
    max_attempts: int = 3                 # per shard, counting driver-level retries
    max_restarts: int = 2                 # per actor (Ray restarts a dead actor process)
    max_task_retries: int = 2             # per call on a restarted actor
    actor_start_timeout: float = 900.0
    progress: bool = True
    verbose: bool = False


# ----------------------------------------------------------------------------------------------
# plan / resume


def fingerprint(cfg: WorkerConfig, experts: dict, settings: dict | None = None) -> str:
    """What makes two runs' labels the same: format, experts (their description as built on the
    driver) and weights, label resolution, and ``settings`` — per task the precision and device
    codes the workers will run with (``planned_label_settings``): bf16 and fp32 labels differ well
    beyond the last bits, so a resume under other ones redoes the shards. Throughput knobs
    (workers, batch size, window, threads, padding, concurrency) and the experts' code are not
    part of it."""
    checkpoints = _checkpoints(experts)
    doc = {"pipeline_version": PIPELINE_VERSION, "format_version": labels.FORMAT_VERSION,
           "stats_version": STATS_VERSION, "tasks": list(cfg.tasks), "profile": cfg.profile, "factory": cfg.factory,
           "options": _label_options(cfg.options), "label_scale": cfg.label_scale, "max_pixels": cfg.max_pixels,
           "checkpoints": dict(sorted(checkpoints.items()))}
    doc["experts"] = {t: {k: v for k, v in d.items() if k not in _NOT_LABELS} for t, d in experts.items()}
    doc["label_settings"] = settings or {}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _label_options(options: dict) -> dict:
    """The experts' options minus throughput knobs (and precision, fingerprinted as resolved)."""
    out = {}
    for task, opts in sorted(options.items()):
        kept = {k: v for k, v in opts.items() if k not in _NOT_LABELS}
        if kept:
            out[task] = kept
    return out


def check_complete(src: Path, out: Path, tasks, fp: str, verify: str = "sha256") -> tuple[dict | None, str]:
    """(stats, "") if the shard's outputs are complete and intact, else (None, why not)."""
    marker = stats_path(out, src.stem)
    if not marker.is_file():
        return None, "no marker"
    try:
        stats = json.loads(marker.read_text())
    except (OSError, ValueError) as e:
        return None, f"unreadable marker: {e}"
    if not isinstance(stats, dict) or stats.get("stats_version") != STATS_VERSION:
        return None, "marker of another version"
    if stats.get("fingerprint") != fp:
        return None, "made with another config"
    try:
        if stats.get("source_bytes") != src.stat().st_size:
            return None, "source shard changed"
    except OSError as e:
        return None, f"source unreadable: {e}"
    for task in tasks:
        rec = stats.get("outputs", {}).get(task)
        path = tar_path(out, task, src.name)
        if not rec:
            return None, f"marker lists no {task} tar"
        try:
            size = path.stat().st_size
        except OSError:
            return None, f"{task} tar missing"
        if size != rec.get("bytes"):
            return None, f"{task} tar size differs"
        if verify == "sha256" and sha256(path) != rec.get("sha256"):
            return None, f"{task} tar checksum differs"
    return stats, ""


def plan(shards, out: Path, tasks, fp: str, verify: str = "sha256", threads: int = 4
         ) -> tuple[dict[str, dict], list[Path], dict[str, str]]:
    """Split shards into complete ones ({stem: stats}) and ones to do (source order), with why."""
    done: dict[str, dict] = {}
    todo: list[Path] = []
    why: dict[str, str] = {}
    with cf.ThreadPoolExecutor(threads) as pool:  # hashing releases the GIL
        results = list(pool.map(lambda p: check_complete(p, out, tasks, fp, verify), shards))
    for src, (stats, reason) in zip(shards, results):
        if stats is None:
            todo.append(src)
            why[src.stem] = reason
        else:
            done[src.stem] = stats
    return done, todo, why


def dry_run(spec: JobSpec) -> dict:
    """What ``run(spec)`` would do, without doing it: the experts' preflight (as a run starts:
    missing weights fail here), the config fingerprint, and which shards are complete and which
    would run, and why. Starts no Ray and writes nothing under ``spec.out``."""
    cfg = spec.worker
    experts, joined = settle(spec)
    shards = list(spec.shard_set.shards)
    with _shutdown_ray_if(joined):
        done, todo, why = plan(shards, Path(spec.out), cfg.tasks, cfg.fingerprint, spec.verify)
    return {"shards": [p.stem for p in shards], "complete": sorted(done), "todo": [p.stem for p in todo],
            "why": why, "fingerprint": cfg.fingerprint, "experts": experts, "device": cfg.device,
            "label_settings": cfg.label_settings, "out": str(spec.out)}


# ----------------------------------------------------------------------------------------------
# experts (preflight) and Ray


def settle(spec: JobSpec) -> tuple[dict, bool]:
    """The experts' preflight, the workers' device, the label settings they will run with and the
    fingerprint (set on ``spec.worker``). Returns (the experts' descriptions, whether Ray was
    joined to learn the device)."""
    cfg = spec.worker
    built = preflight(cfg)
    experts = {t: built[t].describe() for t in cfg.tasks}
    cfg.device, joined = worker_device(spec)
    cfg.label_settings = planned_label_settings(built, cfg.device, cfg.device_codes)
    cfg.fingerprint = fingerprint(cfg, experts, cfg.label_settings)
    return experts, joined


def preflight(cfg: WorkerConfig) -> dict:
    """Build the experts once in the driver (on CPU), before Ray starts: missing weights fail
    within seconds here (MissingWeightsError); the manifest gets their description and the
    fingerprint their planned label settings. Returns {task: expert}."""
    return build_experts(cfg.tasks, cfg.profile, "cpu", cfg.options, cfg.factory)


def planned_label_settings(experts: dict, device: str, device_codes: bool | None) -> dict:
    """Per task, the precision and device codes the same experts will label with on ``device``
    (``--device-codes`` applied): what the fingerprint records and each worker checks."""
    out = {}
    for t, e in experts.items():
        s = dict(label_settings(e, device.split(":")[0]))
        if device_codes is not None and "device_codes" in s:
            s["device_codes"] = bool(device_codes)
        out[t] = s
    return out


def worker_device(spec: JobSpec) -> tuple[str, bool]:
    """The device the workers will run on, settled before planning because the fingerprint
    depends on it: ``--device`` if given; with ``auto``, cuda when the workers get GPUs (a GPU on
    this machine, or in the cluster at ``--ray-address``/$RAY_ADDRESS, joined here for that).
    Returns (device, whether this call joined Ray)."""
    device = spec.worker.device
    if device != "auto":
        return device, False
    if spec.gpus_per_worker is not None:
        return ("cuda" if spec.gpus_per_worker > 0 else "cpu"), False
    if spec.ray_address or os.environ.get("RAY_ADDRESS"):
        import ray

        joined = start_ray(spec.ray_address, spec.verbose)
        return ("cuda" if ray.cluster_resources().get("GPU", 0) else "cpu"), joined
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu"), False


def _checkpoints(desc: dict) -> dict:
    out: dict[str, str] = {}
    for d in desc.values():
        out.update(d.get("checkpoints") or {})
    return dict(sorted(out.items()))


def start_ray(address: str | None, verbose: bool = False) -> bool:
    """Join a running Ray (``address`` or $RAY_ADDRESS) or start a local one; returns whether this
    call started Ray (then the job shuts it down at the end)."""
    import ray

    if ray.is_initialized():
        return False
    kw = dict(include_dashboard=False, log_to_driver=verbose,
              logging_level=logging.INFO if verbose else logging.ERROR)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kw)
    else:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        # address="local": always a fresh instance; a bare init() would join any cluster another
        # process left registered on this machine (/tmp/ray/ray_current_cluster).
        # Only file paths and small stats dicts go through the object store.
        ray.init(address="local", num_cpus=cpus, object_store_memory=128 << 20, **kw)
    return True


def resources(spec: JobSpec) -> tuple[int, float, float, int]:
    """(workers, gpus per worker, cpus per worker, torch threads) for the connected cluster.
    Actors never ask for more than the cluster has, so actor creation cannot wait forever."""
    import ray

    total = ray.cluster_resources()
    n_cpu, n_gpu = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    gpus = spec.gpus_per_worker if spec.gpus_per_worker is not None else (1.0 if n_gpu else 0.0)
    if gpus < 0 or (gpus > 1 and gpus != int(gpus)):
        raise JobConfigError(f"--gpus-per-worker must be a fraction in (0, 1] or a whole number, got {gpus}")
    if gpus and gpus > n_gpu:
        raise JobConfigError(f"--gpus-per-worker {gpus:g} but the Ray cluster has {n_gpu:g} GPU(s); "
                             f"use --gpus-per-worker 0 for CPU workers")
    if spec.workers is not None:
        workers = spec.workers
    elif gpus:
        workers = max(1, int(n_gpu / gpus + 1e-9))
    else:
        workers = max(1, min(int(n_cpu), 4))
    if workers < 1:
        raise JobConfigError("--workers must be >= 1")
    if gpus and workers * gpus > n_gpu + 1e-9:
        raise JobConfigError(f"{workers} workers x {gpus:g} GPUs > {n_gpu:g} GPUs in the cluster")
    if spec.cpus_per_worker is not None:
        cpus = spec.cpus_per_worker
        if workers * cpus > n_cpu + 1e-9:
            raise JobConfigError(f"{workers} workers x {cpus:g} CPUs > {n_cpu:g} CPUs in the cluster")
    elif gpus:
        cpus = min(1.0, n_cpu / workers)
    else:
        # CPU workers hold a fraction of a CPU each (never all of them): on a 2-core machine two
        # actors plus anything else Ray schedules still fit; compute threads are set explicitly
        cpus = min(0.5, n_cpu / workers / 2)
    cpus = float(int(cpus * 1e4) / 1e4)
    threads = spec.worker.torch_threads
    if not threads:
        local = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        threads = max(1, int(cpus)) if gpus else max(1, local // workers)
    return workers, gpus, cpus, threads


class _Pool:
    """``workers`` actors; one shard per call; a dead actor is killed and replaced."""

    def __init__(self, spec: JobSpec, cfg: WorkerConfig, n: int, gpus: float, cpus: float,
                 on_event: Callable | None):
        import ray

        self.ray = ray
        self.cls = ray.remote(ShardWorker)
        self.spec, self.cfg, self.gpus, self.cpus = spec, cfg, gpus, cpus
        self.on_event = on_event or (lambda *a: None)
        self.actors = [self._new() for _ in range(n)]
        self.starting: dict[int, tuple] = {}

    def _new(self):
        # SPREAD: workers go to different nodes when they can (one per GPU node, or CPU nodes)
        return self.cls.options(num_cpus=self.cpus, num_gpus=self.gpus, scheduling_strategy="SPREAD",
                                max_restarts=self.spec.max_restarts,
                                max_task_retries=self.spec.max_task_retries).remote(self.cfg)

    def wait_ready(self, timeout: float) -> list[dict]:
        ray = self.ray
        refs = [a.info.remote() for a in self.actors]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        if pending:
            raise JobError(f"{len(pending)} of {len(refs)} worker actors did not start within "
                           f"{timeout:.0f} s (cluster resources: {ray.cluster_resources()}; "
                           f"asked per actor: {self.cpus:g} CPU, {self.gpus:g} GPU)")
        infos = []
        for i, ref in enumerate(refs):
            try:
                info = ray.get(ref)
            except ray.exceptions.RayError as e:
                raise JobError(f"worker actor failed to start: {_root_cause(e)}") from e
            infos.append(info)
            self.on_event("actor_ready", {"index": i, "actor": self.actors[i], **info})
        return infos

    def replace(self, i: int) -> None:
        with contextlib.suppress(Exception):
            self.ray.kill(self.actors[i], no_restart=True)
        self.actors[i] = self._new()
        self.starting[i] = (self.actors[i].info.remote(), time.monotonic())
        self.on_event("actor_replaced", {"index": i, "actor": self.actors[i]})

    def check_starting(self, timeout: float, log: Callable[[str], None]) -> None:
        """Replacement actors that the cluster cannot place (e.g. the only GPU node left) would
        leave their shard waiting silently: say so once they are overdue."""
        for i, (ref, t) in list(self.starting.items()):
            ready, _ = self.ray.wait([ref], timeout=0)
            if ready:
                del self.starting[i]
            elif time.monotonic() - t > timeout:
                log(f"warning: replacement worker {i} has not started after {timeout:.0f} s "
                    f"(cluster resources now: {self.ray.available_resources()}); still waiting")
                self.starting[i] = (ref, time.monotonic())

    def shutdown(self) -> None:
        for a in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(a, no_restart=True)


def _root_cause(e: BaseException) -> str:
    """One line for an error that came back through Ray (the innermost user exception)."""
    cause = getattr(e, "cause", None) or e.__cause__
    seen = 0
    while cause is not None and seen < 5:
        e, cause, seen = cause, getattr(cause, "cause", None) or cause.__cause__, seen + 1
    text = str(e).strip().splitlines()
    tail = [ln for ln in text if ln.strip()][-1:] or [type(e).__name__]
    line = f"{type(e).__name__}: {tail[0]}" if not tail[0].startswith(type(e).__name__) else tail[0]
    return line if len(line) <= 240 else line[:239] + "…"


# ----------------------------------------------------------------------------------------------
# manifest


def _summed(stats: list[dict], field: str) -> dict:
    """The per-shard counters ``field`` ({name: n}) added up over the shards."""
    total: Counter = Counter()
    for s in stats:
        total.update(s[field])
    return dict(sorted(total.items()))


def build_manifest(spec: JobSpec, stats: list[dict], experts: dict, fp: str) -> tuple[dict, list[dict]]:
    cfg = spec.worker
    n_cls = labels.NUM_SEG_CLASSES + 1
    pixels = [sum(s["class_pixels"][c] for s in stats) for c in range(n_cls)]
    instances = [sum(s["class_instances"][c] for s in stats) for c in range(n_cls)]
    # the experts as the workers ran them (device, precision); the driver's preflight copy
    # (built on CPU) only when no marker has one
    described = [s.get("experts") for s in stats if s.get("experts")]
    by_workers = described[0] if described else experts
    differ = [s["shard"] for s in stats if s.get("experts") and s["experts"] != by_workers]
    runs = [s["run"] for s in stats if s.get("run")]
    outputs = {t: {"bytes": sum(s["outputs"][t]["bytes"] for s in stats),
                   "members": sum(s["outputs"][t]["members"] for s in stats)} for t in cfg.tasks}
    manifest = {
        "format_version": labels.FORMAT_VERSION,
        "pipeline_version": PIPELINE_VERSION,
        "stats_version": STATS_VERSION,
        "shard_set": {"name": spec.shard_set.name, "root": str(spec.shard_set.root),
                      "shards": [p.name for p in spec.shard_set.shards],
                      "expected_samples": spec.shard_set.expected_samples},
        "tasks": list(cfg.tasks),
        # the kinds each tree holds: every labelled sample of a tree has exactly these members
        "kinds": {t: [k for k in labels.KINDS if any(k in s["outputs"][t]["kinds"] for s in stats)]
                  for t in cfg.tasks},
        "experts": by_workers,
        "experts_differ_in_shards": differ,
        "checkpoints": _checkpoints(by_workers),
        "config": {"fingerprint": fp, "profile": cfg.profile, "tasks": list(cfg.tasks),
                   "options": cfg.options, "label_scale": cfg.label_scale,
                   "max_pixels": cfg.max_pixels, "device": cfg.device,
                   "label_settings": cfg.label_settings},
        "run": runs[0] if runs else {},
        "run_differs_in_shards": [s["shard"] for s in stats if s.get("run", {}) != (runs[0] if runs else {})],
        # per sample: samples = ok + skipped; damage to shards (truncated, empty) is not a sample
        "counts": {"shards": len(stats), "samples": sum(s["samples"] for s in stats),
                   "ok": sum(s["ok"] for s in stats), "skipped": sum(s["skipped"] for s in stats),
                   "skip_reasons": _summed(stats, "skip_reasons"),
                   "shard_damage": dict(sorted(Counter(d["reason"] for s in stats for d in s["shard_damage"]).items())),
                   "source_modes": _summed(stats, "source_modes"),
                   "exif_orientations": _summed(stats, "exif_orientations"),
                   "near_constant": sum(s["near_constant"] for s in stats)},
        "outputs": outputs,
        "classes": [class_name(c) for c in range(n_cls)],
        "class_pixels": pixels,
        "ignore_pixels": sum(s["ignore_pixels"] for s in stats),
        "class_instances": instances,
        "instances_counted_as": "connected components per class of the seg map at label resolution, "
                                "unless the expert reported its instances' classes",
    }
    rows = []
    for s in stats:
        row = {"shard": s["shard"], "source": Path(s["source"]).name, "samples": s["samples"],
               "ok": s["ok"], "skipped": s["skipped"],
               "not_rgb": sum(n for m, n in s["source_modes"].items() if m != "RGB"),
               "rotated": sum(n for o, n in s["exif_orientations"].items() if o != "1"),
               "near_constant": s["near_constant"],
               "shard_damage": ",".join(d["reason"] for d in s["shard_damage"]),
               "seconds": float(s["seconds"]),
               "expert_seconds": float(s.get("timing", {}).get("experts", 0.0)),
               "host": s.get("worker", {}).get("host", "")}
        for t in cfg.tasks:
            row[f"{t}_bytes"] = s["outputs"][t]["bytes"]
            row[f"{t}_sha256"] = s["outputs"][t]["sha256"]
            row[f"{t}_members"] = s["outputs"][t]["members"]
        rows.append(row)
    return manifest, rows


def write_manifest(out: Path, manifest: dict, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    write_bytes_atomic(out / MANIFEST_PARQUET, buf.getvalue().to_pybytes())
    write_json_atomic(out / MANIFEST_JSON, manifest)  # last: its presence means the job finished


# ----------------------------------------------------------------------------------------------
# the job


@contextlib.contextmanager
def _out_lock(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JobConfigError(f"another pseudo-label job is writing to {out}") from None
        yield


@contextlib.contextmanager
def _shutdown_ray_if(joined: bool):
    try:
        yield
    finally:
        if joined:
            import ray

            ray.shutdown()


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(spec: JobSpec, *, on_event: Callable | None = None, log: Callable[[str], None] | None = _stderr) -> dict:
    """Run (or resume) the job; returns a summary dict. Raises MissingWeightsError before Ray
    starts, JobConfigError for unsatisfiable settings, JobError if shards still fail.
    ``log`` gets a few one-line progress messages (None: silent)."""
    log = log or (lambda msg: None)
    t0 = time.perf_counter()
    out = Path(spec.out)
    cfg = spec.worker
    experts, joined = settle(spec)
    fp = cfg.fingerprint
    log(f"experts ({cfg.profile}): " + ", ".join(f"{t}={d.get('name', '?')}" for t, d in experts.items())
        + f"; checked in {time.perf_counter() - t0:.1f} s; workers on {cfg.device}: "
        + ", ".join(f"{t} {'/'.join(f'{k}={v}' for k, v in st.items())}" for t, st in cfg.label_settings.items()))
    shards = list(spec.shard_set.shards)
    with _out_lock(out), _shutdown_ray_if(joined):
        done, todo, why = plan(shards, out, cfg.tasks, fp, spec.verify)
        log(f"plan: {len(shards)} shards, {len(done)} complete, {len(todo)} to do -> {out}")
        if spec.verbose:
            for stem, reason in why.items():
                log(f"  {stem}: to do ({reason})")
        new: dict[str, dict] = {}
        info = {"workers": 0}
        if todo:
            for name in (MANIFEST_JSON, MANIFEST_PARQUET):  # stale until the job completes again
                (out / name).unlink(missing_ok=True)
            new, info = _run_pool(spec, cfg, todo, len(done), len(shards), on_event, log)
        all_stats = [done.get(p.stem) or new[p.stem] for p in shards]
        manifest, rows = build_manifest(spec, all_stats, experts, fp)
        write_manifest(out, manifest, rows)
    elapsed = time.perf_counter() - t0
    n_new = sum(s["samples"] for s in new.values())
    summary = {"shards": len(shards), "processed": sorted(new), "resumed": sorted(done),
               "ok": manifest["counts"]["ok"], "skipped": manifest["counts"]["skipped"],
               "new_samples": n_new, "seconds": round(elapsed, 2),
               "pool_seconds": info.get("pool_seconds", 0.0), "workers": info["workers"],
               "out": str(out), "fingerprint": fp}
    return summary


def _run_pool(spec: JobSpec, cfg: WorkerConfig, todo: list[Path], n_done: int, n_total: int,
              on_event: Callable | None, log: Callable[[str], None]) -> tuple[dict[str, dict], dict]:
    import ray
    from tqdm import tqdm

    t0 = time.perf_counter()
    started = start_ray(spec.ray_address, spec.verbose)
    pool = None
    try:
        total = ray.cluster_resources()
        log(f"ray: {'started a local instance' if started else 'joined ' + ray.get_runtime_context().gcs_address}"
            f" ({total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs, "
            f"{len(ray.nodes())} node(s)) in {time.perf_counter() - t0:.1f} s")
        workers, gpus, cpus, threads = resources(spec)
        workers = min(workers, len(todo))
        cfg.torch_threads = threads
        t0 = time.perf_counter()
        pool = _Pool(spec, cfg, workers, gpus, cpus, on_event)
        infos = pool.wait_ready(spec.actor_start_timeout)
        log(f"workers: {workers} x ({cpus:g} CPU, {gpus:g} GPU, {threads} torch thread(s), "
            f"device {infos[0]['device']}) ready in {time.perf_counter() - t0:.1f} s")
        t_pool = time.perf_counter()
        queue: deque[Path] = deque(todo)
        attempts: dict[str, int] = {}
        errors: dict[str, str] = {}
        results: dict[str, dict] = {}
        free = deque(range(workers))
        inflight: dict = {}
        n_samples = 0
        bar = tqdm(total=n_total, initial=n_done, unit="shard", disable=not spec.progress,
                   dynamic_ncols=True, file=sys.stderr, desc=f"pseudolabel {spec.shard_set.name}")
        with bar:
            while queue or inflight:
                while queue and free:
                    i, src = free.popleft(), queue.popleft()
                    attempts[src.stem] = attempts.get(src.stem, 0) + 1
                    ref = pool.actors[i].process.remote(str(src), str(spec.out))
                    inflight[ref] = (i, src)
                    if on_event:
                        on_event("shard_started", {"index": i, "shard": src.stem, "actor": pool.actors[i],
                                                   "attempt": attempts[src.stem]})
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
                if pool.starting:
                    pool.check_starting(spec.actor_start_timeout, bar.write)
                for ref in ready:
                    i, src = inflight.pop(ref)
                    try:
                        stats = ray.get(ref)
                    except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                            ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError,
                            ray.exceptions.OwnerDiedError) as e:
                        pool.replace(i)  # the actor or its node is gone; a fresh one takes over
                        _retry_or_fail(src, attempts, errors, queue, spec, e, bar)
                    except ray.exceptions.RayError as e:  # the shard raised inside the worker
                        _retry_or_fail(src, attempts, errors, queue, spec, e, bar)
                    else:
                        results[src.stem] = stats
                        n_samples += stats["samples"]
                        bar.update(1)
                        dt = time.perf_counter() - t_pool
                        bar.set_postfix_str(f"{n_samples / max(dt, 1e-9):.1f} samples/s")
                        if on_event:
                            on_event("shard_done", {"shard": src.stem, "stats": stats})
                    free.append(i)
        pool_seconds = time.perf_counter() - t_pool
        if errors:
            lines = "; ".join(f"{k}: {v}" for k, v in sorted(errors.items()))
            raise JobError(f"{len(errors)} shard(s) failed after {spec.max_attempts} attempts "
                           f"(rerun to retry them): {lines}")
        return results, {"workers": workers, "pool_seconds": round(pool_seconds, 3),
                         "threads": threads, "cpus_per_worker": cpus, "gpus_per_worker": gpus}
    finally:
        if pool is not None:
            pool.shutdown()
        if started:
            ray.shutdown()


def _retry_or_fail(src: Path, attempts: dict, errors: dict, queue: deque, spec: JobSpec,
                   e: BaseException, bar) -> None:
    msg = _root_cause(e)
    if attempts[src.stem] < spec.max_attempts:
        bar.write(f"shard {src.stem}: attempt {attempts[src.stem]} failed ({msg}); retrying",
                  file=sys.stderr)
        queue.appendleft(src)
    else:
        errors[src.stem] = msg
