"""Pseudo-label a shard set with the expert zoo (``make pseudolabel``).

    python -m pipeline --shards sample --profile smoke [--out data/labels/sample]
    RAY_ADDRESS=ray://head:10001 python -m pipeline --shards cc3m       # an existing cluster
    python -m pipeline --shards 's3://bucket/cc3m/{00000..00331}.tar' --out s3://bucket/labels/cc3m
    python -m pipeline --shards cc3m --dry-run     # the plan only: no Ray, nothing written

Reruns resume: only shards without a complete, checksum-verified output are processed.
Exit codes: 0 done; 1 shards failed after retries; 2 bad manifest / unreadable source or
unwritable output / missing weights / settings; 130 interrupted (rerun the same command to resume).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

from pipeline import labels


def _weights(pairs: list[str], opts: dict) -> dict:
    """``task=path`` pairs (as ``python -m expert_wrappers --weights``) -> options[task]["weights"]."""
    for p in pairs:
        task, sep, path = p.partition("=")
        if not sep or task not in labels.TASKS or not path:
            raise ValueError(f"--weights wants TASK=PATH with TASK in {list(labels.TASKS)}, got {p!r}")
        opts.setdefault(task, {})["weights"] = path
    return opts


def _precision(value: str | None, opts: dict) -> dict:
    """``--precision seg=fp32,depth=bf16`` (or one value for every task) -> options[task]["precision"]."""
    from expert_wrappers.base import PRECISIONS

    for part in (value or "").split(","):
        if not part.strip():
            continue
        task, sep, prec = part.strip().rpartition("=")
        tasks = [task] if sep else list(labels.TASKS)
        if (sep and task not in labels.TASKS) or prec not in PRECISIONS:
            raise ValueError(f"--precision wants [TASK=]P[,...] with TASK in {list(labels.TASKS)} and P in "
                             f"{list(PRECISIONS)}, got {part!r}")
        for t in tasks:
            opts.setdefault(t, {})["precision"] = prec
    return opts


def _options(pairs: list[str]) -> dict:
    """``task.key=value`` pairs -> ``{task: {key: value}}`` for the experts; values are parsed as
    JSON when they parse (numbers, true/false, null), else kept as strings."""
    opts: dict[str, dict] = {}
    for p in pairs:
        name, sep, value = p.partition("=")
        task, dot, key = name.partition(".")
        if not sep or not dot or not key or task not in labels.TASKS:
            raise ValueError(f"--expert-option wants TASK.KEY=VALUE with TASK in {list(labels.TASKS)}, got {p!r}")
        try:
            opts.setdefault(task, {})[key] = json.loads(value)
        except ValueError:
            opts.setdefault(task, {})[key] = value
    return opts


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--shards", default="sample", help="manifest name (manifests/<name>.yaml), a .yaml path, "
                    "or the shards themselves: a folder / prefix of .tar shards or a brace pattern, local or "
                    "a URL (s3://bucket/cc3m/{00000..00331}.tar)")
    ap.add_argument("--profile", default="default", help="experts profile: default | smoke | random (full-size, random weights) | null")
    ap.add_argument("--out", default=None, help="label output root, a folder or a URL such as s3://bucket/labels "
                    "(default: the manifest's output)")
    ap.add_argument("--tasks", default=",".join(labels.TASKS), help="comma-separated task trees")
    ap.add_argument("--label-scale", type=float, default=0.5,
                    help="label side / image side (recorded per member as image_size)")
    ap.add_argument("--batch-size", type=int, default=8, help="images per expert call")
    ap.add_argument("--window", type=int, default=128, help="decoded images across which each expert "
                    "gathers images of one network input shape into full batches")
    ap.add_argument("--precision", default=None, metavar="[TASK=]P,...",
                    help="expert precision: auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32 | tf32, "
                    "e.g. seg=fp32,depth=bf16 (recorded in the manifest and the resume fingerprint)")
    ap.add_argument("--concurrent-experts", action="store_true",
                    help="run each expert on its own thread (and CUDA stream) instead of in turn")
    ap.add_argument("--warm-up", action="store_true", help="each worker runs every expert once on the "
                    "input shapes of common CC3M image sizes before its first shard (pipeline.sizes)")
    ap.add_argument("--workers", type=int, default=None, help="worker actors (default: one per GPU; "
                    "CPU-only: min(#CPUs, 4))")
    ap.add_argument("--gpus-per-worker", type=float, default=None, help="fractions allowed (default 1 "
                    "with GPUs, 0 without)")
    ap.add_argument("--cpus-per-worker", type=float, default=None,
                    help="Ray logical CPUs per actor (default: 1 with GPUs; 0.5 or less CPU-only)")
    ap.add_argument("--threads-per-worker", type=int, default=0,
                    help="torch threads per worker (default: CPUs / workers; 1 per GPU worker)")
    ap.add_argument("--decode-threads", type=int, default=2, help="JPEG decode threads per worker (0: inline)")
    ap.add_argument("--encode-threads", type=int, default=2, help="label encode threads per worker (0: inline)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--device-codes", choices=("auto", "on", "off"), default="auto",
                    help="convert maps to label codes on the experts' device (auto: on for CUDA)")
    ap.add_argument("--expert-option", action="append", default=[], metavar="TASK.KEY=VALUE",
                    help="expert option, e.g. seg.score_threshold=0.4 or depth.checkpoint="
                    "Intel/dpt-hybrid-midas (see expert_wrappers.build_expert); repeatable")
    ap.add_argument("--weights", action="append", default=[], metavar="TASK=PATH",
                    help="a local checkpoint for an expert, e.g. normal=/path/scannet.pt; repeatable")
    ap.add_argument("--ray-address", default=None,
                    help="join this Ray cluster (default: $RAY_ADDRESS, else a local Ray)")
    ap.add_argument("--verify", choices=("sha256", "size"), default="sha256",
                    help="how finished shards are checked before being skipped")
    ap.add_argument("--max-attempts", type=int, default=3, help="attempts per shard")
    ap.add_argument("--dry-run", action="store_true",
                    help="check the experts and list complete shards and the ones that would run; "
                    "starts no Ray and writes nothing")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true", help="Ray worker logs and resume reasons")
    ap.add_argument("--sample-delay", type=float, default=0.0, help=argparse.SUPPRESS)  # test hook
    return ap


def _print_plan(p: dict, name: str) -> None:
    for stem in p["shards"]:
        print(f"  {stem}  " + ("complete" if stem in p["complete"] else f"would run ({p['why'][stem]})"))
    print(f"dry run {name}: {len(p['shards'])} shards, {len(p['complete'])} complete, {len(p['todo'])} "
          f"would run -> {p['out']} (config {p['fingerprint']}); Ray not started, nothing written")


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from expert_wrappers.base import MissingDependencyError, MissingWeightsError
    from pipeline import storage
    from pipeline.job import JobConfigError, JobError, JobSpec, dry_run, run
    from pipeline.manifest import ManifestError, shard_set as find_shards
    from pipeline.sizes import cc3m_like_sizes
    from pipeline.worker import WorkerConfig

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _sigterm) if in_main else None
    try:
        shard_set = find_shards(args.shards)
        out = args.out or shard_set.output
        if out is None:
            raise ValueError(f"--out is needed: {storage.redact(args.shards)} names shards, not a manifest "
                             f"with an output")
        tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
        unknown = [t for t in tasks if t not in labels.TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; known: {list(labels.TASKS)}")
        cfg = WorkerConfig(tasks=tasks, profile=args.profile, device=args.device,
                           device_codes={"auto": None, "on": True, "off": False}[args.device_codes],
                           options=_precision(args.precision, _weights(args.weights, _options(args.expert_option))),
                           label_scale=args.label_scale, window=args.window,
                           concurrent_experts=args.concurrent_experts,
                           warm_up_sizes=cc3m_like_sizes() if args.warm_up else (),
                           batch_size=args.batch_size, decode_threads=args.decode_threads,
                           encode_threads=args.encode_threads, torch_threads=args.threads_per_worker,
                           sample_delay=args.sample_delay)
        spec = JobSpec(shard_set=shard_set, out=out,
                       worker=cfg, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                       cpus_per_worker=args.cpus_per_worker, ray_address=args.ray_address,
                       verify=args.verify, max_attempts=args.max_attempts,
                       progress=not args.no_progress, verbose=args.verbose)
        if args.dry_run:
            _print_plan(dry_run(spec), shard_set.name)
            return 0
        summary = run(spec)
    except (ManifestError, storage.StorageError, MissingWeightsError, MissingDependencyError, JobConfigError,
            ValueError) as e:
        print("error: " + "; ".join(ln.strip() for ln in str(e).splitlines() if ln.strip()),
              file=sys.stderr)
        return 2
    except JobError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume (finished shards are kept)",
              file=sys.stderr)
        return 130
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    rate = summary["new_samples"] / summary["pool_seconds"] if summary["pool_seconds"] else 0.0
    print(f"pseudolabel {shard_set.name}: {summary['shards']} shards ({len(summary['processed'])} "
          f"labelled now, {len(summary['resumed'])} already complete), {summary['ok']} samples ok, "
          f"{summary['skipped']} skipped; {summary['seconds']:.1f} s"
          + (f", {rate:.2f} samples/s on {summary['workers']} worker(s)" if summary["processed"] else "")
          + f" -> {summary['out']}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    sys.exit(main())
