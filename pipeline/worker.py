"""One shard in, one tar per task tree out — the pseudo-label worker.

``process_shard`` is plain Python (no Ray): it streams a source shard, decodes JPEGs on a thread
pool, runs the experts on batches in the calling thread, encodes labels on a second thread pool
(so decoding and encoding overlap expert compute), appends members to a temporary tar per task
tree, renames every tar into place and writes the shard's stats marker last::

    <out>/seg/<shard>.tar  <out>/depth/<shard>.tar  <out>/normal/<shard>.tar   (atomic renames)
    <out>/_stats/<shard>.json                                                   (written last)

Members keep the source keys in source order. A sample that cannot be labelled (undecodable
image, expert or encoder failure) gets no member in any tree; it is listed in the marker's
``skips`` with its source index, key and reason. The marker's books (``pipeline.shards.SampleLedger``)
count samples, not members: samples = ok + skipped for every shard. A shard is *complete* when its marker exists and
the tars it names have the recorded sha256 (``pipeline.job`` checks that before skipping it).

``ShardWorker`` is the thin Ray actor around it: it loads the experts once and processes one
shard per call.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline import labels
from pipeline.shards import DEFAULT_MAX_PIXELS, Sample, SampleLedger, Skip, decode_record, iter_records
from pipeline.storage import AtomicTarWriter, write_json_atomic

STATS_DIR = "_stats"
STATS_VERSION = 2  # 2: per-sample books (samples = ok + skipped), shard damage apart, source modes


@dataclass
class WorkerConfig:
    tasks: tuple[str, ...] = labels.TASKS
    profile: str = "default"
    device: str = "auto"          # "auto": cuda when the worker sees a GPU, else cpu
    device_codes: bool | None = None  # experts convert maps to label codes on their device
    #                                   (None: each expert's default, on for CUDA experts)
    options: dict = field(default_factory=dict)  # passed to the experts factory
    factory: str = "expert_wrappers:build_experts"  # "module:function" building {task: Expert}
    label_scale: float = 0.5      # label side / image side, recorded per member (image_size)
    batch_size: int = 8
    decode_threads: int = 2       # 0: decode in the worker's own thread (one-core workers)
    encode_threads: int = 2       # 0: encode in the worker's own thread
    torch_threads: int = 0        # 0: leave torch's default
    cpu_affinity: tuple[int, ...] | None = None  # pin the worker process (benchmarks)
    max_pixels: int = DEFAULT_MAX_PIXELS
    fingerprint: str = ""         # the job's config fingerprint, written into every marker
    sample_delay: float = 0.0     # seconds slept per sample: a test hook to kill a worker mid-shard

    def __post_init__(self):
        self.tasks = tuple(t for t in labels.TASKS if t in set(self.tasks)) + \
            tuple(sorted(set(self.tasks) - set(labels.TASKS)))
        if not self.tasks:
            raise ValueError("no tasks")
        labels.label_shape((1, 1), self.label_scale)  # validates the scale
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.decode_threads < 0 or self.encode_threads < 0:
            raise ValueError("decode_threads and encode_threads must be >= 0 (0: inline)")


def stats_path(out_root: str | os.PathLike, shard_stem: str) -> Path:
    return Path(out_root) / STATS_DIR / f"{shard_stem}.json"


def tar_path(out_root: str | os.PathLike, task: str, shard_name: str) -> Path:
    return Path(out_root) / task / shard_name


class _Inline(cf.Executor):
    """An executor that runs each call at once in the caller's thread: ``decode_threads=0`` /
    ``encode_threads=0``. A worker pinned to one core has nothing to overlap, and pool hand-offs
    there cost about a quarter of a JPEG decode per sample (measured for P2)."""

    def submit(self, fn, /, *args, **kwargs) -> cf.Future:
        fut: cf.Future = cf.Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - delivered through the future, like a pool
            fut.set_exception(e)
        return fut


def _pool(threads: int, name: str) -> cf.Executor:
    return cf.ThreadPoolExecutor(threads, thread_name_prefix=name) if threads > 0 else _Inline()


def _remove_stale_tmp(directory: Path, name: str) -> None:
    """Temporary files a killed worker left for this shard (never visible under a final name)."""
    if directory.is_dir():
        for p in directory.glob(f".{name}.tmp*"):
            p.unlink(missing_ok=True)


def _decoded(src: Path, pool: cf.Executor, prefetch: int, max_pixels: int
             ) -> Iterator[tuple[int, Sample | Skip]]:
    """(source index, Sample|Skip) in source order; up to ``prefetch`` records decode ahead."""
    pending: deque[tuple[int, cf.Future]] = deque()
    for index, item in enumerate(iter_records(src)):
        if isinstance(item, Skip):
            fut: cf.Future = cf.Future()
            fut.set_result(item)
        else:
            fut = pool.submit(decode_record, item, max_pixels)
        pending.append((index, fut))
        while len(pending) > prefetch:
            i, f = pending.popleft()
            yield i, f.result()
    while pending:
        i, f = pending.popleft()
        yield i, f.result()


MIN_INSTANCE_PIXELS = 8  # at label resolution: smaller fragments are not counted as objects


def count_instances(seg: np.ndarray, pixels: np.ndarray | None = None,
                    min_pixels: int = MIN_INSTANCE_PIXELS) -> np.ndarray:
    """Connected components per class (8-connectivity, at least ``min_pixels``) of a semantic map:
    the number of objects per class as far as a semantic map can tell (touching instances of one
    class count once, an occluded one split in two counts twice). ``pixels`` (the map's 256-bin
    histogram), when given, saves finding the classes present."""
    counts = np.zeros(256, np.int64)
    if pixels is None:
        pixels = np.bincount(seg.ravel(), minlength=256)
    present = [c for c in np.flatnonzero(pixels) if c not in (0, labels.SEG_IGNORE)]
    if not present:
        return counts
    from scipy import ndimage

    structure = np.ones((3, 3), bool)
    for c in present:
        comp, n = ndimage.label(seg == c, structure=structure)
        if n:
            counts[c] = int((np.bincount(comp.ravel(), minlength=n + 1)[1:] >= min_pixels).sum())
    return counts


def encode_maps(key: str, maps: dict, image_hw: tuple[int, int],
                tasks: tuple[str, ...], label_scale: float, orientation: int = 1) -> tuple[dict[str, list], dict]:
    """Encode an image's expert maps at label resolution, in ``labels.KINDS`` order. A map is
    either ``labels.Codes`` (converted on the expert's device, at label resolution already) or an
    array at any resolution (resized and converted here). ``orientation``: the EXIF orientation the
    reader applied to the image (recorded in every member). Returns ({task: [(member name, bytes)]},
    seg histograms)."""
    hw = labels.label_shape(image_hw, label_scale)
    out: dict[str, list] = {t: [] for t in tasks}
    hist: dict = {}
    for task in tasks:
        if task not in maps:
            raise ValueError(f"the {task} expert returned no {task!r} map (got {sorted(maps)})")
    for kind in labels.KINDS:
        if kind not in maps or labels.task_of(kind) not in out:
            continue
        value = maps[kind]
        if isinstance(value, labels.Codes):
            if value.kind != kind or value.shape != hw:
                raise ValueError(f"{kind}: the expert's codes are {value.kind} {value.shape}, "
                                 f"expected {kind} at the label resolution {hw}")
            codes = value
        else:
            codes = labels.to_codes(kind, labels.resize_map(kind, np.asarray(value), hw))
        out[labels.task_of(kind)].append(
            (labels.member_name(key, kind), labels.pack(codes, image_size=image_hw, orientation=orientation)))
        if kind == "seg":
            hist["pixels"] = codes.class_pixels()
            if "instance_classes" in maps:  # an expert that reports its painted instances' classes
                cls = np.asarray(maps["instance_classes"], np.int64).ravel()
                hist["instances"] = np.bincount(cls[(cls >= 0) & (cls < 256)], minlength=256)
            else:
                hist["instances"] = count_instances(codes.codes, hist["pixels"])
    return out, hist


def _predict(expert, images: list[np.ndarray], sizes: list[tuple[int, int]]) -> list[dict | Exception]:
    """Run a batch (maps at ``sizes``, the label resolution); if the batch raises, retry image by
    image so one bad image costs only itself."""
    try:
        preds = expert.predict(images, sizes)
        if len(preds) != len(images):
            raise RuntimeError(f"{type(expert).__name__}.predict returned {len(preds)} results "
                               f"for {len(images)} images")
        return list(preds)
    except Exception:
        if len(images) == 1:
            import traceback

            return [RuntimeError(traceback.format_exc(limit=3).strip().splitlines()[-1])]
        return [r for img, hw in zip(images, sizes) for r in _predict(expert, [img], [hw])]


def process_shard(src_tar: str | os.PathLike, out_root: str | os.PathLike, experts: dict,
                  cfg: WorkerConfig) -> dict:
    """Label one source shard (see module doc). Returns the stats dict also written as marker."""
    t_start = time.perf_counter()
    src, out_root = Path(src_tar), Path(out_root)
    name, stem = src.name, src.stem
    tasks = cfg.tasks
    missing = [t for t in tasks if t not in experts]
    if missing:
        raise ValueError(f"no expert for task(s) {missing}")
    marker = stats_path(out_root, stem)
    marker.unlink(missing_ok=True)  # the shard is being redone: it is not complete any more
    _remove_stale_tmp(marker.parent, marker.name)
    for t in tasks:
        _remove_stale_tmp(out_root / t, name)

    # experts shared by several tasks run once per batch
    groups: dict[int, tuple] = {}
    for t in tasks:
        groups.setdefault(id(experts[t]), (experts[t], []))[1].append(t)

    ledger = SampleLedger()
    pixels = np.zeros(256, np.int64)
    instances = np.zeros(256, np.int64)
    timing = {"experts": 0.0, "wait_decode": 0.0, "wait_encode": 0.0}
    writers = {t: AtomicTarWriter(tar_path(out_root, t, name)) for t in tasks}
    try:
        with _pool(cfg.decode_threads, "decode") as dpool, _pool(cfg.encode_threads, "encode") as epool:
            encoded: deque[tuple[int, str, cf.Future]] = deque()

            def write_ready(limit: int) -> None:
                nonlocal pixels, instances
                while encoded and (len(encoded) > limit or encoded[0][2].done()):
                    index, key, fut = encoded.popleft()
                    t0 = time.perf_counter()
                    try:
                        members, hist = fut.result()
                    except Exception as e:  # noqa: BLE001 - recorded as a skip
                        ledger.skip(index, key, "label_encode_error", f"{type(e).__name__}: {e}")
                        continue
                    finally:
                        timing["wait_encode"] += time.perf_counter() - t0
                    for t in tasks:
                        for member, data in members[t]:
                            writers[t].add(member, data)
                    if "pixels" in hist:
                        pixels += hist["pixels"]
                        instances += hist["instances"]
                    ledger.labelled(index)

            def run_batch(batch: list[tuple[int, Sample]]) -> None:
                t0 = time.perf_counter()
                images = [s.image for _, s in batch]
                sizes = [labels.label_shape(im.shape[:2], cfg.label_scale) for im in images]
                merged: list[dict | Exception] = [{} for _ in batch]
                for expert, _tasks in groups.values():
                    for i, pred in enumerate(_predict(expert, images, sizes)):
                        if isinstance(merged[i], Exception):
                            continue
                        merged[i] = pred if isinstance(pred, Exception) else {**merged[i], **pred}
                timing["experts"] += time.perf_counter() - t0
                for (index, s), maps in zip(batch, merged):
                    if isinstance(maps, Exception):
                        ledger.skip(index, s.key, "expert_error", str(maps))
                        continue
                    encoded.append((index, s.key, epool.submit(
                        encode_maps, s.key, maps, tuple(s.image.shape[:2]), tasks, cfg.label_scale, s.orientation)))

            batch: list[tuple[int, Sample]] = []
            prefetch = 2 * cfg.batch_size + cfg.decode_threads
            stream = _decoded(src, dpool, prefetch, cfg.max_pixels)
            while True:
                t0 = time.perf_counter()
                item = next(stream, None)
                timing["wait_decode"] += time.perf_counter() - t0
                if item is None:
                    break
                index, s = item
                s = ledger.read(index, s)
                if s is None:  # skipped, or damage to the shard
                    continue
                if cfg.sample_delay:
                    time.sleep(cfg.sample_delay)
                batch.append((index, s))
                if len(batch) == cfg.batch_size:
                    run_batch(batch)
                    batch = []
                    write_ready(limit=2 * cfg.batch_size)
            if batch:
                run_batch(batch)
            write_ready(limit=0)
        if ledger.ok == 0 and ledger.reasons["expert_error"]:
            raise RuntimeError(f"{src}: every image failed in the experts; first error: "
                               f"{next(s['detail'] for s in ledger.skips if s['reason'] == 'expert_error')}")
        books = ledger.stats()  # checked before any tar becomes visible
        for w in writers.values():
            w.finish()
        outputs = {}
        for t, w in writers.items():  # every tar is complete on disk before the first rename
            outputs[t] = {"path": f"{t}/{name}", **w.commit(),
                          "kinds": [k for k in labels.KINDS if f"{k}.{labels.MEMBER_EXT}" in w.suffixes]}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise

    stats = {
        "stats_version": STATS_VERSION,
        "format_version": labels.FORMAT_VERSION,
        "shard": stem,
        "source": str(src),
        "source_bytes": src.stat().st_size,
        "fingerprint": cfg.fingerprint,
        **books,
        "outputs": outputs,
        "class_pixels": pixels[:labels.NUM_SEG_CLASSES + 1].tolist(),
        "ignore_pixels": int(pixels[labels.SEG_IGNORE]),
        "class_instances": instances[:labels.NUM_SEG_CLASSES + 1].tolist(),
        "experts": {t: _describe(experts[t]) for t in tasks},
        # throughput settings that can still change the experts' float outputs in the last bits
        "run": {"batch_size": cfg.batch_size, "torch_threads": _torch_threads()},
        "seconds": round(time.perf_counter() - t_start, 3),
        "timing": {k: round(v, 3) for k, v in timing.items()},
        "worker": {"host": socket.gethostname(), "pid": os.getpid()},
    }
    write_json_atomic(marker, stats)  # last: its presence means the shard is complete
    return stats


def _torch_threads() -> int | None:
    import sys

    torch = sys.modules.get("torch")  # experts without torch leave it unimported
    return torch.get_num_threads() if torch is not None else None


def _describe(expert) -> dict:
    try:
        return expert.describe()
    except Exception as e:  # noqa: BLE001 - informative only
        return {"name": getattr(expert, "name", type(expert).__name__), "describe_error": str(e)}


def keep_freed_memory(mmap_threshold: int = 64 << 20, trim_threshold: int = 128 << 20) -> bool:
    """Let glibc keep freed blocks up to ``mmap_threshold`` bytes for reuse instead of returning them
    to the OS. In a Ray worker process every decoded image otherwise comes from a fresh mmap and
    page-faults in again (measured: 160 faults and 0.35 ms of system time per 512x512 sample, about
    a third of its JPEG decode); the plain python process adapts glibc's threshold by itself, the
    Ray worker does not. Returns False where there is no glibc (nothing to tune)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, mmap_threshold)) and bool(mallopt(m_trim_threshold, trim_threshold))


class ShardWorker:
    """Ray actor body (``pipeline.job`` wraps it with ``ray.remote``): experts load once."""

    def __init__(self, cfg: WorkerConfig):
        self.cfg = cfg
        self.malloc_tuned = keep_freed_memory()
        if cfg.cpu_affinity:
            os.sched_setaffinity(0, cfg.cpu_affinity)
        import torch

        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        device = cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.experts = build_experts(cfg.tasks, cfg.profile, device, cfg.options, cfg.factory)
        if cfg.device_codes is not None:
            for e in self.experts.values():
                if hasattr(e, "device_codes"):
                    e.device_codes = bool(cfg.device_codes)

    def info(self) -> dict:
        node = None
        try:
            import ray

            if ray.is_initialized():
                node = ray.get_runtime_context().get_node_id()
        except Exception:  # noqa: BLE001 - informative only
            pass
        return {"pid": os.getpid(), "host": socket.gethostname(), "node_id": node,
                "device": self.device, "malloc_tuned": self.malloc_tuned, "experts": {t: e.describe() for t, e in self.experts.items()}}

    def process(self, src_tar: str, out_root: str) -> dict:
        return process_shard(src_tar, out_root, self.experts, self.cfg)


def build_experts(tasks, profile: str, device: str = "cpu", options: dict | None = None,
                  factory: str = "expert_wrappers:build_experts") -> dict:
    """``factory(tasks, profile=, device=, options=) -> {task: Expert}``; the default is the
    project's expert zoo, another ``module:function`` plugs in other experts."""
    import importlib

    module, _, func = factory.partition(":")
    build = getattr(importlib.import_module(module), func or "build_experts")
    return build(list(tasks), profile=profile, device=device, options=options or None)

