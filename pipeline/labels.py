"""Label format v1 — the single definition of how pseudo-labels are stored.

Writer (pipeline), trainer and third-party readers all import this module; docs/LABELS.md is the
human-readable spec and shows how to decode every member with numpy + zstandard alone.

A member is ``<key>.<kind>.lbl`` inside ``<out>/<task>/<shard>.tar``. Its bytes are::

    b"CTXL" | u16 LE format version | u16 LE header length | header JSON (utf-8) | zstd frame

The header says what the zstd frame holds (``codec``, ``shape``, quantisation range) so a reader can
check the decompressed size *before* allocating it (bounded decompression).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import struct
import threading

import numpy as np
import zstandard

FORMAT_VERSION = 1
MAGIC = b"CTXL"
MEMBER_EXT = "lbl"
TASKS = ("seg", "depth", "normal")
# kind -> (task tree it lives in, codec)
KINDS = {
    "seg": ("seg", "u8"),
    "seg_conf": ("seg", "u16q"),
    "depth": ("depth", "u16q_delta"),
    "normal": ("normal", "oct16_delta"),
    "normal_conf": ("normal", "u16q"),  # NLL-AngMF kappa
}
SEG_IGNORE = 255
NUM_SEG_CLASSES = 80  # COCO things, contiguous 1..80; 0 = background
MAX_LABEL_PIXELS = 1 << 26  # 8192 x 8192: refuses absurd headers before any allocation
ZSTD_LEVEL = 3
_PREFIX = struct.Struct("<4sHH")
Q16 = 65535.0


class LabelFormatError(ValueError):
    """A member that is not a valid label of a format version we know."""


def member_name(key: str, kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown label kind {kind!r}; known: {sorted(KINDS)}")
    return f"{key}.{kind}.{MEMBER_EXT}"


def split_member_name(name: str) -> tuple[str, str]:
    """``'000010002.depth.lbl'`` -> ``('000010002', 'depth')``."""
    base, _, ext = name.rpartition(".")
    key, _, kind = base.rpartition(".")
    if ext != MEMBER_EXT or kind not in KINDS or not key:
        raise LabelFormatError(f"not a label member name: {name!r}")
    return key, kind


def task_of(kind: str) -> str:
    return KINDS[kind][0]


def label_shape(image_hw: tuple[int, int], scale: float) -> tuple[int, int]:
    """Label resolution for an image: ``scale`` of each side, rounded, at least 1 pixel."""
    if not 0 < scale <= 1:
        raise ValueError(f"label scale must be in (0, 1], got {scale}")
    return max(1, round(image_hw[0] * scale)), max(1, round(image_hw[1] * scale))


# ----------------------------------------------------------------------------------------------
# codecs: array <-> raw bytes (before zstd). Each returns extra header fields it needs to decode.


def _quantise16(values: np.ndarray) -> tuple[np.ndarray, dict]:
    values = np.asarray(values, dtype=np.float32)
    if not np.isfinite(values).all():
        raise ValueError("map has NaN or Inf values")
    lo, hi = float(values.min()), float(values.max())
    span = hi - lo
    if span > 0:
        q = np.rint((values - lo) * (Q16 / span)).astype(np.uint16)
    else:
        q = np.zeros(values.shape, np.uint16)
    return q, {"lo": lo, "hi": hi}


def _dequantise16(q: np.ndarray, header: dict) -> np.ndarray:
    lo, scale = quantisation(header)
    out = q.astype(np.float32)
    out *= scale  # float32 keeps ~1e-7 relative: far below the 1/65535 step
    out += lo
    return out


def _delta_rows(q: np.ndarray) -> np.ndarray:
    """Vertical delta (each row minus the row above) modulo the dtype's range: smooth maps become
    runs of small numbers that zstd packs well."""
    d = np.empty_like(q)
    d[0] = q[0]
    np.subtract(q[1:], q[:-1], out=d[1:])
    return d


def _undelta_rows(d: np.ndarray, scratch: bool = False) -> np.ndarray:
    """Inverse of ``_delta_rows``: a cumulative sum over rows, wrapping in the dtype. This is the hot
    path of every label decode. numpy's cumsum along rows runs a scalar strided loop per column, a
    row-by-row loop pays one call per row; a log-step scan (after the pass with step k every row holds
    the sum of the 2k rows ending at it) is log2(H) whole-array vector adds: measured 4x faster than
    cumsum at 256x256 and 3x faster than the row loop at 384x384. Integer adds wrap, so the result is
    the same bits. ``scratch``: ``d`` is a temporary the scan may overwrite (saves an allocation)."""
    h = d.shape[0]
    if h < 2:
        return d if scratch else d.copy()
    a = np.empty_like(d)
    a[0] = d[0]
    np.add(d[1:], d[:-1], out=a[1:])
    b = d if scratch else np.empty_like(d)  # d is fully read by the first pass
    k = 2
    while k < h:
        np.add(a[k:], a[:-k], out=b[k:])
        b[:k] = a[:k]
        a, b = b, a
        k *= 2
    return a


def _planes(q16: np.ndarray) -> np.ndarray:
    """Byte-shuffle: all low bytes, then all high bytes (zstd finds more runs in each plane)."""
    q = q16.reshape(-1)
    out = np.empty((2, q.size), np.uint8)
    # masks and shifts, not a strided byte view: 3x faster, and independent of the host's endianness
    np.bitwise_and(q, 255, out=out[0], casting="unsafe")
    np.right_shift(q, 8, out=out[1], casting="unsafe")
    return out


def _unplanes(raw, shape, rows: slice = slice(None), cols: slice = slice(None)) -> np.ndarray:
    """Inverse of ``_planes`` for the window ``[rows, cols]`` of the map: bytes outside it are not
    touched. ``hi << 8 | lo`` in uint16 arithmetic is 2.6x faster than interleaving the two planes
    through a strided byte view, and does not depend on the host's byte order."""
    p = np.frombuffer(raw, np.uint8).reshape((2,) + tuple(shape))
    out = np.left_shift(p[1, rows, cols], 8, dtype=np.uint16)
    out |= p[0, rows, cols]
    return out


def oct_encode(normals: np.ndarray) -> np.ndarray:
    """Unit vectors (..., 3) -> octahedral u8 pairs (..., 2).

    Of the 4 grid points around the continuous position we keep the one whose decoded vector is
    closest to the input ("precise" octahedral encoding, Cigolle et al. 2014): worst case 0.63°
    instead of 0.94° for plain rounding. Candidates are scored through the decode table; the maths
    runs on separate x/y/z planes, several times faster in numpy than on (N, 3) rows.
    """
    n = np.asarray(normals, dtype=np.float32)
    shape = n.shape[:-1]
    x, y, z = (np.ascontiguousarray(n[..., i]).ravel() for i in range(3))
    l1 = np.maximum(np.abs(x) + np.abs(y) + np.abs(z), np.float32(1e-12))
    px, py = x / l1, y / l1
    lower = z < 0  # the lower hemisphere folds over the diagonals
    one = np.float32(1)
    fx = np.where(lower, (one - np.abs(py)) * np.where(px >= 0, one, -one), px)
    fy = np.where(lower, (one - np.abs(px)) * np.where(py >= 0, one, -one), py)
    low_u = np.clip(np.floor((fx + one) * np.float32(127.5)), 0, 254).astype(np.uint16)
    low_v = np.clip(np.floor((fy + one) * np.float32(127.5)), 0, 254).astype(np.uint16)
    base = low_u | (low_v << 8)
    lx, ly, lz = octahedral_table_planes()
    # comparing dot products only needs the target's direction, not its length

    def score(code):
        return lx.take(code) * x + ly.take(code) * y + lz.take(code) * z

    best_code, best_dot = base, score(base)
    for step in (1, 256, 257):  # (u+1, v), (u, v+1), (u+1, v+1)
        code = base + np.uint16(step)
        dot = score(code)
        better = dot > best_dot
        best_code = np.where(better, code, best_code)
        best_dot = np.where(better, dot, best_dot)
    return np.stack([best_code & 255, best_code >> 8], -1).astype(np.uint8).reshape(shape + (2,))


_OCT_LUT: np.ndarray | None = None


def _oct_lut() -> np.ndarray:
    """All 65536 octahedral codes decoded once (768 KB): decoding a map becomes one gather."""
    global _OCT_LUT
    if _OCT_LUT is None:
        code = np.arange(1 << 16)
        _OCT_LUT = oct_decode(np.stack([code & 255, code >> 8], -1).astype(np.uint8))
    return _OCT_LUT


@functools.lru_cache(maxsize=1)
def octahedral_table_planes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The decode table as contiguous x, y, z planes (float32 (65536,) each): for gathers."""
    lut = _oct_lut()
    return tuple(np.ascontiguousarray(lut[:, i]) for i in range(3))


def oct_decode(q: np.ndarray) -> np.ndarray:
    """Octahedral u8 pairs (..., 2) -> float32 unit vectors (..., 3)."""
    f = q.astype(np.float32) * (2 / 255.0) - 1
    x, y = f[..., 0], f[..., 1]
    z = 1 - np.abs(x) - np.abs(y)
    t = np.clip(-z, 0, None)
    x = x - np.where(x >= 0, t, -t)
    y = y - np.where(y >= 0, t, -t)
    v = np.stack([x, y, z], -1)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class Codes:
    """A map already turned into its stored codes, at label resolution: what ``to_codes`` returns
    and what an expert may hand over instead of a float map when it converts on its own device
    (``pipeline.labels_torch``). ``pack`` turns it into a member.

    ``codes``: uint8 (H, W) class ids for codec u8, uint16 (H, W) otherwise (quantised values or
    octahedral codes ``u | v << 8``). ``lo``/``hi``: the quantisation range of the u16q codecs
    (value = lo + code * (hi - lo) / 65535); unused by the others. ``histogram``: optionally, for
    seg, the 256-bin pixel count of ``codes`` (computed where the map was, so the host need not
    touch every pixel again for the manifest's class statistics).
    """
    kind: str
    codes: np.ndarray
    lo: float = 0.0
    hi: float = 0.0
    histogram: np.ndarray | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        codec = KINDS[self.kind][1] if self.kind in KINDS else None
        if codec is None:
            raise ValueError(f"unknown label kind {self.kind!r}; known: {sorted(KINDS)}")
        want = np.uint8 if codec == "u8" else np.uint16
        if self.codes.dtype != want or self.codes.ndim != 2:
            raise ValueError(f"{self.kind} codes must be {np.dtype(want).name} (H, W), "
                             f"got {self.codes.dtype} {self.codes.shape}")
        if self.histogram is not None and (codec != "u8" or np.shape(self.histogram) != (256,)):
            raise ValueError("a histogram (256 bins) only goes with seg codes")

    def class_pixels(self) -> np.ndarray:
        """int64 (256,): pixels per class id (seg codes only)."""
        if self.histogram is not None:
            return np.asarray(self.histogram, np.int64)
        return np.bincount(self.codes.ravel(), minlength=256).astype(np.int64)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]


def to_codes(kind: str, arr: np.ndarray) -> Codes:
    """A float map (or uint8 class map) of label ``kind`` -> its stored codes (host side)."""
    if kind not in KINDS:
        raise ValueError(f"unknown label kind {kind!r}; known: {sorted(KINDS)}")
    codec = KINDS[kind][1]
    arr = np.asarray(arr)
    _check_shape(kind, arr)
    if codec == "u8":
        if arr.dtype != np.uint8:
            raise ValueError(f"seg map must be uint8, got {arr.dtype}")
        return Codes(kind, np.ascontiguousarray(arr))
    if codec in ("u16q", "u16q_delta"):
        q, extra = _quantise16(arr)
        return Codes(kind, q, **extra)
    if not np.isfinite(arr).all():
        raise ValueError("normal map has NaN or Inf values")
    q = oct_encode(arr)
    return Codes(kind, q[..., 0].astype(np.uint16) | (q[..., 1].astype(np.uint16) << 8))


def _raw(c: Codes) -> np.ndarray:
    """Stored codes -> the bytes the zstd frame holds (as a contiguous array: zstd reads its buffer)."""
    codec = KINDS[c.kind][1]
    if codec == "u8":
        return np.ascontiguousarray(c.codes)
    q = _delta_rows(c.codes) if codec.endswith("_delta") else c.codes
    return _planes(q)


def _raw_size(codec: str, shape) -> int:
    pixels = shape[0] * shape[1]
    return pixels * {"u8": 1, "u16q": 2, "u16q_delta": 2, "oct16_delta": 2}[codec]


def _codes_from_raw(codec: str, raw, shape, rows: slice = slice(None), cols: slice = slice(None)) -> np.ndarray:
    if codec == "u8":
        return np.frombuffer(raw, np.uint8).reshape(shape)[rows, cols].copy()
    if codec == "u16q":
        return _unplanes(raw, shape, rows, cols)
    # vertical delta: a row needs every row above it and none below
    r0, r1, _ = rows.indices(shape[0])
    return _undelta_rows(_unplanes(raw, shape, slice(0, r1), cols), scratch=True)[r0:]  # wraps modulo 2**16


def quantisation(header: dict) -> tuple[np.float32, np.float32]:
    """(lo, scale) of a quantised member: value = lo + code * scale, computed in float32."""
    return np.float32(header["lo"]), np.float32((header["hi"] - header["lo"]) / Q16)


def octahedral_table() -> np.ndarray:
    """float32 (65536, 3): the unit vector of every octahedral code (code = u | v << 8)."""
    return _oct_lut()


def values_from_codes(header: dict, codes: np.ndarray) -> np.ndarray:
    """Stored codes (any crop or resampling of them) -> the label values ``decode`` returns. Nearest
    resampling commutes with this, so a loader can crop codes first and convert only what it keeps."""
    codec = header["codec"]
    if codec == "u8":
        return codes
    if codec in ("u16q", "u16q_delta"):
        return _dequantise16(codes, header)
    return np.take(_oct_lut(), codes, axis=0)


# ----------------------------------------------------------------------------------------------


def _check_shape(kind: str, arr: np.ndarray) -> tuple[int, int]:
    want_ndim = 3 if kind == "normal" else 2
    if arr.ndim != want_ndim or (kind == "normal" and arr.shape[-1] != 3):
        raise ValueError(f"{kind} map has shape {arr.shape}; expected (H, W{', 3' if kind == 'normal' else ''})")
    h, w = arr.shape[:2]
    if h < 1 or w < 1 or h * w > MAX_LABEL_PIXELS:
        raise ValueError(f"{kind} map of {h}x{w} is outside 1..{MAX_LABEL_PIXELS} pixels")
    return h, w


def encode(kind: str, arr: np.ndarray, *, image_size: tuple[int, int] | None = None,
           level: int = ZSTD_LEVEL) -> bytes:
    """Encode one map of label ``kind``. ``image_size`` (H, W) records the source image's size when
    the label is stored at a lower resolution; it defaults to the map's own shape."""
    return pack(to_codes(kind, arr), image_size=image_size, level=level)


_HEADER_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"))  # canonical: identical bytes
# zstd contexts are not thread-safe, and building one costs about a third of (de)compressing a small
# map: each thread keeps its own, for writing and for reading
_zstd = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = _zstd.__dict__.setdefault("compressors", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cache[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_zstd, "decompressor"):
        _zstd.decompressor = zstandard.ZstdDecompressor()
    return _zstd.decompressor


def pack(c: Codes, *, image_size: tuple[int, int] | None = None, level: int = ZSTD_LEVEL) -> bytes:
    """Stored codes -> member bytes (header + zstd frame)."""
    codec = KINDS[c.kind][1]
    h, w = c.shape
    if h < 1 or w < 1 or h * w > MAX_LABEL_PIXELS:
        raise ValueError(f"{c.kind} map of {h}x{w} is outside 1..{MAX_LABEL_PIXELS} pixels")
    header = {"kind": c.kind, "codec": codec, "shape": [h, w],
              "image_size": list(image_size) if image_size else [h, w]}
    if codec in ("u16q", "u16q_delta"):
        header.update(lo=float(c.lo), hi=float(c.hi))
    hjson = _HEADER_JSON.encode(header).encode()
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, len(hjson)) + hjson + _compressor(level).compress(_raw(c))


def read_header(data: bytes) -> tuple[dict, memoryview]:
    """Parse and validate a member's header; returns it and the zstd payload (not decompressed)."""
    if len(data) < _PREFIX.size:
        raise LabelFormatError("label member too short")
    magic, version, hlen = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise LabelFormatError("not a CLIPTeX label member (bad magic)")
    if version != FORMAT_VERSION:
        raise LabelFormatError(f"label format version {version} is not supported "
                               f"(this reader knows version {FORMAT_VERSION})")
    try:
        header = json.loads(bytes(data[_PREFIX.size:_PREFIX.size + hlen]))
        kind, codec = header["kind"], header["codec"]
        h, w = (int(s) for s in header["shape"])
    except (ValueError, KeyError, TypeError) as e:
        raise LabelFormatError(f"bad label header: {e}") from None
    if KINDS.get(kind, (None, None))[1] != codec:
        raise LabelFormatError(f"unknown kind/codec {kind}/{codec}")
    if not (0 < h and 0 < w and h * w <= MAX_LABEL_PIXELS):
        raise LabelFormatError(f"label shape {h}x{w} outside the allowed range")
    return header, memoryview(data)[_PREFIX.size + hlen:]


def decode_payload(header: dict, payload, rows: slice = slice(None), cols: slice = slice(None)) -> np.ndarray:
    """Stored codes of the window ``[rows, cols]`` (step-1 slices) of a member whose ``read_header``
    gave ``header`` and ``payload``: exactly ``decode_codes(data)[1][rows, cols]``, after the same
    checks (the whole frame is still decompressed and its size verified). A loader that crops pays
    for its window only: no row below it is un-deltaed, no column outside it interleaved."""
    if rows.step not in (None, 1) or cols.step not in (None, 1):
        raise ValueError("window slices must have step 1")
    codec, shape = header["codec"], tuple(header["shape"])
    expected = _raw_size(codec, shape)
    try:
        declared = zstandard.frame_content_size(payload)
    except zstandard.ZstdError as e:
        raise LabelFormatError(f"bad zstd frame: {e}") from None
    if declared != expected:
        # checked before decompressing: a bomb is refused without allocating its output
        raise LabelFormatError(f"payload declares {declared} bytes; shape {header['shape']} "
                               f"with codec {codec} allows exactly {expected}")
    try:
        raw = _decompressor().decompress(payload, max_output_size=expected)
    except zstandard.ZstdError as e:
        raise LabelFormatError(f"corrupt zstd payload: {e}") from None
    if len(raw) != expected:
        raise LabelFormatError("payload size does not match its header")
    return _codes_from_raw(codec, raw, shape, rows, cols)


def decode_codes(data: bytes) -> tuple[dict, np.ndarray]:
    """Header and stored codes (uint8 class ids, uint16 quantised values or octahedral codes) of a
    member, with every check ``decode`` makes. See ``values_from_codes``, and ``decode_payload`` for
    a window of the map."""
    header, payload = read_header(data)
    return header, decode_payload(header, payload)


def decode_with_header(data: bytes) -> tuple[dict, np.ndarray]:
    header, codes = decode_codes(data)
    return header, values_from_codes(header, codes)


def decode(member_name: str, data: bytes) -> np.ndarray:
    """Decode any label member: seg -> uint8 (H, W); depth, confidences -> float32 (H, W);
    normal -> float32 (H, W, 3) unit vectors."""
    _, kind = split_member_name(member_name)
    header, arr = decode_with_header(data)
    if header["kind"] != kind:
        raise LabelFormatError(f"member {member_name!r} holds a {header['kind']!r} map")
    return arr


def encode_sample(key: str, maps: dict[str, np.ndarray], image_size: tuple[int, int]) -> dict[str, dict[str, bytes]]:
    """Encode an expert's output maps; returns ``{task: {member_name: bytes}}``."""
    out: dict[str, dict[str, bytes]] = {}
    for kind, arr in maps.items():
        out.setdefault(task_of(kind), {})[member_name(key, kind)] = encode(kind, arr, image_size=image_size)
    return out


def box_starts(n_in: int, n_out: int, arange=np.arange):
    """Shrinking n_in pixels to n_out by box averaging: output i is the mean of the input pixels
    ``starts[i]:starts[i + 1]``, those whose centre lies in its footprint (i s, (i + 1) s],
    s = n_in / n_out. Integer arithmetic, so every pixel belongs to exactly one output and a centre
    on a footprint edge (n_in odd, n_out even ...) always goes the same way, on any device. PIL's
    BOX filter decides those ties by floating-point rounding, which also counts some such pixels
    twice. ``arange``: ``np.arange`` or a device's ``torch.arange`` (the device twin,
    ``expert_wrappers._torch.resize_on_device``)."""
    i = arange(n_out + 1)
    return (2 * n_in * i - n_out) // (2 * n_out) + 1  # first pixel with centre > i s; starts[n_out] == n_in


def _box_shrink(arr: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(H, W) float -> hw by ``box_starts`` runs, columns then rows (as PIL's two passes)."""
    out = arr.astype(np.float32, copy=False)
    for axis, n_out in ((1, hw[1]), (0, hw[0])):
        starts = box_starts(out.shape[axis], n_out)
        counts = np.diff(starts).astype(np.float32)
        out = np.add.reduceat(out, starts[:-1], axis=axis) / (counts[None, :] if axis == 1 else counts[:, None])
    return out


def resize_map(kind: str, arr: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Resize an expert's full-resolution map to the label resolution ``hw`` = (H, W):
    nearest for class ids, box-averaged (``box_starts``) for continuous maps when shrinking,
    bilinear when enlarging, renormalised for normals."""
    from PIL import Image

    if tuple(arr.shape[:2]) == tuple(hw):
        return arr
    size = (hw[1], hw[0])
    if kind == "seg":
        return np.asarray(Image.fromarray(arr).resize(size, Image.NEAREST))
    shrink = hw[0] <= arr.shape[0] and hw[1] <= arr.shape[1]

    def plane(a):
        if shrink:
            return _box_shrink(a, hw)
        return np.asarray(Image.fromarray(np.ascontiguousarray(a, np.float32), "F").resize(size, Image.BILINEAR))

    if kind != "normal":
        return plane(arr)
    # per-channel planes, renormalised without an (N, 3) norm: several times faster in numpy
    x, y, z = (plane(arr[..., c]) for c in range(3))
    inv = 1 / np.sqrt(np.maximum(x * x + y * y + z * z, np.float32(1e-12)))
    out = np.empty(tuple(hw) + (3,), np.float32)
    out[..., 0], out[..., 1], out[..., 2] = x * inv, y * inv, z * inv
    return out
