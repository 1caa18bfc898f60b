"""``make bench``: run every benchmark once, print a table, write bench/results.json.

Each benchmark reports ratios measured within one run on this machine (absolute speeds vary with
the machine; the ratios are what the goals are about). A benchmark whose module is missing or fails
is reported as such instead of hiding the others.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results.json"
SAMPLE = os.environ.get("BENCH_SAMPLE", "data/sample")
LABELS = os.environ.get("BENCH_LABELS", "data/labels/bench-smoke")

# (ids, module, goal text, how to call it)
BENCHMARKS = [
    (("P1",), "bench.p1_labels", "bytes_ratio <= 1.0, decode_speedup >= 4", lambda m: {"P1": m.run(SAMPLE)}),
    (("P3a",), "bench.p3a_experts", "wrapper_overhead_ratio <= 1.1", lambda m: {"P3a": m.run(SAMPLE)}),
    (("P2", "P3", "P6"), "bench.p2_p3_p6_job", "P2 ratio >= 0.7, P3 ratio >= 0.9, P6 speedup >= 1.7",
     lambda m: m.run(SAMPLE)),
    (("P4", "P5"), "bench.p4_p5_train", "P4 ratio >= 0.8, P5 ratio <= 1.15",
     lambda m: m.run(SAMPLE, smoke_labels(LABELS))),
]


def smoke_labels(out: str) -> str:
    """P4/P5 read the labels the pipeline writes: make them for the embedded sample with the smoke
    profile if missing."""
    import subprocess

    if not (Path(out) / "_manifest.json").exists():
        # the embedded sample by its manifest (manifests/sample.yaml points at data/sample)
        subprocess.run([sys.executable, "-m", "pipeline", "--shards", "sample", "--profile", "smoke",
                        "--out", out, "--no-progress"], check=True)
    return out


HEADLINE = {"P1": ("bytes_ratio", "decode_speedup"), "P2": ("ratio",), "P3": ("ratio",),
            "P3a": ("wrapper_overhead_ratio",), "P4": ("ratio",), "P5": ("ratio",), "P6": ("speedup",)}


def main(only: list[str] | None = None) -> int:
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() and only else {}
    for ids, module, goal, call in BENCHMARKS:
        if only and not set(ids) & set(only):
            continue
        t0 = time.perf_counter()
        try:
            out = call(importlib.import_module(module))
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            out = {i: {"error": f"{module} not implemented"} for i in ids}
        except Exception as e:  # one broken benchmark must not hide the others
            traceback.print_exc()
            out = {i: {"error": f"{type(e).__name__}: {e}"} for i in ids}
        for i in ids:
            out.get(i, {}).setdefault("goal", goal)
            out.get(i, {})["seconds"] = round(time.perf_counter() - t0, 1)
        results.update(out)
    RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"{'id':5} {'metric':24} {'value':>10}  goal")
    for bid in sorted(results):
        r = results[bid]
        for metric in HEADLINE.get(bid, ()):
            value = r.get(metric)
            shown = f"{value:10.3f}" if isinstance(value, (int, float)) else f"{r.get('error', '-')!s:>10}"
            print(f"{bid:5} {metric:24} {shown}  {r.get('goal', '')}")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or None))
