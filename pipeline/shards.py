"""Shard I/O: a forgiving reader for img2dataset shards and an atomic, deterministic tar writer.

Reading is split in two so decoding can run on a thread pool: ``iter_records`` walks the tar and
groups members by key (cheap, sequential); ``decode_record`` turns one record into a ``Sample`` or a
``Skip`` (JPEG decode, caption checks). Neither ever raises on bad data: every sample that cannot be
used comes back as a ``Skip`` with a reason from ``SKIP_REASONS``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# A CC3M image is ~0.2 MPix; 64 MPix leaves room for big originals while refusing bombs.
DEFAULT_MAX_PIXELS = 64_000_000
# Tar member bodies are read into memory: refuse anything absurd for an image-text sample.
MAX_MEMBER_BYTES = 64 << 20

SKIP_REASONS = {
    "empty_tar": "the shard holds no members",
    "truncated_tar": "the tar ends or breaks mid-archive; samples before the damage were kept",
    "unsafe_member_name": "member name is absolute or contains '..'",
    "not_a_file": "member is a directory, link or device",
    "member_too_large": "member is larger than MAX_MEMBER_BYTES",
    "duplicate_key": "a key seen earlier in the shard appears again",
    "missing_image": "no image member for this key",
    "empty_image": "zero-byte image",
    "not_an_image": "image bytes are not a known image format",
    "truncated_image": "image data ends early or is corrupt",
    "decompression_bomb": "image has more pixels than the configured cap",
    "missing_caption": "no .txt caption",
    "invalid_caption": "caption is not valid UTF-8 or is empty",
}


@dataclass
class Record:
    """Raw members of one key, in tar order (no decoding done yet)."""
    key: str
    members: dict[str, bytes] = field(default_factory=dict)  # extension -> bytes


@dataclass
class Sample:
    key: str
    image: np.ndarray  # uint8 (H, W, 3) RGB, EXIF orientation applied
    caption: str
    meta: dict
    image_bytes: bytes
    source_mode: str  # PIL mode before conversion to RGB (e.g. "CMYK", "L", "I;16")


@dataclass
class Skip:
    key: str | None  # None when the damage is not tied to one sample (empty or truncated tar)
    reason: str
    detail: str = ""

    def as_dict(self) -> dict:
        return {"key": self.key, "reason": self.reason, "detail": self.detail}


def _is_unsafe(name: str) -> bool:
    return name.startswith("/") or ".." in name.split("/") or "\\" in name or name.startswith("~")


def split_name(name: str) -> tuple[str, str]:
    """webdataset's convention: the key is everything before the first '.' of the base name."""
    dirname, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(dirname, stem) if dirname else stem), ext.lower()


def iter_records(path: str | os.PathLike) -> Iterator[Record | Skip]:
    """Group a tar's members by key, in tar order. Damage ends the walk with a ``Skip``; records
    completed before it are still yielded."""
    seen: set[str] = set()
    current: Record | None = None
    n_members = 0
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for info in tar:
                n_members += 1
                name = info.name
                if _is_unsafe(name):
                    yield Skip(name, "unsafe_member_name", name)
                    continue
                if not info.isfile():
                    yield Skip(name, "not_a_file", name)
                    continue
                key, ext = split_name(name)
                if info.size > MAX_MEMBER_BYTES:
                    yield Skip(key, "member_too_large", f"{name}: {info.size} bytes")
                    continue
                data = tar.extractfile(info).read()
                if current is not None and key != current.key:
                    yield current
                    current = None
                if current is None:
                    if key in seen:
                        yield Skip(key, "duplicate_key", name)
                        continue
                    seen.add(key)
                    current = Record(key)
                current.members[ext] = data
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        if current is not None:
            yield current
            current = None
        if n_members == 0 and "empty" in str(e).lower():
            yield Skip(None, "empty_tar", str(e))
        else:
            yield Skip(None, "truncated_tar", f"after {n_members} members: {e}")
        return
    if current is not None:
        yield current
    if n_members == 0:
        yield Skip(None, "empty_tar", "no members")


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, str]:
    """Bytes -> decoded RGB PIL image with EXIF orientation applied, and the source mode.
    Raises ``ValueError(reason)``. Consumers that resize next (the trainer) stay in PIL."""
    if not data:
        raise ValueError("empty_image")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ValueError("not_an_image") from None
    except Image.DecompressionBombError as e:  # PIL's own cap, above ours
        raise ValueError("decompression_bomb", str(e)) from None
    except (OSError, SyntaxError) as e:  # PIL raises SyntaxError for some broken headers
        raise ValueError("truncated_image", str(e)) from None
    w, h = img.size
    if w * h > max_pixels:  # checked on the header, before any pixel is decoded
        raise ValueError("decompression_bomb", f"{w}x{h} > {max_pixels} pixels")
    mode = img.mode
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        if mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit grey: scale to 8 bits instead of PIL's clipping conversion
            arr = np.asarray(img, dtype=np.uint32)
            arr = (arr >> 8).astype(np.uint8) if arr.max() > 255 else arr.astype(np.uint8)
            return Image.fromarray(arr).convert("RGB"), mode
        if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
            # composite on white: transparent regions are background in web images
            rgba = img.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(canvas, rgba)
        return (img if img.mode == "RGB" else img.convert("RGB")), mode
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError("truncated_image", str(e)) from None


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, str]:
    """Bytes -> RGB uint8 array (H, W, 3) with EXIF orientation applied. Raises ``ValueError(reason)``."""
    img, mode = open_image(data, max_pixels)
    return np.ascontiguousarray(np.asarray(img)), mode


def decode_record(record: Record, max_pixels: int = DEFAULT_MAX_PIXELS) -> Sample | Skip:
    ext = next((e for e in IMAGE_EXTS if e in record.members), None)
    if ext is None:
        return Skip(record.key, "missing_image", ",".join(sorted(record.members)))
    try:
        image, mode = decode_image(record.members[ext], max_pixels)
    except ValueError as e:
        return Skip(record.key, e.args[0], e.args[1] if len(e.args) > 1 else "")
    if "txt" not in record.members:
        return Skip(record.key, "missing_caption")
    try:
        caption = record.members["txt"].decode("utf-8").strip()
    except UnicodeDecodeError as e:
        return Skip(record.key, "invalid_caption", str(e))
    if not caption:
        return Skip(record.key, "invalid_caption", "empty caption")
    try:
        meta = json.loads(record.members.get("json", b"{}"))
    except ValueError:
        meta = {}  # img2dataset metadata is informative only; a bad one does not cost the sample
    return Sample(record.key, image, caption, meta if isinstance(meta, dict) else {},
                  record.members[ext], mode)


def iter_samples(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[Sample | Skip]:
    for item in iter_records(path):
        yield item if isinstance(item, Skip) else decode_record(item, max_pixels)


# ----------------------------------------------------------------------------------------------
# writing


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    # fixed metadata -> identical bytes for identical content
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = size, 0, 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def tmp_path_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def tar_bytes(members: Iterable[tuple[str, bytes]]) -> bytes:
    """A deterministic tar (GNU format, mtime 0, root-owned, 0644) of (name, bytes) in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            if _is_unsafe(name):
                raise ValueError(f"refusing to write unsafe member name {name!r}")
            tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
    return buf.getvalue()


def write_tar_atomic(path: str | os.PathLike, members: Iterable[tuple[str, bytes]]) -> tuple[str, int]:
    """Write a tar under a temporary name and rename it into place: a reader never sees a partial
    shard under its final name. Returns (sha256, size)."""
    data = tar_bytes(members)
    write_bytes_atomic(path, data)
    return hashlib.sha256(data).hexdigest(), len(data)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
