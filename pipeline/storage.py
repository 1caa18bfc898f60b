"""Local atomic writes and file checksums: the one place the project writes files that must never be
seen half-written (label tars, stats markers, manifests, checkpoints, downloaded weights, caches).

Every write goes to a temporary name next to the final path (``.<name>.tmp<pid>``), is flushed and
fsynced, then renamed over the final path: a reader sees the previous file or the whole new one,
and a failure (or a killed process) leaves at most a temporary file that a later run removes.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import IO, Iterable, Iterator

from cliptex_labels.tars import is_unsafe_name


def tmp_path_for(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _fsync_path(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = True) -> Iterator[Path]:
    """For writers that want a file name (downloaders, libraries): yields the temporary path; when
    the block ends without error the file there is fsynced and renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        yield tmp
        if fsync:
            _fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, fsync: bool = True) -> Iterator[IO[bytes]]:
    """``with atomic_file(p) as f: f.write(...)``: ``p`` appears, complete, when the block ends."""
    with atomic_path(path, fsync=False) as tmp, open(tmp, "wb") as f:
        yield f
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def write_bytes_atomic(path: str | os.PathLike, data: bytes, fsync: bool = True) -> None:
    with atomic_file(path, fsync=fsync) as f:
        f.write(data)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def sha256_file(path: str | os.PathLike, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def tarinfo(name: str, size: int) -> tarfile.TarInfo:
    """A member header with fixed metadata (mtime 0, root-owned, 0644): identical content gives
    identical tar bytes."""
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = size, 0, 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


class AtomicTarWriter:
    """A deterministic tar (GNU format, ``tarinfo`` headers) streamed to a temporary file next to
    ``path``. ``finish`` closes and fsyncs it, still under its temporary name; ``commit`` renames it
    into place (so several tars can all be complete on disk before the first becomes visible);
    ``abort`` removes it. ``suffixes`` collects the member suffixes written (``"depth.lbl"``, ...)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp_path_for(self.path)
        self._f = open(self.tmp, "wb")
        self._tar = tarfile.open(fileobj=self._f, mode="w", format=tarfile.GNU_FORMAT)
        self.members = 0
        self.suffixes: set[str] = set()

    def add(self, name: str, data: bytes) -> None:
        if is_unsafe_name(name):
            raise ValueError(f"refusing to write unsafe member name {name!r}")
        self._tar.addfile(tarinfo(name, len(data)), io.BytesIO(data))
        self.members += 1
        self.suffixes.add(name.rpartition("/")[2].partition(".")[2])

    def finish(self) -> None:
        self._tar.close()
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def commit(self) -> dict:
        """Rename into place; returns {"sha256", "bytes", "members"} of the final file."""
        os.replace(self.tmp, self.path)
        return {"sha256": sha256_file(self.path), "bytes": self.path.stat().st_size, "members": self.members}

    def abort(self) -> None:
        try:
            if not self._f.closed:
                self._f.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def write_tar_atomic(path: str | os.PathLike, members: Iterable[tuple[str, bytes]]) -> tuple[str, int]:
    """A deterministic tar of (name, bytes) in order, written atomically. Returns (sha256, size)."""
    w = AtomicTarWriter(path)
    try:
        for name, data in members:
            w.add(name, data)
        w.finish()
        done = w.commit()
    except BaseException:
        w.abort()
        raise
    return done["sha256"], done["bytes"]
