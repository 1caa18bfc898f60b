"""Deterministic synthetic scenes with known geometry: piecewise-planar rooms plus a sphere.

Used by the label-format benchmark (P1) and by tests that need maps with realistic structure
(large smooth regions, sharp object boundaries) rather than noise.
"""
from __future__ import annotations

import numpy as np


def planar_scene(h: int, w: int, seed: int = 0, n_planes: int = 7) -> dict[str, np.ndarray]:
    """Returns seg (uint8, 0..80), depth (float32 inverse depth), normal (float32 unit, camera frame:
    x right, y down, z forward; pointing toward the camera)."""
    rng = np.random.default_rng(seed)
    f = 0.9 * max(h, w)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    rays = np.stack([(xs - w / 2) / f, (ys - h / 2) / f, np.ones_like(xs)], -1)
    rays /= np.linalg.norm(rays, axis=-1, keepdims=True)
    best_t = np.full((h, w), np.inf)
    normal = np.zeros((h, w, 3))
    seg = np.zeros((h, w), np.uint8)
    # planes n·X = d (d < 0: n faces the camera at the origin); the nearest hit along a ray wins.
    # A box room seen from inside (left, right, floor, ceiling, back), then rectangular objects.
    room = [((1, 0, 0), -1.5), ((-1, 0, 0), -1.5), ((0, -1, 0), -1.0), ((0, 1, 0), -1.2), ((0, 0, -1), -6.0)]
    planes = [(np.array(n, float) + rng.normal(scale=0.08, size=3), d * rng.uniform(0.8, 1.2)) for n, d in room]
    for _ in range(n_planes):
        n = rng.normal(size=3)
        n[2] = -abs(n[2]) - 0.5
        planes.append((n, -rng.uniform(1.5, 4)))
    for i, (n, d) in enumerate(planes):
        n = n / np.linalg.norm(n)
        denom = (rays * n).sum(-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(denom < -1e-6, d / denom, np.inf)
        t[t <= 0] = np.inf
        if i >= len(room):
            y0, x0 = rng.integers(0, h * 3 // 4), rng.integers(0, w * 3 // 4)
            mask = np.zeros((h, w), bool)
            mask[y0:y0 + rng.integers(h // 8, h // 3), x0:x0 + rng.integers(w // 8, w // 3)] = True
            t[~mask] = np.inf
        hit = t < best_t
        best_t[hit], normal[hit], seg[hit] = t[hit], n, rng.integers(1, 81)
    # a sphere: smoothly varying normals
    c = np.array([rng.uniform(-0.5, 0.5), rng.uniform(-0.3, 0.3), rng.uniform(3, 5)])
    r = 0.8
    b = (rays * c).sum(-1)
    disc = b ** 2 - (c @ c - r * r)
    t = np.where(disc > 0, b - np.sqrt(np.clip(disc, 0, None)), np.inf)
    hit = (t > 0) & (t < best_t)
    pts = rays * np.where(hit, t, 0)[..., None]
    sph_n = (pts - c) / r
    best_t[hit], normal[hit], seg[hit] = t[hit], sph_n[hit], 1
    best_t[~np.isfinite(best_t)] = 50.0
    depth_z = best_t * rays[..., 2]
    return {"seg": seg, "depth": (1.0 / depth_z).astype(np.float32),
            "normal": (normal / np.linalg.norm(normal, axis=-1, keepdims=True)).astype(np.float32)}
