"""One shard in, one tar per task tree out — the pseudo-label worker.

``process_shard`` is plain Python (no Ray) and runs a shard through five stages, each a small
generator or class below, so that the flow reads top to bottom::

    read/decode  ->  bucket  ->  experts  ->  encode  ->  write
    _read            _Lane        _Lane        _encode      _write / _ShardOutput
    (decode pool)    (per expert: batches of equal network input shape across a window of the
                      shard; run inline or on the expert's own thread)    (encode pool)

1. **read/decode**: the source tar is walked in order and JPEGs decode on a thread pool, a few
   samples ahead; undecodable samples become recorded skips.
2. **bucket**: each expert groups the decoded images by its ``batch_key`` (its network input
   shape) into batches of ``batch_size``; a batch runs when full, or, partial, when its oldest
   image has waited ``window`` images (and at the end of the shard). Forwards thus run on full
   batches of one shape, and each image keeps its exact input shape, so its labels are those of
   predicting it alone.
3. **experts**: ``predict`` on a batch (maps at the label resolution, label codes when the expert
   converts on its device). A batch that raises is retried image by image.
4. **encode**: once every expert has an image's maps, the encode pool packs them (in source order).
5. **write**: members are appended, in source order, to a local temporary tar per task tree
   (``_ShardOutput``; ``pipeline.storage.AtomicTarWriter``); once every tar is complete each is
   published — renamed into place on a filesystem, uploaded on an object store — and the shard's
   stats marker is written last::

    <out>/seg/<shard>.tar  <out>/depth/<shard>.tar  <out>/normal/<shard>.tar   (whole or absent)
    <out>/_stats/<shard>.json                                                   (written last)

``<out>`` and the source shard are locations (``pipeline.storage``): local paths or URLs. A source
shard on a bucket is streamed; the tars of a bucket output are spooled in the scratch folder.

Members keep the source keys in source order. A sample that cannot be labelled (undecodable
image, expert or encoder failure) gets no member in any tree; it is listed in the marker's
``skips`` with its source index, key and reason. The marker's books (``pipeline.shards.SampleLedger``)
count samples, not members: samples = ok + skipped for every shard. A shard is *complete* when its marker exists and
the tars it names have the recorded sha256 (``pipeline.plan`` checks that before skipping it).

``ShardWorker`` is the thin Ray actor around it: it loads the experts once and processes one
shard per call.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import os
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from pipeline import labels, storage
from pipeline.shards import DEFAULT_MAX_PIXELS, Sample, SampleLedger, Skip, decode_record, iter_records

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
    batch_size: int = 8           # images per expert call (a bucket's size)
    window: int = 128             # decoded images a partial bucket may wait for more of its shape
    concurrent_experts: bool = False  # each expert on its own thread (and, on CUDA, stream)
    queued_batches: int = 1       # batches a lane keeps queued on the device while the host finishes
    #                               an earlier one (experts with predict_deferred, inline lanes); 0: none
    warm_up_sizes: tuple = ()     # image sizes whose input shapes each expert runs once at start
    decode_threads: int = 2       # 0: decode in the worker's own thread (one-core workers)
    encode_threads: int = 2       # 0: encode in the worker's own thread
    torch_threads: int = 0        # 0: leave torch's default
    cpu_affinity: tuple[int, ...] | None = None  # pin the worker process (benchmarks)
    max_pixels: int = DEFAULT_MAX_PIXELS
    fingerprint: str = ""         # the job's config fingerprint, written into every marker
    label_settings: dict = field(default_factory=dict)  # {task: expert.label_settings()} the
    #                               fingerprint assumed; a worker whose experts differ refuses to start
    sample_delay: float = 0.0     # seconds slept per sample: a test hook to kill a worker mid-shard

    def __post_init__(self):
        self.tasks = tuple(t for t in labels.TASKS if t in set(self.tasks)) + \
            tuple(sorted(set(self.tasks) - set(labels.TASKS)))
        if not self.tasks:
            raise ValueError("no tasks")
        labels.label_shape((1, 1), self.label_scale)  # validates the scale
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.window < 1:
            raise ValueError("window must be >= 1")
        if self.queued_batches < 0:
            raise ValueError("queued_batches must be >= 0 (0: each batch finished before the next is queued)")
        if self.decode_threads < 0 or self.encode_threads < 0:
            raise ValueError("decode_threads and encode_threads must be >= 0 (0: inline)")


def stats_path(out_root: str | os.PathLike, shard_stem: str) -> str:
    """The location of a shard's completion marker."""
    return storage.join(out_root, STATS_DIR, f"{shard_stem}.json")


def tar_path(out_root: str | os.PathLike, task: str, shard_name: str) -> str:
    """The location of a shard's label tar for one task tree."""
    return storage.join(out_root, task, shard_name)


class _ShardOutput:
    """One local temporary tar per task tree; ``commit`` publishes them all once every one is
    complete. The storage side of the worker: nothing else touches the output files."""

    def __init__(self, out_root: str, shard_name: str, tasks: tuple[str, ...]):
        self.name = shard_name
        self.writers = {t: storage.AtomicTarWriter(tar_path(out_root, t, shard_name)) for t in tasks}

    def add(self, members: dict[str, list]) -> None:
        for t, w in self.writers.items():
            for member, data in members[t]:
                w.add(member, data)

    def commit(self) -> dict:
        for w in self.writers.values():
            w.finish()
        # every tar is complete locally before the first one is published
        return {t: {"path": f"{t}/{self.name}", **w.commit(),
                    "kinds": [k for k in labels.KINDS if f"{k}.{labels.MEMBER_EXT}" in w.suffixes]}
                for t, w in self.writers.items()}

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()


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


class _Tally:
    """What a shard's marker counts: the per-sample books (``SampleLedger``), seg histograms and
    stage timings."""

    def __init__(self) -> None:
        self.books = SampleLedger()
        self.pixels = np.zeros(256, np.int64)
        self.instances = np.zeros(256, np.int64)
        self.timing = {"experts": 0.0, "wait_decode": 0.0, "wait_experts": 0.0, "wait_encode": 0.0}

    def skip(self, index: int, key: str, reason: str, detail: str = "") -> None:
        self.books.skip(index, key, reason, detail)

    def written(self, index: int, hist: dict) -> None:
        self.books.labelled(index)
        if "pixels" in hist:
            self.pixels += hist["pixels"]
            self.instances += hist["instances"]


def _read(source, pool: cf.Executor, cfg: WorkerConfig, tally: _Tally) -> Iterator[tuple[int, Sample]]:
    """Stage 1: (source index, Sample) in source order from the source shard's stream; up to
    ``2 batch + decode_threads`` records decode ahead on the pool. Skips are tallied, not yielded."""
    prefetch = 2 * cfg.batch_size + cfg.decode_threads
    pending: deque[tuple[int, cf.Future]] = deque()

    def ready(limit: int) -> Iterator[tuple[int, Sample]]:
        while len(pending) > limit:
            index, fut = pending.popleft()
            t0 = time.perf_counter()
            item = tally.books.read(index, fut.result())
            tally.timing["wait_decode"] += time.perf_counter() - t0
            if item is None:  # skipped, or damage to the shard
                continue
            if cfg.sample_delay:
                time.sleep(cfg.sample_delay)
            yield index, item

    for index, record in enumerate(iter_records(source)):
        if isinstance(record, Skip):
            fut: cf.Future = cf.Future()
            fut.set_result(record)
        else:
            fut = pool.submit(decode_record, record, cfg.max_pixels)
        pending.append((index, fut))
        yield from ready(prefetch)
    yield from ready(0)


@dataclass(eq=False)
class _Item:
    """A decoded sample on its way through the experts: ``results`` gets, per lane, the future of
    the batch it ran in and its position there."""
    seq: int
    index: int
    sample: Sample
    label_hw: tuple[int, int]
    results: dict = field(default_factory=dict)

    def done(self, lanes) -> bool:
        return len(self.results) == len(lanes) and all(f.done() for f, _ in self.results.values())

    def maps(self, lanes) -> dict | Exception:
        merged: dict = {}
        for lane in lanes:  # task order; an image that failed in one expert fails
            fut, j = self.results[lane]
            pred = fut.result()[j]
            if isinstance(pred, Exception):
                return pred
            merged.update(pred)
        return merged


class _Deferred:
    """The result of a batch whose device work is queued: ``result()`` finishes it (once)."""

    def __init__(self, finish):
        self._finish, self._value = finish, None

    def done(self) -> bool:
        return self._finish is None

    def result(self):
        if self._finish is not None:
            self._value, self._finish = self._finish(), None
        return self._value


class _Lane:
    """Stages 2 and 3 for one expert (shared by the tasks it serves): buckets of equal
    ``batch_key`` (experts without one: a single bucket, source order), each run as one
    ``predict`` call on the lane's executor — inline, or the expert's own thread.

    Inline, with an expert that has ``predict_deferred`` (the torch experts), a lane keeps
    ``queued`` batches in flight: it queues a batch's device work, then finishes the oldest
    batch beyond that many (waits for its codes, builds the host objects). The host's part of
    one batch thus overlaps the device's part of the next one(s), and of the other experts'
    batches queued behind them, instead of leaving the GPU idle at every hand-over. One is
    enough: 2 or 3 measured no faster on an H100 (bench G1/G2 variants, run 8)."""

    def __init__(self, expert, size: int, executor: cf.Executor, queued: int = 1):
        self.expert, self.size, self.executor = expert, size, executor
        self.key = getattr(expert, "batch_key", None)
        self.buckets: dict = {}
        self.seconds = 0.0  # inside predict; with concurrent lanes these overlap in wall time
        self.queued = queued if isinstance(executor, _Inline) and hasattr(expert, "predict_deferred") else 0
        self.in_flight: deque[_Deferred] = deque()

    def add(self, item: _Item) -> None:
        key = self.key(tuple(item.sample.image.shape[:2])) if self.key else None
        bucket = self.buckets.setdefault(key, [])
        bucket.append(item)
        if len(bucket) >= self.size:
            self._run(self.buckets.pop(key))

    def flush(self, oldest: int | None = None) -> None:
        """Run every bucket whose first image has ``seq <= oldest`` (all when None), oldest first."""
        keys = [k for k, b in self.buckets.items() if oldest is None or b[0].seq <= oldest]
        for k in sorted(keys, key=lambda k: self.buckets[k][0].seq):
            self._run(self.buckets.pop(k))

    def _run(self, items: list[_Item]) -> None:
        images, sizes = [it.sample.image for it in items], [it.label_hw for it in items]
        if self.queued:
            fut = _Deferred(self._launch(images, sizes))
            self.in_flight.append(fut)
            while len(self.in_flight) > self.queued:
                self.in_flight.popleft().result()
        else:
            fut = self.executor.submit(self._predict, images, sizes)
        for j, it in enumerate(items):
            it.results[self] = (fut, j)

    def _launch(self, images, sizes):
        """Queue one batch; returns the function that finishes it. A batch that raises, when
        queued or when finished, is redone by ``_predict`` (image by image if it still fails)."""
        t0 = time.perf_counter()
        try:
            finish = self.expert.predict_deferred(images, sizes)
        except Exception:  # noqa: BLE001 - redone synchronously, each failure recorded per image
            preds = _predict(self.expert, images, sizes)
            return lambda: preds
        finally:
            self.seconds += time.perf_counter() - t0

        def done() -> list[dict | Exception]:
            t1 = time.perf_counter()
            try:
                return _one_per_image(self.expert, finish(), images)
            except Exception:  # noqa: BLE001 - as above
                return _predict(self.expert, images, sizes)
            finally:
                self.seconds += time.perf_counter() - t1
        return done

    def _predict(self, images, sizes) -> list[dict | Exception]:
        t0 = time.perf_counter()
        try:
            return _predict(self.expert, images, sizes)
        finally:
            self.seconds += time.perf_counter() - t0


def _lane_thread_init(expert) -> None:
    """A concurrent lane's thread issues its expert's kernels on a stream of its own (the current
    stream is per thread), so two experts' kernels can overlap on the GPU."""
    device = getattr(expert, "device", None)
    if getattr(device, "type", None) == "cuda":
        import torch

        torch.cuda.set_stream(torch.cuda.Stream(device))


@contextlib.contextmanager
def _lanes(experts: dict, cfg: WorkerConfig):
    """One lane per distinct expert object, in task order (an expert serving several tasks runs
    once per batch)."""
    unique: dict[int, object] = {}
    for t in cfg.tasks:
        unique.setdefault(id(experts[t]), experts[t])
    if cfg.concurrent_experts:
        modes = {getattr(e, "precision", None) for e in unique.values() if getattr(e, "on_cuda", False)}
        if {"fp32", "tf32"} <= modes:
            raise ValueError("concurrent_experts: experts at fp32 and at tf32 cannot run at the same time "
                             "(TF32 is a process-wide switch); use one of them for both, or run experts in turn")
        executors = [cf.ThreadPoolExecutor(1, thread_name_prefix=f"expert-{getattr(e, 'task', i)}",
                                           initializer=_lane_thread_init, initargs=(e,))
                     for i, e in enumerate(unique.values())]
    else:
        executors = [_Inline() for _ in unique]
    lanes = [_Lane(e, cfg.batch_size, x, cfg.queued_batches) for e, x in zip(unique.values(), executors)]
    try:
        yield lanes
    finally:
        for x in executors:
            x.shutdown(wait=True)


def _label(samples: Iterator[tuple[int, Sample]], lanes: list[_Lane], cfg: WorkerConfig, tally: _Tally
           ) -> Iterator[tuple[int, Sample, dict | Exception]]:
    """Stages 2-3: every sample into every lane's buckets; yields (index, sample, maps or the
    expert's exception) in source order as soon as every lane has the sample's result. A bucket
    whose oldest image is ``window`` images old runs partial, so at most ``window + 1`` decoded
    images wait here."""
    waiting: deque[_Item] = deque()

    def ready(limit: int):
        while waiting and (len(waiting) > limit or waiting[0].done(lanes)):
            item = waiting.popleft()
            t0 = time.perf_counter()
            maps = item.maps(lanes)  # blocks on the lanes' futures (concurrent lanes)
            tally.timing["wait_experts"] += time.perf_counter() - t0
            yield item.index, item.sample, maps

    for seq, (index, sample) in enumerate(samples):
        item = _Item(seq, index, sample, labels.label_shape(sample.image.shape[:2], cfg.label_scale))
        waiting.append(item)
        for lane in lanes:
            lane.add(item)
        if waiting[0].seq <= seq - cfg.window:
            for lane in lanes:
                lane.flush(oldest=seq - cfg.window)
        yield from ready(cfg.window)
    for lane in lanes:
        lane.flush()
    yield from ready(0)


def _encode(labelled, pool: cf.Executor, cfg: WorkerConfig, tally: _Tally
            ) -> Iterator[tuple[int, str, tuple[dict, dict] | Exception]]:
    """Stage 4: maps -> label members on the encode pool; (index, key, (members, hist) or the
    encoder's exception) in source order, up to ``2 batch`` samples encoding ahead."""
    pending: deque[tuple[int, str, cf.Future]] = deque()

    def ready(limit: int):
        while pending and (len(pending) > limit or pending[0][2].done()):
            index, key, fut = pending.popleft()
            t0 = time.perf_counter()
            try:
                result = fut.result()
            except Exception as e:  # noqa: BLE001 - recorded as a skip
                result = e
            tally.timing["wait_encode"] += time.perf_counter() - t0
            yield index, key, result

    for index, sample, maps in labelled:
        if isinstance(maps, Exception):
            tally.skip(index, sample.key, "expert_error", str(maps))
            continue
        pending.append((index, sample.key, pool.submit(
            encode_maps, sample.key, maps, tuple(sample.image.shape[:2]), cfg.tasks, cfg.label_scale,
            sample.orientation)))
        yield from ready(2 * cfg.batch_size)
    yield from ready(0)


def _write(encoded, output: _ShardOutput, tally: _Tally) -> None:
    """Stage 5: members appended in source order; the seg histograms tallied."""
    for index, key, result in encoded:
        if isinstance(result, Exception):
            tally.skip(index, key, "label_encode_error", f"{type(result).__name__}: {result}")
            continue
        members, hist = result
        output.add(members)
        tally.written(index, hist)


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


def _one_per_image(expert, preds, images: list) -> list:
    """An expert's results as a list, refused unless there is one per image."""
    if len(preds) != len(images):
        raise RuntimeError(f"{type(expert).__name__}.predict returned {len(preds)} results for {len(images)} images")
    return list(preds)


def _predict(expert, images: list[np.ndarray], sizes: list[tuple[int, int]]) -> list[dict | Exception]:
    """Run a batch (maps at ``sizes``, the label resolution); if the batch raises, retry image by
    image so one bad image costs only itself."""
    try:
        return _one_per_image(expert, expert.predict(images, sizes), images)
    except Exception:
        if len(images) == 1:
            import traceback

            return [RuntimeError(traceback.format_exc(limit=3).strip().splitlines()[-1])]
        return [r for img, hw in zip(images, sizes) for r in _predict(expert, [img], [hw])]


def process_shard(src_tar: str | os.PathLike, out_root: str | os.PathLike, experts: dict,
                  cfg: WorkerConfig) -> dict:
    """Label one source shard (see module doc). Returns the stats dict also written as marker."""
    t_start = time.perf_counter()
    src, out_root = storage.normalize(src_tar), storage.normalize(out_root)
    name, stem = storage.basename(src), storage.stem(src)
    missing = [t for t in cfg.tasks if t not in experts]
    if missing:
        raise ValueError(f"no expert for task(s) {missing}")
    marker = stats_path(out_root, stem)
    storage.remove(marker)  # the shard is being redone: it is not complete any more
    storage.remove_stale_tmp(marker)
    for t in cfg.tasks:
        storage.remove_stale_tmp(tar_path(out_root, t, name))

    tally = _Tally()
    output = _ShardOutput(out_root, name, cfg.tasks)
    try:
        with storage.open_read(src) as source, _pool(cfg.decode_threads, "decode") as dpool, \
                _pool(cfg.encode_threads, "encode") as epool, _lanes(experts, cfg) as lanes:
            source_bytes = _size_of(source, src)
            samples = _read(source, dpool, cfg, tally)
            labelled = _label(samples, lanes, cfg, tally)
            _write(_encode(labelled, epool, cfg, tally), output, tally)
        tally.timing["experts"] = sum(lane.seconds for lane in lanes)
        expert_errors = [s for s in tally.books.skips if s["reason"] == "expert_error"]
        if tally.books.ok == 0 and expert_errors:
            raise RuntimeError(f"{storage.redact(src)}: every image failed in the experts; first error: "
                               f"{min(expert_errors, key=lambda s: s['index'])['detail']}")
        books = tally.books.stats()  # checked before any tar becomes visible
        outputs = output.commit()
    except BaseException:
        output.abort()
        raise
    stats = _stats(src, source_bytes, cfg, experts, tally, books, outputs, time.perf_counter() - t_start)
    storage.write_json_atomic(marker, stats)  # last: its presence means the shard is complete
    return stats


def _size_of(stream, location: str) -> int:
    """Bytes of the source shard as opened (an object store's file knows its size; a local file
    is asked through its descriptor, so a shard replaced meanwhile cannot be mismeasured)."""
    known = getattr(stream, "size", None)
    if isinstance(known, int):
        return known
    if hasattr(stream, "fileno"):
        return os.fstat(stream.fileno()).st_size
    return storage.size(location)


def _stats(src: str, source_bytes: int, cfg: WorkerConfig, experts: dict, tally: _Tally, books: dict,
           outputs: dict, seconds: float) -> dict:
    return {
        "stats_version": STATS_VERSION,
        "format_version": labels.FORMAT_VERSION,
        "shard": storage.stem(src),
        "source": storage.redact(src),
        "source_bytes": source_bytes,
        "fingerprint": cfg.fingerprint,
        **books,
        "outputs": outputs,
        "class_pixels": tally.pixels[:labels.NUM_SEG_CLASSES + 1].tolist(),
        "ignore_pixels": int(tally.pixels[labels.SEG_IGNORE]),
        "class_instances": tally.instances[:labels.NUM_SEG_CLASSES + 1].tolist(),
        "experts": {t: _describe(experts[t]) for t in cfg.tasks},
        "label_settings": {t: label_settings(experts[t]) for t in cfg.tasks},
        # throughput settings that can still change the experts' float outputs in the last bits
        "run": {"batch_size": cfg.batch_size, "torch_threads": _torch_threads()},
        "seconds": round(seconds, 3),
        "timing": {k: round(v, 3) for k, v in tally.timing.items()},
        "worker": {"host": socket.gethostname(), "pid": os.getpid()},
    }


def label_settings(expert, device_type: str | None = None) -> dict:
    """``expert.label_settings(device_type)`` where the expert has it (torch experts: precision and
    device codes); otherwise what its description says about device codes."""
    fn = getattr(expert, "label_settings", None)
    if fn is not None:
        return fn(device_type) if device_type is not None else fn()
    d = _describe(expert)
    return {"device_codes": d["device_codes"]} if "device_codes" in d else {}


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
    """Ray actor body (``pipeline.pool`` wraps it with ``ray.remote``): experts load once."""

    def __init__(self, cfg: WorkerConfig):
        self.cfg = cfg
        self.malloc_tuned = keep_freed_memory()
        storage.remove_dead_spools()  # tars a killed worker on this node was spooling for a bucket
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
        apply_device_codes(self.experts, cfg.device_codes)
        actual = {t: label_settings(e) for t, e in self.experts.items()}
        if cfg.label_settings and actual != cfg.label_settings:
            # the job's fingerprint (and so its resume decisions) assumed other settings
            raise RuntimeError(f"the worker's experts on {device} label with {actual}, but the job planned "
                               f"for {cfg.label_settings}: pass --device explicitly")
        self.warm_up = {t: e.warm_up(cfg.warm_up_sizes) for t, e in self.experts.items()
                        if cfg.warm_up_sizes and hasattr(e, "warm_up")}

    def info(self) -> dict:
        node = None
        try:
            import ray

            if ray.is_initialized():
                node = ray.get_runtime_context().get_node_id()
        except Exception:  # noqa: BLE001 - informative only
            pass
        return {"pid": os.getpid(), "host": socket.gethostname(), "node_id": node,
                "device": self.device, "malloc_tuned": self.malloc_tuned, "warm_up": self.warm_up,
                "experts": {t: e.describe() for t, e in self.experts.items()}}

    def process(self, src_tar: str, out_root: str) -> dict:
        return process_shard(src_tar, out_root, self.experts, self.cfg)


def apply_device_codes(experts: dict, device_codes: bool | None) -> None:
    """The job's ``--device-codes on|off`` over every expert that has the switch (None: defaults)."""
    if device_codes is None:
        return
    for e in experts.values():
        if hasattr(e, "device_codes"):
            e.device_codes = bool(device_codes)


def build_experts(tasks, profile: str, device: str = "cpu", options: dict | None = None,
                  factory: str = "expert_wrappers:build_experts") -> dict:
    """``factory(tasks, profile=, device=, options=) -> {task: Expert}``; the default is the
    project's expert zoo, another ``module:function`` plugs in other experts."""
    import importlib

    module, _, func = factory.partition(":")
    build = getattr(importlib.import_module(module), func or "build_experts")
    return build(list(tasks), profile=profile, device=device, options=options or None)

