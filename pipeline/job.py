"""The pseudo-label job's driver: plan, resume, a pool of Ray worker actors, progress, manifest.

The driver is deliberately thin. It

1. checks the storage (the source shards can be read, the output root written) and builds the
   experts once (missing weights fail here), before Ray starts;
2. lists the shard set's source shards and keeps those that are not complete (``pipeline.plan``:
   a marker with this job's config fingerprint, and every task tar it names with the recorded
   size and sha256);
3. starts (or joins) Ray and hands one shard per call to a pool of ``ShardWorker`` actors
   (``pipeline.pool``), redoing shards whose actor or node died;
4. when every shard is complete, writes ``<out>/_manifest.json`` and ``<out>/_manifest.parquet``
   from the markers (``pipeline.outputs``), the JSON last.

``--shards`` and ``--out`` are locations (``pipeline.storage``): local paths or URLs
(``s3://…``, ``gs://…``). Workers publish every tar whole (rename, or upload) and the marker
after them; so an interruption anywhere leaves only whole files under final names, and a rerun
redoes exactly the shards without a valid marker. Output bytes depend only on the inputs, the
config fingerprint, the batch size and the torch thread count — not on which worker, node or
attempt produced them, nor on where the output lives.
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable

from pipeline import storage
from pipeline.outputs import (MANIFEST_JSON, MANIFEST_PARQUET, build_manifest, output_lock,  # noqa: F401
                              remove_manifest, write_manifest)
from pipeline.plan import (PIPELINE_VERSION, JobSpec, check_complete, fingerprint, plan,  # noqa: F401
                           planned_label_settings, preflight, settle, worker_device)
from pipeline.pool import JobConfigError, JobError, resources, run_pool, start_ray  # noqa: F401

# the job's interface, and what its three parts define, importable from here as before the split
__all__ = ["JobSpec", "JobError", "JobConfigError", "run", "dry_run", "check_storage", "settle", "preflight",
           "planned_label_settings", "worker_device", "fingerprint", "check_complete", "plan", "PIPELINE_VERSION",
           "resources", "start_ray", "build_manifest", "write_manifest", "MANIFEST_JSON", "MANIFEST_PARQUET"]


def check_storage(spec: JobSpec, write: bool = True) -> None:
    """One ``storage.StorageError`` line, before the experts are built and before Ray starts, if
    the source shards cannot be read or (``write``) the output root cannot be written to."""
    storage.check_readable(spec.shard_set.root)
    if write:
        storage.check_writable(spec.out)


def _plan(spec: JobSpec, shards: list[str]) -> tuple[dict[str, dict], list[str], dict[str, str]]:
    cfg = spec.worker
    try:
        return plan(shards, spec.out, cfg.tasks, cfg.fingerprint, spec.verify, sizes=spec.shard_set.sizes)
    except OSError as e:  # the output root vanished or turned unreadable since the preflight
        raise storage.error("read", spec.out, e) from e


def dry_run(spec: JobSpec) -> dict:
    """What ``run(spec)`` would do, without doing it: the storage and experts' preflight (as a run
    starts: missing weights fail here), the config fingerprint, and which shards are complete and
    which would run, and why. Starts no Ray and writes nothing under ``spec.out``."""
    cfg = spec.worker
    check_storage(spec, write=False)
    experts, joined = settle(spec)
    shards = list(spec.shard_set.shards)
    with _shutdown_ray_if(joined):
        done, todo, why = _plan(spec, shards)
    return {"shards": [storage.stem(p) for p in shards], "complete": sorted(done),
            "todo": [storage.stem(p) for p in todo], "why": why, "fingerprint": cfg.fingerprint,
            "experts": experts, "device": cfg.device, "label_settings": cfg.label_settings,
            "out": storage.redact(spec.out)}


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
    """Run (or resume) the job; returns a summary dict. Raises StorageError (unreadable source,
    unwritable output) and MissingWeightsError before Ray starts, JobConfigError for
    unsatisfiable settings (or another job holding the output), JobError if shards still fail.
    ``log`` gets a few one-line progress messages (None: silent)."""
    log = log or (lambda msg: None)
    t0 = time.perf_counter()
    out, cfg = spec.out, spec.worker
    shown = storage.redact(out)
    check_storage(spec)
    experts, joined = settle(spec)
    fp = cfg.fingerprint
    log(f"experts ({cfg.profile}): " + ", ".join(f"{t}={d.get('name', '?')}" for t, d in experts.items())
        + f"; checked in {time.perf_counter() - t0:.1f} s; workers on {cfg.device}: "
        + ", ".join(f"{t} {'/'.join(f'{k}={v}' for k, v in st.items())}" for t, st in cfg.label_settings.items()))
    shards = list(spec.shard_set.shards)
    with output_lock(out), _shutdown_ray_if(joined):
        done, todo, why = _plan(spec, shards)
        log(f"plan: {len(shards)} shards, {len(done)} complete, {len(todo)} to do -> {shown}")
        if spec.verbose:
            for stem, reason in why.items():
                log(f"  {stem}: to do ({reason})")
        new: dict[str, dict] = {}
        info = {"workers": 0}
        if todo:
            remove_manifest(out)  # stale until the job completes again
            new, info = run_pool(spec, cfg, todo, len(done), len(shards), on_event, log)
        all_stats = [done.get(storage.stem(p)) or new[storage.stem(p)] for p in shards]
        manifest, rows = build_manifest(spec, all_stats, experts, fp)
        write_manifest(out, manifest, rows)
    elapsed = time.perf_counter() - t0
    n_new = sum(s["samples"] for s in new.values())
    summary = {"shards": len(shards), "processed": sorted(new), "resumed": sorted(done),
               "ok": manifest["counts"]["ok"], "skipped": manifest["counts"]["skipped"],
               "new_samples": n_new, "seconds": round(elapsed, 2),
               "pool_seconds": info.get("pool_seconds", 0.0), "workers": info["workers"],
               "out": shown, "fingerprint": fp}
    return summary
