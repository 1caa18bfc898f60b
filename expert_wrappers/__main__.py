"""Check which experts resolve on this machine.

    python -m expert_wrappers --profile default --tasks seg,depth,normal \
        [--device cpu] [--weights normal=/path/scannet.pt] [--set seg.sam=true] [--predict img.jpg]

Prints each expert's description (name, checkpoints with sha256) as JSON. Exit code 2, with the
message on stderr, when weights or an optional backend are missing.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from . import PROFILES, TASKS, build_experts
from .base import MissingDependencyError, MissingWeightsError


def _parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_options(weights: list[str], sets: list[str]) -> dict[str, dict]:
    opts: dict[str, dict] = {}
    for item in weights:
        task, sep, path = item.partition("=")
        if not sep or task not in TASKS:
            raise SystemExit(f"--weights expects task=path with task in {TASKS}, got {item!r}")
        opts.setdefault(task, {})["weights"] = path
    for item in sets:
        key, sep, value = item.partition("=")
        task, dot, name = key.partition(".")
        if not sep or not dot or task not in TASKS:
            raise SystemExit(f"--set expects task.option=value, got {item!r}")
        opts.setdefault(task, {})[name] = _parse_value(value)
    return opts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m expert_wrappers", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="default", choices=PROFILES)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--weights", action="append", default=[], metavar="TASK=PATH")
    ap.add_argument("--set", action="append", default=[], metavar="TASK.OPTION=VALUE",
                    help="any build_expert option; VALUE is parsed as JSON when it can be")
    ap.add_argument("--predict", metavar="IMAGE", help="also run every expert on this image")
    args = ap.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        ap.error(f"unknown tasks {bad}; known: {TASKS}")
    options = parse_options(args.weights, args.set)
    options = {t: o for t, o in options.items() if t in tasks}
    t0 = time.perf_counter()
    try:
        experts = build_experts(tasks, args.profile, args.device, options)
    except (MissingWeightsError, MissingDependencyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = {"profile": args.profile, "build_seconds": round(time.perf_counter() - t0, 2),
              "experts": {t: e.describe() for t, e in experts.items()}}
    if args.predict:
        import numpy as np
        from PIL import Image

        img = np.asarray(Image.open(args.predict).convert("RGB"))
        for t, e in experts.items():
            t1 = time.perf_counter()
            maps = e.predict([img])[0]
            report["experts"][t]["predict"] = {
                "seconds": round(time.perf_counter() - t1, 3),
                "maps": {k: {"shape": list(v.shape), "dtype": str(v.dtype), "min": float(v.min()),
                             "max": float(v.max())} for k, v in maps.items()}}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
