"""Label trees -> 4M-style PNG files, for tools that only read images.

    python -m pipeline.export --format png [--labels data/labels/sample | --shards sample] OUT

writes ``OUT/<kind>/<shard>/<key>.png`` for every label member:

- ``seg``: palette PNG, pixel value = class id (0 background, 1..80, 255 ignore), ``make preview``'s
  colours;
- ``depth``, ``seg_conf``, ``normal_conf``: 16-bit greyscale PNG of the stored codes q, value =
  lo + q * (hi - lo) / 65535 as in the label format (lossless against the label shards);
- ``normal``: RGB PNG, channel = round((n + 1) * 127.5), the 4M convention (lossy: 8 bits per axis).

Each PNG carries the member's header (kind, shape, image_size, orientation, lo/hi) as JSON in a
``cliptex`` text chunk; ``read_png`` reads it back. ``OUT/_export.json`` (written last) counts what was
exported and what was not (damaged tars, keys that are not safe file names). Label keys become file
names only when they are plain names (letters, digits, ``_``, ``-``): a hostile key never reaches the
file system.
"""
from __future__ import annotations

import argparse
import io
import json
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from cliptex_labels import LabelTar
from pipeline import labels, storage
from pipeline.coco import palette
from pipeline.storage import write_bytes_atomic, write_json_atomic

SAFE_KEY = re.compile(r"[A-Za-z0-9_-]{1,128}")
TEXT_CHUNK = "cliptex"


def normals_to_rgb(normals: np.ndarray) -> np.ndarray:
    """float unit vectors (..., 3) -> uint8 RGB, round((n + 1) * 127.5) (4M's normal PNGs)."""
    return np.rint((np.asarray(normals, np.float32) + 1) * np.float32(127.5)).clip(0, 255).astype(np.uint8)


def rgb_to_normals(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB normals -> float32 unit vectors (3 x 8 bits is not unit length as stored)."""
    n = rgb.astype(np.float32) / np.float32(127.5) - np.float32(1)
    return n / np.linalg.norm(n, axis=-1, keepdims=True)


def _png(img, meta: dict | None = None) -> bytes:
    from PIL import PngImagePlugin

    info = None
    if meta is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text(TEXT_CHUNK, json.dumps(meta, sort_keys=True))
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def seg_png(ids: np.ndarray, meta: dict | None = None) -> bytes:
    from PIL import Image

    img = Image.frombytes("P", (ids.shape[1], ids.shape[0]), np.ascontiguousarray(ids, np.uint8).tobytes())
    img.putpalette(palette().ravel().tolist())
    return _png(img, meta)


def u16_png(q: np.ndarray, meta: dict | None = None) -> bytes:
    from PIL import Image

    return _png(Image.fromarray(np.ascontiguousarray(q, np.uint16)), meta)


def rgb_png(rgb: np.ndarray, meta: dict | None = None) -> bytes:
    from PIL import Image

    return _png(Image.fromarray(np.ascontiguousarray(rgb, np.uint8), "RGB"), meta)


def member_png(data: bytes) -> bytes:
    """One label member -> its PNG (see the module doc)."""
    header, codes = labels.decode_codes(data)
    meta = {k: v for k, v in header.items() if k != "codec"}
    if header["codec"] == "u8":
        return seg_png(codes, meta)
    if header["codec"] == "oct16_delta":
        return rgb_png(normals_to_rgb(labels.values_from_codes(header, codes)), meta)
    return u16_png(codes, meta)


def read_png(data: bytes) -> tuple[dict, np.ndarray]:
    """An exported PNG -> (the member header it came from, its pixels: class ids, uint16 codes or
    uint8 RGB normals)."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    return json.loads(img.text[TEXT_CHUNK]), np.asarray(img)


def export_png(label_root: str | Path, out: str | Path, tasks=None) -> dict:
    """Every label tar under ``label_root`` (the trees of ``tasks``, default all present) -> PNGs
    under ``out``. Returns (and writes as ``out/_export.json``) what was done."""
    from cliptex_labels.reader import tasks_under

    root, out = Path(label_root), Path(out)
    tasks = tuple(tasks) if tasks else tasks_under(root)
    unknown = [t for t in tasks if t not in labels.TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {list(labels.TASKS)}")
    if not tasks or not any((root / t).is_dir() for t in tasks):
        raise FileNotFoundError(f"no label trees ({', '.join(tasks or labels.TASKS)}) under {root}")
    pngs: Counter = Counter()
    problems: list[dict] = []
    for task in tasks:
        for tar in sorted((root / task).glob("*.tar")):
            with LabelTar(tar) as t:
                if t.damage:
                    problems.append({"tar": f"{task}/{tar.name}", "reason": "label_read_error", "detail": t.damage})
                for key in t.index.duplicates:
                    problems.append({"tar": f"{task}/{tar.name}", "key": key, "reason": "duplicate_label_member"})
                for name in t.index.foreign:
                    problems.append({"tar": f"{task}/{tar.name}", "member": name, "reason": "not_a_label_member"})
                for key, members in t.items():
                    if not SAFE_KEY.fullmatch(key):
                        problems.append({"tar": f"{task}/{tar.name}", "key": key, "reason": "unsafe_key"})
                        continue
                    for kind, data in members.items():
                        try:
                            png = member_png(data)
                        except labels.LabelFormatError as e:
                            problems.append({"tar": f"{task}/{tar.name}", "key": key, "reason": f"bad_{task}",
                                             "detail": str(e)})
                            continue
                        write_bytes_atomic(out / kind / tar.stem / f"{key}.png", png)
                        pngs[kind] += 1
    summary = {"format": "png", "labels": str(root), "tasks": list(tasks), "pngs": dict(pngs),
               "problems": problems}
    write_json_atomic(out / "_export.json", summary)
    return summary


def main(argv=None) -> int:
    from pipeline.manifest import ManifestError, load_manifest

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="output folder")
    ap.add_argument("--format", choices=["png"], default="png", help="output format (4M-style PNGs)")
    ap.add_argument("--labels", default=None, help="label output root (default: the --shards manifest's output)")
    ap.add_argument("--shards", default="sample", help="manifest name or .yaml path (for the default --labels)")
    ap.add_argument("--tasks", default=None, help="comma-separated trees (default: every tree present)")
    args = ap.parse_args(argv)
    try:
        root = args.labels or load_manifest(args.shards, require_shards=False).output
        if not storage.is_local(root):
            raise ValueError(f"{storage.redact(root)}: the PNG export reads a local label tree; copy it first "
                             f"(e.g. `aws s3 sync`)")
        tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
        summary = export_png(root, args.out, tasks)
    except (ManifestError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {sum(summary['pngs'].values())} PNGs ({', '.join(f'{k} {n}' for k, n in summary['pngs'].items())}) "
          f"to {args.out}; {len(summary['problems'])} problem(s), see {Path(args.out) / '_export.json'}")
    return 1 if summary["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
