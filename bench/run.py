"""``make bench``: run every benchmark once, print a table, write bench/results.json.

    python -m bench.run [P1 P2 ...]                 # CPU benchmarks P1-P6 (all by default)
    python -m bench.run --device cuda [G1 G2 G3 G4]  # GPU benchmarks (make bench-gpu); no Ray needed
    python -m bench.run --device cpu G1 G2 G4       # the same code path with smoke experts (a check)
    python -m bench.run --device cuda --profile default G4  # G4 with the real checkpoints

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

RESULTS = Path(os.environ.get("BENCH_RESULTS") or Path(__file__).resolve().parent / "results.json")
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
            "P3a": ("wrapper_overhead_ratio",), "P4": ("ratio",), "P5": ("ratio",), "P6": ("speedup",),
            "G1": ("ratio",), "G2": ("ratio", "samples_per_s"), "G3": ("ratio",),
            "G4": ("seg_pixel_agreement", "depth_mean_rel_err", "normal_median_deg", "normal_p99_deg")}
G_IDS = ("G1", "G2", "G3", "G4")


def _save(results: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True, default=str) + "\n")


def gpu_benchmarks(device: str, only: list[str] | None, profile: str | None = None) -> dict:
    """G1, G2, G4 from bench.g_gpu; G3 (the trainer step on the GPU) from bench.g3_train when that
    module exists. Partial results are saved as each part finishes (a run cut short keeps them)."""
    ids = [i for i in G_IDS if not only or i in only]
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for i in ids:
        results.pop(i, None)
    g = [i for i in ids if i != "G3"]
    if g:
        t0 = time.perf_counter()
        try:
            from bench import g_gpu

            out = g_gpu.run(device, tuple(g), SAMPLE, save=lambda r: _save({**results, **r}),
                            profile_path=os.environ.get("BENCH_PROFILE"), profile=profile)
        except Exception as e:  # noqa: BLE001 - reported in the table, G3 still runs
            traceback.print_exc()
            out = {i: {"error": f"{type(e).__name__}: {e}"} for i in g}
        for i in g:
            out.setdefault(i, {"error": "not produced"})["seconds"] = round(time.perf_counter() - t0, 1)
        results.update(out)
        _save(results)
    if "G3" in ids:
        t0 = time.perf_counter()
        try:
            g3 = importlib.import_module("bench.g3_train")
        except ModuleNotFoundError as e:
            if e.name != "bench.g3_train":
                raise
            results["G3"] = {"error": "not implemented (bench/g3_train.py with run(device) -> dict)"}
        else:
            try:
                import inspect

                # off a GPU the trainer step runs its small twin (a check of the code path)
                kw = {"quick": True} if not device.startswith("cuda") and "quick" in inspect.signature(g3.run).parameters else {}
                results["G3"] = g3.run(device, **kw)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                results["G3"] = {"error": f"{type(e).__name__}: {e}"}
        results["G3"]["seconds"] = round(time.perf_counter() - t0, 1)
        _save(results)
    return {i: results[i] for i in ids}


def main(only: list[str] | None = None, device: str | None = None, profile: str | None = None) -> int:
    if device is not None:
        _table(gpu_benchmarks(device, only, profile))
        return 0
    # the GPU figures (G*) were measured elsewhere: a CPU run replaces only what it reruns
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
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
    _save(results)
    _table(results)
    return 0


def _table(results: dict) -> None:
    print(f"{'id':5} {'metric':24} {'value':>10}  goal")
    for bid in sorted(results):
        r = results[bid]
        for metric in HEADLINE.get(bid, ()):
            value = r.get(metric)
            shown = f"{value:10.3f}" if isinstance(value, (int, float)) else f"{r.get('error', '-')!s:>10}"
            print(f"{bid:5} {metric:24} {shown}  {r.get('goal', '')}")
        if r.get("gpu_name") or r.get("env", {}).get("gpu_name"):
            print(f"{'':5} {'on':24} {r.get('gpu_name') or r['env']['gpu_name']}")
        if bid == "G1" and "per_expert" in r:
            for t, p in r["per_expert"].items():
                print(f"{'':5} {t + ' ratio':24} {p['ratio']:10.3f}  wrapper {p['wrapper_samples_per_s']}/s, "
                      f"bare {p['bare_samples_per_s']}/s; first use {p['first_use']['s_per_new_shape']} s/shape")
        if bid == "G2":
            for name, v in r.get("variants", {}).items():
                shown = f"{v['samples_per_s']:10.3f}" if "samples_per_s" in v else f"{v.get('skipped') or v.get('error')!s:>10}"
                print(f"{'':5} {name[:24]:24} {shown}  samples/s on one shard")
        if bid == "G4" and "recommended_cli" in r:
            print(f"{'':5} {'recommended':24} {r['recommended_cli']}")
    print(f"wrote {RESULTS}")


def _args(argv: list[str]) -> tuple[list[str] | None, str | None, str | None]:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cuda | cpu: the GPU benchmarks G1-G4 on that device")
    ap.add_argument("--profile", default=None,
                    help="experts for G1, G2, G4: random (default on CUDA: the default architectures, seeded "
                         "random weights) | default (the real checkpoints, where they are available) | smoke")
    ap.add_argument("ids", nargs="*", help="benchmark ids (default: all of the chosen kind)")
    a = ap.parse_args(argv)
    return a.ids or None, a.device, a.profile


if __name__ == "__main__":
    only, device, profile = _args(sys.argv[1:])
    sys.exit(main(only, device, profile))
