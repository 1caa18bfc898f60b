"""P1: our label format vs the 4M-style PNG baseline on the same maps.

Maps: the real stereo-motorcycle disparity (scikit-image) for depth, deterministic synthetic
piecewise-planar scenes (bench/scenes.py) for seg, depth and normals, at 512x512 and CC3M-like
sizes. Baseline: palette PNG seg, 16-bit PNG depth (same min/max quantisation), RGB PNG normals.
Decode = bytes -> float32/uint8 array ready for the loss, both sides.
"""
from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.scenes import planar_scene
from pipeline import labels
from pipeline.export import normals_to_rgb, rgb_png, rgb_to_normals, seg_png, u16_png
from pipeline.sample import motorcycle_disparity

SIZES = [(512, 512), (375, 500), (333, 500), (500, 375)]  # 512^2 and typical CC3M aspect ratios
REPEATS = 15


# ---- the 4M-style baseline: what `python -m pipeline.export --format png` writes -----------------
def png_encode(kind: str, arr: np.ndarray) -> tuple[bytes, dict]:
    """Palette PNG seg, 16-bit PNG depth (the same min/max quantisation as ours), RGB PNG normals."""
    if kind == "seg":
        return seg_png(arr), {}
    if kind == "depth":
        c = labels.to_codes("depth", arr)
        return u16_png(c.codes), {"codec": "u16q", "lo": c.lo, "hi": c.hi}
    return rgb_png(normals_to_rgb(arr)), {}


def png_decode(kind: str, data: bytes, extra: dict) -> np.ndarray:
    arr = np.asarray(Image.open(io.BytesIO(data)))
    if kind == "seg":
        return arr
    if kind == "depth":
        return labels.values_from_codes(extra, arr)
    return rgb_to_normals(arr)  # the same product as ours: float32 unit vectors


def _time(fn) -> float:
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def maps() -> list[tuple[str, str, np.ndarray]]:
    out = []
    disp = np.nan_to_num(motorcycle_disparity(), nan=0.0, posinf=0.0, neginf=0.0)
    out.append(("motorcycle_disparity", "depth", disp))
    for i, (h, w) in enumerate(SIZES):
        scene = planar_scene(h, w, seed=i)
        for kind in ("seg", "depth", "normal"):
            out.append((f"planar{h}x{w}", kind, scene[kind]))
    return out


def angle_deg(a, b):
    return np.degrees(np.arccos(np.clip((a.astype(np.float64) * b).sum(-1), -1, 1)))


def label_bytes_per_jpeg(sample_dir: str | None, scale: float = 0.5) -> float | None:
    """Label bytes (seg + depth + normal + kappa) per sample over JPEG bytes, at the default label
    resolution, for synthetic scenes shaped like the sample's images."""
    if not sample_dir or not list(Path(sample_dir).glob("*.tar")):
        return None
    from pipeline.shards import iter_samples

    lbl = jpg = 0
    for shard in sorted(Path(sample_dir).glob("*.tar")):
        for i, s in enumerate(iter_samples(shard)):
            hw = labels.label_shape(s.image.shape[:2], scale)
            scene = planar_scene(*hw, seed=100 + i)
            scene["normal_conf"] = (1.0 + 100 * np.abs(scene["normal"][..., 2])).astype(np.float32)
            enc = labels.encode_sample(s.key, scene, s.image.shape[:2])
            lbl += sum(len(b) for m in enc.values() for b in m.values())
            jpg += len(s.image_bytes)
    return lbl / jpg


def run(sample_dir: str | None = None) -> dict:
    ours_bytes = png_bytes = 0
    ours_t = png_t = 0.0
    depth_err = normal_err = 0.0
    per_kind: dict[str, dict[str, float]] = {}
    for name, kind, arr in maps():
        ours = labels.encode(kind, arr)
        png, extra = png_encode(kind, arr)
        mname = labels.member_name("k", kind)
        t_ours = _time(lambda: labels.decode(mname, ours))
        t_png = _time(lambda: png_decode(kind, png, extra))
        back = labels.decode(mname, ours)
        if kind == "seg":
            assert (back == arr).all()
        elif kind == "depth":
            depth_err = max(depth_err, float(np.abs(back - arr).max() / (arr.max() - arr.min())))
        else:
            normal_err = max(normal_err, float(angle_deg(back, arr).max()))
        ours_bytes += len(ours)
        png_bytes += len(png)
        ours_t += t_ours
        png_t += t_png
        k = per_kind.setdefault(kind, {"ours_bytes": 0, "png_bytes": 0, "ours_ms": 0.0, "png_ms": 0.0})
        k["ours_bytes"] += len(ours)
        k["png_bytes"] += len(png)
        k["ours_ms"] += t_ours * 1e3
        k["png_ms"] += t_png * 1e3
    result = {
        "bytes_ratio": ours_bytes / png_bytes,
        "decode_speedup": png_t / ours_t,
        "depth_max_rel_err": depth_err,
        "normal_max_err_deg": normal_err,
        "per_kind": {k: {**v, "bytes_ratio": v["ours_bytes"] / v["png_bytes"],
                         "decode_speedup": v["png_ms"] / v["ours_ms"]} for k, v in per_kind.items()},
        "label_bytes_per_jpeg_at_half_res": label_bytes_per_jpeg(sample_dir),
        "goal": "bytes_ratio <= 1.0, decode_speedup >= 4, depth_max_rel_err <= 1e-4, normal_max_err_deg <= 1",
    }
    result["meets_goal"] = bool(result["bytes_ratio"] <= 1.0 and result["decode_speedup"] >= 4
                                and depth_err <= 1e-4 and normal_err <= 1.0)
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(run("data/sample"), indent=1))
