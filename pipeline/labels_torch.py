"""``pipeline.labels.to_codes`` on an expert's device (torch): float maps become stored codes where
they were computed, so a GPU worker's host only compresses and writes (``labels.pack``).

Same arithmetic, in the same float32 order, as the numpy codecs in ``pipeline.labels``; on CPU the
codes are bit-identical (tested). On CUDA a code can differ by one step where a value sits on a
rounding boundary — within the format's quantisation error, and still deterministic per device.
Only torch is imported here; the label format itself stays defined in ``pipeline.labels``.
"""
from __future__ import annotations

import math

import torch

from pipeline import labels

_LUTS: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _lut_planes(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if device not in _LUTS:
        _LUTS[device] = tuple(torch.from_numpy(p).to(device) for p in labels.octahedral_table_planes())
    return _LUTS[device]


def oct_codes(normals: torch.Tensor) -> torch.Tensor:
    """Unit vectors (..., 3) float32 -> octahedral codes ``u | v << 8`` (...) int32: the precise
    encoder of ``labels.oct_encode`` (best of the 4 surrounding grid points, scored by the decode
    table)."""
    n = normals.float()
    x, y, z = n[..., 0], n[..., 1], n[..., 2]
    l1 = (x.abs() + y.abs() + z.abs()).clamp_min(1e-12)
    px, py = x / l1, y / l1
    lower = z < 0
    one = torch.ones((), dtype=torch.float32, device=n.device)
    fx = torch.where(lower, (1 - py.abs()) * torch.where(px >= 0, one, -one), px)
    fy = torch.where(lower, (1 - px.abs()) * torch.where(py >= 0, one, -one), py)
    low_u = torch.floor((fx + 1) * 127.5).clamp(0, 254).to(torch.int32)
    low_v = torch.floor((fy + 1) * 127.5).clamp(0, 254).to(torch.int32)
    base = low_u | (low_v << 8)
    lx, ly, lz = _lut_planes(n.device)

    def score(code):
        idx = code.long()
        return lx.take(idx) * x + ly.take(idx) * y + lz.take(idx) * z

    best_code, best_dot = base, score(base)
    for step in (1, 256, 257):  # (u+1, v), (u, v+1), (u+1, v+1)
        code = base + step
        dot = score(code)
        better = dot > best_dot
        best_code = torch.where(better, code, best_code)
        best_dot = torch.where(better, dot, best_dot)
    return best_code


def _u16(codes: torch.Tensor):
    """int32 codes in [0, 65535] -> a host uint16 array (half the transfer of int32)."""
    return codes.to(torch.uint16).cpu().numpy()


def to_codes(kind: str, t: torch.Tensor) -> labels.Codes:
    """A map of label ``kind`` on any device -> ``labels.Codes`` on the host. Shapes and values are
    checked as ``labels.to_codes`` checks them (NaN/Inf raise)."""
    if kind not in labels.KINDS:
        raise ValueError(f"unknown label kind {kind!r}; known: {sorted(labels.KINDS)}")
    codec = labels.KINDS[kind][1]
    want_ndim = 3 if kind == "normal" else 2
    if t.ndim != want_ndim or (kind == "normal" and t.shape[-1] != 3):
        raise ValueError(f"{kind} map has shape {tuple(t.shape)}; expected (H, W{', 3' if kind == 'normal' else ''})")
    if codec == "u8":
        if t.dtype != torch.uint8:
            raise ValueError(f"seg map must be uint8, got {t.dtype}")
        histogram = torch.bincount(t.reshape(-1), minlength=256).cpu().numpy()
        return labels.Codes(kind, t.contiguous().cpu().numpy(), histogram=histogram)
    t = t.float()
    if codec in ("u16q", "u16q_delta"):
        lo, hi = torch.aminmax(t)
        lo, hi = float(lo), float(hi)  # one sync: the range goes into the member's header
        if not (math.isfinite(lo) and math.isfinite(hi)):  # min/max propagate NaN
            raise ValueError("map has NaN or Inf values")
        span = hi - lo
        if span > 0:
            q = torch.round((t - lo) * (labels.Q16 / span)).to(torch.int32)
        else:
            q = torch.zeros(t.shape, dtype=torch.int32, device=t.device)
        return labels.Codes(kind, _u16(q), lo=lo, hi=hi)
    if not bool(torch.isfinite(t).all()):
        raise ValueError("normal map has NaN or Inf values")
    return labels.Codes(kind, _u16(oct_codes(t)))
