"""Tiny datasets in the probes' real on-disk layouts, made from the project's 16 sample photos with
this project's own smoke pseudo-labels as "ground truth" (the smoke experts called directly, no
Ray). For tests and offline demos of ``make probe`` / ``make zeroshot``; no download.

    python -m probe.tiny --out data/tiny [--sample data/sample] [--size 128]

writes
    voc/VOCdevkit/VOC2012/        JPEGImages, SegmentationClass (palette PNGs), ImageSets/Segmentation/{train,val}.txt
                                  smoke seg classes (COCO ids) renumbered 1..k in sorted order (k <= 20)
    nyu/{train,test}/{img,depth,norm}/<id>.png
                                  depth: the smoke depth (relative inverse depth) mapped to 0.5..8 m, 16-bit mm;
                                  normals: (n + 1) / 2 * 255; the top 4 rows of every map are invalid (0)
    imagefolder/{train,val}/{colour,greyscale}/<key>.jpg
    flickr/images/<key>.jpg + flickr/captions.txt   ("<file>#0<TAB>caption", Flickr30k's token format)

Training and validation splits hold the same images on purpose: a probe must fit its own
training images (tests/test_probe.py).
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.shards import Sample, iter_samples
from pipeline.storage import write_bytes_atomic

INVALID_ROWS = 4


def _png(arr: np.ndarray, palette: bool = False) -> bytes:
    img = Image.fromarray(arr)
    if palette:
        img.putpalette([v for c in range(256) for v in ((c * 37) % 256, (c * 91) % 256, (c * 53) % 256)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def load_sample(sample_dir: Path, size: int) -> list[tuple[str, np.ndarray, str, bool]]:
    """(key, RGB image with short side ``size``, caption, greyscale?) of every sample photo."""
    out = []
    for shard in sorted(Path(sample_dir).glob("*.tar")):
        for s in iter_samples(shard):
            if not isinstance(s, Sample):
                continue
            img = Image.fromarray(s.image)
            w, h = img.size
            k = size / min(w, h)
            img = img.resize((max(size, round(w * k)), max(size, round(h * k))), Image.BICUBIC)
            arr = np.asarray(img)
            grey = bool((arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all())
            out.append((s.key, arr, s.caption, grey))
    if not out:
        raise FileNotFoundError(f"no sample photos in {sample_dir} (make sample)")
    return out


def build(out: str | Path, sample_dir: str | Path = "data/sample", size: int = 128) -> dict[str, Path]:
    from expert_wrappers import build_experts

    out = Path(out)
    photos = load_sample(Path(sample_dir), size)
    images = [p[1] for p in photos]
    experts = build_experts("seg,depth,normal", "smoke")
    maps = {t: e.predict(images) for t, e in experts.items()}
    keys = [p[0] for p in photos]

    # segmentation: VOC layout, classes renumbered to 1..k
    voc = out / "voc" / "VOCdevkit" / "VOC2012"
    present = sorted({int(c) for m in maps["seg"] for c in np.unique(m["seg"]) if 0 < c < 255})[:20]
    lut = np.full(256, 255, dtype=np.uint8)
    lut[0] = 0
    lut[present] = np.arange(1, len(present) + 1, dtype=np.uint8)
    for key, img, m in zip(keys, images, maps["seg"]):
        write_bytes_atomic(voc / "JPEGImages" / f"{key}.jpg", _jpeg(img))
        write_bytes_atomic(voc / "SegmentationClass" / f"{key}.png", _png(lut[m["seg"]], palette=True))
    for split in ("train", "val"):
        write_bytes_atomic(voc / "ImageSets" / "Segmentation" / f"{split}.txt", "".join(k + "\n" for k in keys).encode())

    # depth and normals: NYUv2 layout
    nyu = out / "nyu"
    for split in ("train", "test"):
        for key, img, d, n in zip(keys, images, maps["depth"], maps["normal"]):
            disp = d["depth"].astype(np.float64)
            span = max(float(disp.max() - disp.min()), 1e-6)
            inv = 1 / 8.0 + (disp - disp.min()) / span * (1 / 0.5 - 1 / 8.0)  # larger disparity = nearer
            depth_mm = np.round(1000.0 / inv).astype(np.uint16)
            depth_mm[:INVALID_ROWS] = 0
            rgb = np.clip(np.round((n["normal"] + 1.0) / 2.0 * 255.0), 1, 255).astype(np.uint8)
            rgb[:INVALID_ROWS] = 0
            write_bytes_atomic(nyu / split / "img" / f"{key}.png", _png(img))
            write_bytes_atomic(nyu / split / "depth" / f"{key}.png", _png(depth_mm))
            write_bytes_atomic(nyu / split / "norm" / f"{key}.png", _png(rgb))

    # classification: ImageFolder, colour vs greyscale photos
    for split in ("train", "val"):
        for key, img, _, grey in photos:
            write_bytes_atomic(out / "imagefolder" / split / ("greyscale" if grey else "colour") / f"{key}.jpg", _jpeg(img))

    # retrieval: Flickr30k-style image folder + captions file
    for key, img, _, _ in photos:
        write_bytes_atomic(out / "flickr" / "images" / f"{key}.jpg", _jpeg(img))
    write_bytes_atomic(out / "flickr" / "captions.txt", "".join(f"{k}.jpg#0\t{c}\n" for k, _, c, _ in photos).encode())
    return {"voc": out / "voc", "nyu": nyu, "imagefolder": out / "imagefolder", "flickr": out / "flickr",
            "num_seg_classes": len(present) + 1}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m probe.tiny", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/tiny")
    ap.add_argument("--sample", default="data/sample")
    ap.add_argument("--size", type=int, default=128, help="short side of the images")
    args = ap.parse_args(argv)
    paths = build(args.out, args.sample, args.size)
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
