"""Gather probe and zero-shot runs into the paper's table layouts (markdown).

    python -m probe.table runs/probe runs/zeroshot [--out tables.md]

Every ``metrics.json`` under the given folders is read. A probe's encoder is placed in a Table 5
row by the pseudo-label tasks it was trained with (recorded from the trainer run: R1 = none /
CLIP-FT, R2 seg, R3 depth, R4 normal, R5 seg+depth, R6 seg+normal, R7 depth+normal, R8 all three =
CLIPTeX); encoders without that record (an open_clip tag, random weights) get a row named after
them. When one cell has several runs, the newest ``metrics.json`` wins.

Tables: Table 5 (PASCAL VOC mIoU, NYUv2 depth AbsRel and surface-normal a<30 with the linear and
PSPNet probes; detection is not implemented: "n/a"), Table 10 (the same on ADE20K), Table 4
(zero-shot top-1 and retrieval recall), and a list of every probe run with all three heads.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROWS = {(): "R1", ("seg",): "R2", ("depth",): "R3", ("normal",): "R4", ("seg", "depth"): "R5",
        ("seg", "normal"): "R6", ("depth", "normal"): "R7", ("seg", "depth", "normal"): "R8"}
ORDER = ("seg", "depth", "normal")


def load_runs(folders) -> list[dict]:
    runs = []
    for folder in folders:
        folder = Path(folder)
        paths = [folder] if folder.is_file() else sorted(folder.rglob("metrics.json"))
        for p in paths:
            try:
                rec = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(rec, dict) and "task" in rec and "encoder" in rec:
                rec["_path"], rec["_mtime"] = str(p), p.stat().st_mtime
                runs.append(rec)
    return runs


def row_of(encoder: dict) -> tuple[str, tuple]:
    """(row label, sort key) of an encoder."""
    tasks = encoder.get("tasks")
    if tasks is None:
        return encoder.get("name", "?"), (1, encoder.get("name", ""))
    key = tuple(t for t in ORDER if t in tasks)
    return ROWS.get(key, "+".join(key)), (0, ROWS.get(key, "R9"), encoder.get("name", ""))


def _latest(runs: list[dict]) -> dict[tuple, dict]:
    cells: dict[tuple, dict] = {}
    for r in sorted(runs, key=lambda r: r["_mtime"]):
        cells[(r["encoder"].get("source"), r.get("dataset"), r["task"], r.get("head"))] = r
    return cells


def _fmt(value, digits: int) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _encoders(runs: list[dict]) -> list[tuple[str, dict]]:
    """(row label, encoder) in table order; the label names the encoder when a row repeats."""
    seen: dict[str, dict] = {}
    for r in runs:
        seen.setdefault(r["encoder"].get("source"), r["encoder"])
    ordered = sorted(seen.values(), key=lambda e: row_of(e)[1])
    labels = [row_of(e)[0] for e in ordered]
    return [(lab if labels.count(lab) == 1 or lab == e.get("name") else f"{lab} ({e.get('name')})", e)
            for lab, e in zip(labels, ordered)]


def _marks(enc: dict) -> list[str]:
    tasks = enc.get("tasks")
    return ["?"] * 3 if tasks is None else ["✓" if t in tasks else "×" for t in ORDER]


def table5(runs: list[dict], seg_dataset: str = "voc2012", title: str = "Table 5") -> str:
    probes = [r for r in runs if r["task"] in ("seg", "depth", "normal")]
    cells = _latest(probes)
    if not probes:
        return ""

    def cell(enc, dataset, task, head, key, digits):
        r = cells.get((enc.get("source"), dataset, task, head))
        return _fmt(r["metrics"].get(key) if r else None, digits)

    lines = [f"### {title}: probes on frozen encoders (segmentation: {seg_dataset} mIoU ↑; depth: NYUv2 AbsRel ↓; "
             f"surface normal: NYUv2 a<30 ↑)", "",
             "| Row | Seg. expert | Depth expert | Normal expert | Seg. Linear | Seg. PSPNet | Det. Mask R-CNN | Det. SSD "
             "| Depth Linear | Depth PSPNet | Normal Linear | Normal PSPNet |",
             "|---|:-:|:-:|:-:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for label, enc in _encoders(probes):
        row = [label, *_marks(enc),
               cell(enc, seg_dataset, "seg", "linear", "mIoU", 2), cell(enc, seg_dataset, "seg", "pspnet", "mIoU", 2),
               "n/a", "n/a",
               cell(enc, "nyuv2", "depth", "linear", "AbsRel", 3), cell(enc, "nyuv2", "depth", "pspnet", "AbsRel", 3),
               cell(enc, "nyuv2", "normal", "linear", "a<30", 2), cell(enc, "nyuv2", "normal", "pspnet", "a<30", 2)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def table10(runs: list[dict]) -> str:
    seg = [r for r in runs if r["task"] == "seg" and r.get("dataset") == "ade20k"]
    if not seg:
        return ""
    cells = _latest(seg)
    lines = ["### Table 10: ADE20K segmentation probes (mIoU ↑)", "",
             "| Row | Seg. expert | Depth expert | Normal expert | Linear | PSPNet |", "|---|:-:|:-:|:-:|--:|--:|"]
    for label, enc in _encoders(seg):
        vals = [cells.get((enc.get("source"), "ade20k", "seg", h)) for h in ("linear", "pspnet")]
        lines.append("| " + " | ".join([label, *_marks(enc)] + [_fmt(v["metrics"]["mIoU"] if v else None, 2) for v in vals]) + " |")
    return "\n".join(lines) + "\n"


def table4(runs: list[dict]) -> str:
    zs = [r for r in runs if r["task"].startswith("zeroshot_")]
    if not zs:
        return ""
    lines = ["### Table 4: zero-shot (top-1/top-5 %, recall@k %: image→text = text retrieval, text→image = image retrieval)",
             "", "| Encoder | Dataset | Top-1 | Top-5 | I→T R@1 | R@5 | R@10 | T→I R@1 | R@5 | R@10 |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in sorted(_latest(zs).values(), key=lambda r: (row_of(r["encoder"])[1], r.get("dataset", ""), r["task"])):
        m = r["metrics"]
        keys = ["top1", "top5"] + [f"image_to_text_R@{k}" for k in (1, 5, 10)] + [f"text_to_image_R@{k}" for k in (1, 5, 10)]
        lines.append("| " + " | ".join([row_of(r["encoder"])[0], str(r.get("dataset"))] + [_fmt(m.get(k), 2) for k in keys]) + " |")
    return "\n".join(lines) + "\n"


def all_runs(runs: list[dict]) -> str:
    probes = sorted(_latest([r for r in runs if not r["task"].startswith("zeroshot_")]).values(),
                    key=lambda r: (row_of(r["encoder"])[1], r.get("dataset", ""), r["task"], r.get("head", "")))
    if not probes:
        return ""
    lines = ["### All probe runs", "", "| Encoder | Dataset | Task | Head | Metric | Value | Steps | Run |",
             "|---|---|---|---|---|--:|--:|---|"]
    for r in probes:
        digits = 3 if r["metric"] == "AbsRel" else 2
        lines.append(f"| {row_of(r['encoder'])[0]} | {r.get('dataset')} | {r['task']} | {r.get('head')} | {r['metric']} | "
                     f"{_fmt(r.get('value'), digits)} | {r.get('steps', '')} | {Path(r['_path']).parent} |")
    return "\n".join(lines) + "\n"


def render(runs: list[dict]) -> str:
    parts = [t for t in (table5(runs), table10(runs), table4(runs), all_runs(runs)) if t]
    return "\n".join(parts) if parts else "no metrics.json found\n"


def main(argv=None) -> int:
    from pipeline.storage import write_text_atomic

    p = argparse.ArgumentParser(prog="python -m probe.table", description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", help="folders searched for metrics.json (or metrics.json files)")
    p.add_argument("--out", default=None, help="also write the markdown to this file")
    args = p.parse_args(argv)
    text = render(load_runs(args.folders))
    print(text, end="")
    if args.out:
        write_text_atomic(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
