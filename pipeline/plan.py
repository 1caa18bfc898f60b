"""Planning and resume for the pseudo-label job: what a run is (``JobSpec``), its config
fingerprint, and which shards are complete.

A shard is complete when ``<out>/_stats/<shard>.json`` exists, was written with this job's config
fingerprint, its source shard still has the recorded size, and every task tar it names has the
recorded size and (``verify="sha256"``) sha256. Sizes come from one listing per output folder /
prefix (``storage.listdir``), not one request per file; checksums stream each tar once (on a
bucket that reads every label byte: ``--verify size`` trusts the sizes instead).

``settle`` is the experts' preflight on the driver: the experts are built once on CPU (missing
weights fail here, before Ray starts), the workers' device and label settings are settled, and
the fingerprint computed from them.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os
from dataclasses import dataclass, field

from pipeline import labels, storage
from pipeline.manifest import ShardSet
from pipeline.pool import start_ray
from pipeline.worker import STATS_DIR, STATS_VERSION, WorkerConfig, build_experts, label_settings, stats_path, tar_path

PIPELINE_VERSION = 3  # 2: experts resize to the label resolution on their device; 3: seg masks
#                      sampled at the label resolution, NLL input resized on float, shape buckets
# fields of an expert's description that only change throughput (or, for precision and device
# codes, enter the fingerprint as the settings predicted for the workers' device instead)
_NOT_LABELS = ("device", "precision", "device_codes", "max_batch", "pad_batches", "pin_memory", "memory_format",
               "cuda_graphs", "graphs")


@dataclass
class JobSpec:
    shard_set: ShardSet
    out: str                              # label output root: a local path or a URL
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

    def __post_init__(self):
        self.out = storage.normalize(self.out)


# ----------------------------------------------------------------------------------------------
# fingerprint and resume


def fingerprint(cfg: WorkerConfig, experts: dict, settings: dict | None = None) -> str:
    """What makes two runs' labels the same: format, experts (their description as built on the
    driver) and weights, label resolution, and ``settings`` — per task the precision and device
    codes the workers will run with (``planned_label_settings``): bf16 and fp32 labels differ well
    beyond the last bits, so a resume under other ones redoes the shards. Throughput knobs
    (workers, batch size, window, threads, padding, concurrency) and the experts' code are not
    part of it."""
    checkpoints = expert_checkpoints(experts)
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


def check_complete(src, out, tasks, fp: str, verify: str = "sha256", listing: dict | None = None,
                   source_bytes: int | None = None) -> tuple[dict | None, str]:
    """(stats, "") if the shard's outputs are complete and intact, else (None, why not).
    ``listing``: {location: bytes} of the output folders, as ``plan`` lists them once (None: ask
    per file); ``source_bytes``: the source shard's size when already listed."""
    name, stem = storage.basename(src), storage.stem(src)
    marker = stats_path(out, stem)

    def size_of(location: str) -> int:
        if listing is None:
            return storage.size(location)
        if location not in listing:
            raise FileNotFoundError(location)
        return listing[location]

    try:
        size_of(marker)
        stats = json.loads(storage.read_bytes(marker))
    except FileNotFoundError:
        return None, "no marker"
    except (OSError, ValueError) as e:
        return None, f"unreadable marker: {e}"
    if not isinstance(stats, dict) or stats.get("stats_version") != STATS_VERSION:
        return None, "marker of another version"
    if stats.get("fingerprint") != fp:
        return None, "made with another config"
    try:
        if stats.get("source_bytes") != (source_bytes if source_bytes is not None else storage.size(src)):
            return None, "source shard changed"
    except OSError as e:
        return None, f"source unreadable: {e}"
    for task in tasks:
        rec = stats.get("outputs", {}).get(task)
        path = tar_path(out, task, name)
        if not rec:
            return None, f"marker lists no {task} tar"
        try:
            size = size_of(path)
        except OSError:
            return None, f"{task} tar missing"
        if size != rec.get("bytes"):
            return None, f"{task} tar size differs"
        if verify == "sha256":
            try:
                if storage.sha256(path) != rec.get("sha256"):
                    return None, f"{task} tar checksum differs"
            except FileNotFoundError:
                return None, f"{task} tar missing"
    return stats, ""


def output_listing(out, tasks) -> dict[str, int]:
    """{location: bytes} of every marker and task tar under ``out``: one listing per folder /
    prefix (OSError for a missing bucket or no permission)."""
    found: dict[str, int] = {}
    for folder in (STATS_DIR, *tasks):
        found.update(storage.listdir(storage.join(out, folder)))
    return found


def plan(shards, out, tasks, fp: str, verify: str = "sha256", threads: int | None = None,
         sizes: dict | None = None) -> tuple[dict[str, dict], list, dict[str, str]]:
    """Split shards into complete ones ({stem: stats}) and ones to do (the given shard objects,
    source order), with why. ``sizes``: {shard location: bytes} when the shards were listed."""
    done: dict[str, dict] = {}
    todo: list = []
    why: dict[str, str] = {}
    listing = output_listing(out, tasks)
    sizes = {storage.normalize(k): v for k, v in (sizes or {}).items()}
    # hashing releases the GIL; on a bucket each check mostly waits on the network
    threads = threads or (4 if storage.is_local(out) else 16)

    def check(src):
        return check_complete(src, out, tasks, fp, verify, listing, sizes.get(storage.normalize(src)))

    with cf.ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(check, shards))
    for src, (stats, reason) in zip(shards, results):
        stem = storage.stem(src)
        if stats is None:
            todo.append(src)
            why[stem] = reason
        else:
            done[stem] = stats
    return done, todo, why


# ----------------------------------------------------------------------------------------------
# experts (preflight), device and label settings


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


def expert_checkpoints(desc: dict) -> dict:
    out: dict[str, str] = {}
    for d in desc.values():
        out.update(d.get("checkpoints") or {})
    return dict(sorted(out.items()))
