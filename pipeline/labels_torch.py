"""``pipeline.labels.to_codes`` on an expert's device (torch): float maps become stored codes where
they were computed, so a GPU worker's host only compresses and writes (``labels.pack``).

Same arithmetic, in the same float32 order, as the numpy codecs in ``pipeline.labels``; on CPU the
codes are bit-identical (tested). On CUDA a code can differ by one step where a value sits on a
rounding boundary — within the format's quantisation error, and still deterministic per device.
Only torch is imported here; the label format itself stays defined in ``pipeline.labels``.

A batch is converted at once (``to_codes_many``): one reduction per map batch for the value
ranges, and everything the host needs — codes, ranges, seg histograms, finiteness flags — crosses
to the host in one copy, so a batch costs one synchronisation, not one per map.

Device dtypes: codes travel as int16 (the uint16 bit pattern). ``torch.uint16`` is a
limited-support dtype (few kernels, on CUDA fewer still), so it never appears on the device.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import numpy as np
import torch

from pipeline import labels

_LUTS: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
_LUTS_LOCK = threading.Lock()  # experts may run on several threads (one per expert)
_NUMPY = {torch.uint8: np.uint8, torch.int16: np.int16, torch.int64: np.int64, torch.float32: np.float32,
          torch.bool: np.bool_}


def _lut_planes(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with _LUTS_LOCK:
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


def to_host(tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Tensors on one device -> numpy arrays on the host, with one synchronisation.

    On a CPU device the arrays share the tensors' memory. Elsewhere every tensor is viewed as
    bytes, concatenated and copied once into pinned host memory (``non_blocking``), then the host
    waits once for that copy; the arrays are views of that one buffer."""
    return to_host_deferred(tensors)()


def to_host_deferred(tensors: Sequence[torch.Tensor]) -> Callable[[], list[np.ndarray]]:
    """``to_host`` in two steps: the copy is queued on the device's stream now (an event marks its
    end); the returned function waits for that event only, not for work queued after it, and
    returns the arrays."""
    tensors = [t.contiguous() for t in tensors]
    for t in tensors:
        if t.dtype not in _NUMPY:
            raise TypeError(f"to_host: unsupported dtype {t.dtype}")
    if all(t.device.type == "cpu" for t in tensors):
        arrays = [t.numpy() for t in tensors]
        return lambda: arrays
    layout = [(_NUMPY[t.dtype], tuple(t.shape), t.numel() * t.element_size()) for t in tensors]
    flat = torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors])
    host = flat.to("cpu", non_blocking=True)
    done = None
    if flat.device.type == "cuda":
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(flat.device))
    del flat, tensors  # the stream's order keeps the memory valid until the copy has read it

    def wait() -> list[np.ndarray]:
        if done is not None:
            done.synchronize()
        raw = host.numpy()
        out, start = [], 0
        for dtype, shape, n in layout:
            out.append(raw[start:start + n].view(dtype).reshape(shape))
            start += n
        return out
    return wait


def _check(kind: str, t: torch.Tensor) -> str:
    """Validates a (B, H, W[, 3]) batch of maps of ``kind``; returns its codec."""
    if kind not in labels.KINDS:
        raise ValueError(f"unknown label kind {kind!r}; known: {sorted(labels.KINDS)}")
    codec = labels.KINDS[kind][1]
    want_ndim = 4 if kind == "normal" else 3
    if t.ndim != want_ndim or (kind == "normal" and t.shape[-1] != 3) or 0 in t.shape:
        raise ValueError(f"{kind} maps have shape {tuple(t.shape)[1:]}; expected "
                         f"(H, W{', 3' if kind == 'normal' else ''})")
    if codec == "u8" and t.dtype != torch.uint8:
        raise ValueError(f"seg map must be uint8, got {t.dtype}")
    return codec


def _device_part(kind: str, t: torch.Tensor) -> list[torch.Tensor]:
    """What crosses to the host for a (B, H, W[, 3]) batch: [codes, extras...]."""
    codec = _check(kind, t)
    b = t.shape[0]
    if codec == "u8":
        # one bincount for the whole batch: image j's classes land in bins 256 j .. 256 j + 255
        offsets = torch.arange(b, device=t.device, dtype=torch.int64).mul_(256).view(b, 1)
        hist = torch.bincount((t.reshape(b, -1).long() + offsets).reshape(-1), minlength=256 * b)
        return [t, hist.view(b, 256)]
    t = t.float()
    if codec in ("u16q", "u16q_delta"):
        lo, hi = torch.aminmax(t.reshape(b, -1), dim=1)  # min/max propagate NaN: checked on the host
        # the host's order: (value - lo) in float32, times float32(65535 / (hi - lo)) where the
        # span and the quotient are double (Python floats there)
        span = hi.double() - lo.double()
        scale = (labels.Q16 / span).float().view(b, 1, 1)
        q = torch.round((t - lo.view(b, 1, 1)) * scale)
        q = torch.where((span > 0).view(b, 1, 1), q, torch.zeros((), device=t.device))
        return [q.to(torch.int32).to(torch.int16), lo, hi]
    finite = torch.isfinite(t).reshape(b, -1).all(dim=1)
    # NaN would become an out-of-range ``take`` index: on CUDA a device-side assert that ends the
    # process instead of a ValueError for one image. Zeroed here, refused on the host.
    t = torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)
    return [oct_codes(t).to(torch.int16), finite]


def _host_part(kind: str, parts: list[np.ndarray]) -> list[labels.Codes]:
    codec = labels.KINDS[kind][1]
    if codec == "u8":
        codes, hist = parts
        return [labels.Codes(kind, codes[j], histogram=hist[j]) for j in range(codes.shape[0])]
    codes = parts[0].view(np.uint16)
    if codec in ("u16q", "u16q_delta"):
        lo, hi = parts[1], parts[2]
        bad = ~(np.isfinite(lo) & np.isfinite(hi))
        if bad.any():
            raise ValueError(f"map has NaN or Inf values ({kind}, image {int(np.flatnonzero(bad)[0])} of the batch)")
        return [labels.Codes(kind, codes[j], lo=float(lo[j]), hi=float(hi[j])) for j in range(codes.shape[0])]
    finite = parts[1]
    if not finite.all():
        raise ValueError(f"normal map has NaN or Inf values (image {int(np.flatnonzero(~finite)[0])} of the batch)")
    return [labels.Codes(kind, codes[j]) for j in range(codes.shape[0])]


def to_codes_many(batches: Sequence[tuple[str, torch.Tensor]]) -> list[list[labels.Codes]]:
    """``[(kind, maps (B, H, W[, 3]))]`` on one device -> per entry the B images' ``labels.Codes``.
    One reduction per entry for the value ranges, one host copy and one synchronisation for all.
    Shapes and values are checked as ``labels.to_codes`` checks them (NaN/Inf raise)."""
    return to_codes_many_deferred(batches)()


def to_codes_many_deferred(batches: Sequence[tuple[str, torch.Tensor]]) -> Callable[[], list[list[labels.Codes]]]:
    """``to_codes_many`` in two steps (see ``to_host_deferred``): shape errors raise now, value
    errors (NaN/Inf) when the returned function is called."""
    device_parts = [_device_part(kind, t) for kind, t in batches]
    counts = [(kind, len(parts)) for (kind, _), parts in zip(batches, device_parts)]
    wait = to_host_deferred([p for parts in device_parts for p in parts])
    del device_parts

    def finish() -> list[list[labels.Codes]]:
        host = iter(wait())
        return [_host_part(kind, [next(host) for _ in range(n)]) for kind, n in counts]
    return finish


def to_codes(kind: str, t: torch.Tensor) -> labels.Codes:
    """One map of label ``kind`` (H, W[, 3]) on any device -> ``labels.Codes`` on the host."""
    want_ndim = 3 if kind == "normal" else 2
    if kind in labels.KINDS and t.ndim != want_ndim:
        raise ValueError(f"{kind} map has shape {tuple(t.shape)}; expected (H, W{', 3' if kind == 'normal' else ''})")
    return to_codes_many([(kind, t[None])])[0][0]
