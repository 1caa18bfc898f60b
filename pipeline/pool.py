"""The job's pool of Ray worker actors: Ray started or joined, actors sized to the cluster, one
shard per call to whichever actor is free, and a shard whose actor or node died redone (Ray
restarts the actor and retries the call; the driver also retries with a fresh actor, up to
``max_attempts`` per shard). Only location strings and small stats dicts go through Ray.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections import deque
from typing import TYPE_CHECKING, Callable

from pipeline import storage
from pipeline.worker import ShardWorker, WorkerConfig

if TYPE_CHECKING:
    from pipeline.plan import JobSpec


class JobError(RuntimeError):
    """The job could not finish (shards failed after all attempts, actors could not start)."""


class JobConfigError(ValueError):
    """A setting the cluster cannot satisfy (e.g. GPUs per worker on a cluster without GPUs)."""


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


def run_pool(spec: JobSpec, cfg: WorkerConfig, todo: list[str], n_done: int, n_total: int,
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
        queue: deque[str] = deque(todo)
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
                    attempts[storage.stem(src)] = attempts.get(storage.stem(src), 0) + 1
                    ref = pool.actors[i].process.remote(storage.normalize(src), spec.out)
                    inflight[ref] = (i, src)
                    if on_event:
                        on_event("shard_started", {"index": i, "shard": storage.stem(src), "actor": pool.actors[i],
                                                   "attempt": attempts[storage.stem(src)]})
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
                        results[storage.stem(src)] = stats
                        n_samples += stats["samples"]
                        bar.update(1)
                        dt = time.perf_counter() - t_pool
                        bar.set_postfix_str(f"{n_samples / max(dt, 1e-9):.1f} samples/s")
                        if on_event:
                            on_event("shard_done", {"shard": storage.stem(src), "stats": stats})
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


def _retry_or_fail(src: str, attempts: dict, errors: dict, queue: deque, spec: JobSpec,
                   e: BaseException, bar) -> None:
    msg = _root_cause(e)
    if attempts[storage.stem(src)] < spec.max_attempts:
        bar.write(f"shard {storage.stem(src)}: attempt {attempts[storage.stem(src)]} failed ({msg}); retrying",
                  file=sys.stderr)
        queue.appendleft(src)
    else:
        errors[storage.stem(src)] = msg
