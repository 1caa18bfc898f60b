"""The job's outputs beyond the shards: the manifest (``_manifest.json`` and
``_manifest.parquet``, built from the markers, JSON last: its presence means the job finished)
and the lock that keeps two jobs from writing into one output root.
"""
from __future__ import annotations

import contextlib
from collections import Counter

from pipeline import labels, storage
from pipeline.coco import class_name
from pipeline.plan import PIPELINE_VERSION, JobSpec, expert_checkpoints
from pipeline.pool import JobConfigError
from pipeline.worker import STATS_VERSION

MANIFEST_JSON = "_manifest.json"
MANIFEST_PARQUET = "_manifest.parquet"
LOCK = ".lock"


@contextlib.contextmanager
def output_lock(out: str):
    """One job at a time per output root (``storage.exclusive`` on ``<out>/.lock``: ``flock`` on a
    filesystem, a conditionally created lock object on a bucket)."""
    try:
        with storage.exclusive(storage.join(out, LOCK), {"job": "pseudolabel"}):
            yield
    except storage.LockHeld as e:
        raise JobConfigError(f"another pseudo-label job is writing to {storage.redact(out)} ({e})") from None


def remove_manifest(out: str) -> None:
    """The manifest is stale once shards are to be redone; JSON first (it marks completion)."""
    for name in (MANIFEST_JSON, MANIFEST_PARQUET):
        storage.remove(storage.join(out, name))


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
        "shard_set": {"name": spec.shard_set.name, "root": storage.redact(spec.shard_set.root),
                      "shards": [storage.basename(p) for p in spec.shard_set.shards],
                      "expected_samples": spec.shard_set.expected_samples},
        "tasks": list(cfg.tasks),
        # the kinds each tree holds: every labelled sample of a tree has exactly these members
        "kinds": {t: [k for k in labels.KINDS if any(k in s["outputs"][t]["kinds"] for s in stats)]
                  for t in cfg.tasks},
        "experts": by_workers,
        "experts_differ_in_shards": differ,
        "checkpoints": expert_checkpoints(by_workers),
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
        row = {"shard": s["shard"], "source": storage.basename(s["source"]), "samples": s["samples"],
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


def write_manifest(out: str, manifest: dict, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    storage.write_bytes_atomic(storage.join(out, MANIFEST_PARQUET), buf.getvalue().to_pybytes())
    # last: its presence means the job finished
    storage.write_json_atomic(storage.join(out, MANIFEST_JSON), manifest)
