"""Build ``data/sample/``: real photographs bundled with scikit-image, laid out exactly as
img2dataset writes CC3M (``{shard}.tar`` with ``{key}.jpg/.txt/.json``, ``{shard}.parquet``,
``{shard}_stats.json``). Deterministic: the same bytes on every run.

    python -m pipeline.sample [--out data/sample]
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.shards import tar_bytes
from pipeline.storage import write_bytes_atomic, write_json_atomic

# (skimage.data loader, caption). Grayscale ones stay single-channel JPEGs on purpose: web data has
# them and the reader must convert. The stereo motorcycle's left view comes with true disparity.
PHOTOS = [
    ("astronaut", "an astronaut in a white spacesuit posing in front of an american flag"),
    ("chelsea", "a tabby cat with green eyes looking to the side"),
    ("coffee", "a cup of coffee with a saucer on a wooden table"),
    ("rocket", "a rocket standing on the launch pad against a blue sky"),
    ("stereo_motorcycle", "a red motorcycle parked in a garage next to a wall"),
    ("camera", "black and white photo of a man with a camera on a tripod"),
    ("coins", "old coins arranged in rows on a dark background"),
    ("moon", "a close up of the surface of the moon with craters"),
    ("page", "a scanned page of printed text"),
    ("hubble_deep_field", "galaxies in deep space photographed by a telescope"),
    ("immunohistochemistry", "a microscope image of stained tissue"),
    ("retina", "a photograph of the back of a human eye"),
    ("brick", "a close up of a grey brick wall"),
    ("clock", "a clock on a wall photographed at an angle"),
    ("colorwheel", "a colour wheel with a rainbow of hues"),
    ("cell", "a microscope image of a single cell"),
]
SHARD_SIZE = 8
MAX_SIDE = 512  # img2dataset-style resize (keep ratio) so the sample stays small and fast
JPEG_QUALITY = 90


def load_photo(name: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, name)()
    if name == "stereo_motorcycle":
        img = img[0]
    return img


def motorcycle_disparity() -> np.ndarray:
    """Ground-truth disparity of the stereo motorcycle's left view (float32, NaN where unknown)."""
    import skimage.data

    return skimage.data.stereo_motorcycle()[2].astype(np.float32)


def _resize_keep_ratio(img: Image.Image) -> Image.Image:
    w, h = img.size
    s = MAX_SIDE / max(w, h)
    if s >= 1:
        return img
    return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)


def jpeg_bytes(arr: np.ndarray) -> tuple[bytes, tuple[int, int], tuple[int, int]]:
    img = Image.fromarray(arr)
    original = img.size
    img = _resize_keep_ratio(img)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)  # no timestamps: PIL's JPEG is deterministic
    return buf.getvalue(), original, img.size


def build(out: str | Path = "data/sample") -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for shard_id, start in enumerate(range(0, len(PHOTOS), SHARD_SIZE)):
        shard = f"{shard_id:05d}"
        rows, members = [], []
        for index, (name, caption) in enumerate(PHOTOS[start:start + SHARD_SIZE]):
            key = f"{shard}{index:04d}"  # img2dataset: 5-digit shard + 4-digit index
            data, (ow, oh), (w, h) = jpeg_bytes(load_photo(name))
            meta = {"url": f"skimage://data/{name}", "caption": caption, "key": key,
                    "status": "success", "error_message": None, "width": w, "height": h,
                    "original_width": ow, "original_height": oh, "exif": None,
                    "sha256": hashlib.sha256(data).hexdigest()}
            members += [(f"{key}.jpg", data), (f"{key}.txt", caption.encode()),
                        (f"{key}.json", json.dumps(meta, sort_keys=True).encode())]
            rows.append(meta)
        tar_path = out / f"{shard}.tar"
        write_bytes_atomic(tar_path, tar_bytes(members))
        table = pa.Table.from_pylist(rows)
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        write_bytes_atomic(out / f"{shard}.parquet", buf.getvalue().to_pybytes())
        # img2dataset's stats file marks a finished shard; no wall-clock fields, for determinism
        write_json_atomic(out / f"{shard}_stats.json", {
            "count": len(rows), "successes": len(rows), "failed_to_download": 0,
            "failed_to_resize": 0, "status_dict": {"success": len(rows)}})
        written.append(tar_path)
    return written


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/sample")
    args = ap.parse_args(argv)
    paths = build(args.out)
    print(f"wrote {len(paths)} shards, {len(PHOTOS)} samples to {args.out}")


if __name__ == "__main__":
    main()
