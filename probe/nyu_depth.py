"""Write the depth maps (and, where missing, the images) of the NYUv2 probe layout from the
official labelled release.

    python -m probe.nyu_depth --mat nyu_depth_v2_labeled.mat --splits splits.mat --out <DATA>

``nyu_depth_v2_labeled.mat`` (MATLAB v7.3 = HDF5, read with h5py) holds the 1449 labelled frames:
``images`` (N, 3, 640, 480) uint8 and ``depths`` (N, 640, 480) float32 metres, stored transposed
(MATLAB is column-major). ``splits.mat`` holds the official ``trainNdxs`` (795) and ``testNdxs``
(654), 1-based. Frame i (0-based) becomes ``<DATA>/<split>/depth/<i:06d>.png`` (16-bit PNG,
millimetres, 0 = no depth) — the names of Bae et al.'s ``nyu_dataset.zip`` (img/ and norm/), so
the two releases unpacked into the same <DATA> give the layout ``probe/datasets.py`` reads.
``<split>/img/<i:06d>.png`` is written only where it is missing. Files already present are kept
(a rerun finishes an interrupted one); every file is written atomically.
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.storage import write_bytes_atomic


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def depth_to_mm(depth_m: np.ndarray) -> np.ndarray:
    d = np.nan_to_num(np.asarray(depth_m, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    return np.clip(np.round(d * 1000.0), 0, 65535).astype(np.uint16)


def convert(mat: Path, splits: Path, out: Path) -> dict[str, int]:
    try:
        import h5py
    except ImportError:
        raise SystemExit("error: reading nyu_depth_v2_labeled.mat (MATLAB v7.3) needs h5py: pip install h5py") from None
    from scipy.io import loadmat

    idx = loadmat(str(splits))
    written = {"depth": 0, "img": 0, "kept": 0}
    with h5py.File(mat, "r") as f:
        images, depths = f["images"], f["depths"]
        for split, key in (("train", "trainNdxs"), ("test", "testNdxs")):
            for one_based in np.asarray(idx[key]).ravel().astype(int):
                i = one_based - 1
                name = f"{i:06d}.png"
                depth_path, img_path = out / split / "depth" / name, out / split / "img" / name
                if depth_path.is_file():
                    written["kept"] += 1
                else:
                    write_bytes_atomic(depth_path, _png(depth_to_mm(np.asarray(depths[i]).T)))
                    written["depth"] += 1
                if not img_path.is_file():
                    write_bytes_atomic(img_path, _png(np.ascontiguousarray(np.asarray(images[i]).transpose(2, 1, 0))))
                    written["img"] += 1
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m probe.nyu_depth", description=__doc__.split("\n\n")[0])
    p.add_argument("--mat", required=True, help="nyu_depth_v2_labeled.mat")
    p.add_argument("--splits", required=True, help="splits.mat (trainNdxs, testNdxs)")
    p.add_argument("--out", required=True, help="the NYUv2 probe root (<DATA>)")
    args = p.parse_args(argv)
    for f in (args.mat, args.splits):
        if not Path(f).is_file():
            print(f"error: {f} does not exist", file=sys.stderr)
            return 2
    print(convert(Path(args.mat), Path(args.splits), Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
