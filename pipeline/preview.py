"""Look at pseudo-labels (``make preview``): a contact sheet and a class-frequency chart.

    python -m pipeline.preview --shards sample --labels data/labels/sample [--n 8]

writes ``<labels>/_preview/contact_sheet.png`` (image | seg overlay | depth | normals for the first
N labelled samples in source order) and ``<labels>/_preview/class_frequency.png`` (instances per
COCO class over the whole job, from ``_manifest.json`` — the paper's Fig. 2a; PASCAL VOC classes
highlighted), with ``class_frequency.json`` next to it holding the numbers the chart shows.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

from pipeline import labels
from pipeline.coco import COCO_CLASSES, VOC_IN_COCO, class_name, palette
from pipeline.outputs import MANIFEST_JSON


def collect(shards, label_root: Path, n: int) -> list[dict]:
    """The first ``n`` labelled samples: image, caption and decoded label maps (every tree present
    under ``label_root``), read through ``cliptex_labels.samples``."""
    from cliptex_labels import samples

    return list(itertools.islice(samples(shards, label_root), n))


def _resize_nearest(arr: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    ys = (np.arange(hw[0]) * arr.shape[0] // hw[0]).clip(0, arr.shape[0] - 1)
    xs = (np.arange(hw[1]) * arr.shape[1] // hw[1]).clip(0, arr.shape[1] - 1)
    return arr[ys][:, xs]


def _save(fig, path: Path, dpi: int) -> None:
    import io

    import matplotlib.pyplot as plt

    from pipeline.storage import write_bytes_atomic

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())


def contact_sheet(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pal = palette()
    cols = ["image", "seg overlay", "depth (inverse, near = bright)", "normals (xyz -> rgb)"]
    fig, axes = plt.subplots(max(1, len(rows)), 4, figsize=(14, 3.2 * max(1, len(rows))), squeeze=False)
    for r, row in enumerate(rows):
        img = row["image"]
        ax = axes[r]
        ax[0].imshow(img)
        ax[0].set_ylabel(row["key"], fontsize=8)
        if "seg" in row:
            seg = _resize_nearest(row["seg"], img.shape[:2])
            colour = pal[seg].astype(np.float32)
            alpha = np.where(seg == 0, 0.0, 0.55)[..., None]
            ax[1].imshow((img * (1 - alpha) + colour * alpha).astype(np.uint8))
            present = [c for c in np.unique(row["seg"]) if c not in (0, labels.SEG_IGNORE)]
            names = ", ".join(class_name(int(c)) for c in present[:6]) or "no objects"
            ax[1].set_xlabel(names + (" ..." if len(present) > 6 else ""), fontsize=7)
        if "depth" in row:
            ax[2].imshow(row["depth"], cmap="magma")
        if "normal" in row:
            ax[3].imshow(((row["normal"] + 1) * 0.5).clip(0, 1))
        for c, a in enumerate(ax):
            a.set_xticks([])
            a.set_yticks([])
            if r == 0:
                a.set_title(cols[c], fontsize=9)
    fig.tight_layout()
    _save(fig, path, dpi=80)
    return path


def class_frequency(manifest: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(manifest.get("class_instances") or [0] * 81, np.int64)[1:81]
    what = "instances"
    if counts.sum() == 0:
        counts = np.asarray(manifest.get("class_pixels") or [0] * 81, np.int64)[1:81]
        what = "pixels"
    order = [i for i in np.argsort(-counts, kind="stable") if counts[i] > 0]
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * max(len(order), 20)), 4.5))
    if order:
        names = [COCO_CLASSES[i] for i in order]
        colours = ["tab:orange" if n in VOC_IN_COCO else "tab:blue" for n in names]
        ax.bar(range(len(order)), counts[order], color=colours)
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels(names, rotation=90, fontsize=7)
        ax.set_yscale("log")
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color="tab:orange", label="PASCAL VOC class"),
                           Patch(color="tab:blue", label="other COCO class")], fontsize=8)
    else:
        ax.text(0.5, 0.5, "no objects in the seg pseudo-labels", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_xticks([])
    counts_doc = manifest.get("counts", {})
    ax.set_ylabel(f"{what} in pseudo-labels")
    ax.set_title(f"{manifest.get('shard_set', {}).get('name', '')}: seg expert {what} per class "
                 f"({counts_doc.get('ok', '?')} images, profile {manifest.get('config', {}).get('profile', '?')})",
                 fontsize=9)
    fig.tight_layout()
    _save(fig, path, dpi=90)
    # what the chart shows, read back from the drawn bars and tick labels: the numbers behind the
    # picture for a reader, and what the test compares with the manifest
    from pipeline.storage import write_json_atomic

    write_json_atomic(path.with_suffix(".json"), {
        "what": what, "title": ax.get_title(), "classes": [t.get_text() for t in ax.get_xticklabels()],
        "values": [int(round(bar.get_height())) for bar in ax.patches]})
    return path


def main(argv=None) -> int:
    from pipeline import storage
    from pipeline.manifest import ManifestError, load_manifest

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", default="sample", help="manifest name or .yaml path")
    ap.add_argument("--labels", default=None, help="label output root (default: the manifest's output)")
    ap.add_argument("--n", type=int, default=8, help="samples on the contact sheet")
    ap.add_argument("--out", default=None, help="folder for the PNGs (default <labels>/_preview)")
    args = ap.parse_args(argv)
    try:
        shard_set = load_manifest(args.shards)
    except (ManifestError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    root_text = args.labels or shard_set.output
    if not storage.is_local(root_text) or not all(storage.is_local(p) for p in shard_set.shards):
        print(f"error: the preview reads local shards and label trees; copy {storage.redact(root_text)} "
              f"(e.g. `aws s3 sync`) and the shards it names first", file=sys.stderr)
        return 2
    root = Path(storage.normalize(root_text))
    mpath = root / MANIFEST_JSON
    if not mpath.is_file():
        print(f"error: no {mpath}; run `make pseudolabel SHARDS={shard_set.name}` first "
              f"(the manifest is written when the job completes)", file=sys.stderr)
        return 2
    manifest = json.loads(mpath.read_text())
    out = Path(args.out) if args.out else root / "_preview"
    rows = collect(shard_set.shards, root, args.n)
    sheet = contact_sheet(rows, out / "contact_sheet.png")
    chart = class_frequency(manifest, out / "class_frequency.png")
    print(f"wrote {sheet} ({len(rows)} samples) and {chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
