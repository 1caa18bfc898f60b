"""Where bytes live: local paths and object-store URLs behind one small interface.

Every location the project reads or writes — source shards, label tars, stats markers, the job
manifest, trainer checkpoints — is a string that is either a local path (``data/labels``,
``/shared/cc3m``, ``file:///shared/cc3m``) or an fsspec URL (``s3://bucket/cc3m``,
``gs://bucket/cc3m``; ``memory://`` in tests). Local paths use the operating system directly;
URLs go through fsspec (s3fs, gcsfs: the ``s3`` / ``gcs`` extras).

Guarantees, the same on disk and on a bucket:

* **No partial object under a final name.** ``write_bytes_atomic`` / ``open_write_atomic``: on a
  local filesystem a temporary file in the same folder, fsync, rename, fsync of the folder. Object
  stores have no rename; there an upload is already all-or-nothing — a single PUT stores the object
  only once its whole body (with its checksum) has arrived, and a multipart upload becomes visible
  only at CompleteMultipartUpload, after every part is in (s3fs aborts the upload when a part fails;
  a killed process leaves an invisible incomplete upload, which a bucket lifecycle rule
  ``AbortIncompleteMultipartUpload`` reclaims). GCS behaves the same (an object exists once its
  simple or resumable upload is finalised). So we write straight to the final key, and never via
  a temporary key plus copy (twice the requests, and temporary keys left behind by a kill).
  ``open_write_atomic`` spools to a local temporary file and uploads on success only.
* **Markers last.** Callers write a shard's outputs first and its completion marker last; S3 and
  GCS give read-after-write and list-after-write consistency, so a planner that sees a marker sees
  the objects it names.
* **Credentials from the standard places**: the AWS chain (environment, ``~/.aws`` profile,
  instance or pod role; ``AWS_ENDPOINT_URL_S3`` for S3-compatible servers), Google application
  default credentials. This module never reads, logs or puts them in a message; URLs are shown
  without any ``user:password@`` part.
* **One clear error before work starts**: ``check_readable`` / ``check_writable`` turn a missing
  bucket, a permission error, missing credentials or a missing backend into a ``StorageError``
  whose message fits on one line; CLIs print ``error: <message>`` and exit 2.

Everything else raises what fsspec / the OS raise (``FileNotFoundError``, ``PermissionError``, other
``OSError``).
"""
from __future__ import annotations

import contextlib
import glob as globmod
import hashlib
import io
import json
import os
import posixpath
import re
import tarfile
import tempfile
import uuid
from typing import BinaryIO, Iterator

from braceexpand import braceexpand

from cliptex_labels.tars import is_unsafe_name

CHUNK = 1 << 20
# s3fs / gcsfs upload a body of at least twice this size in parts of this size (multipart upload)
MULTIPART_CHUNK = 50 << 20
# which package serves a scheme, for the message when it is not installed
BACKENDS = {"s3": "s3fs (pip install 'cliptex[s3]')", "gs": "gcsfs (pip install 'cliptex[gcs]')"}
_ALIASES = {"gcs": "gs", "s3a": "s3"}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@")


class StorageError(RuntimeError):
    """A location that cannot be used (missing bucket, no permission, no credentials, no backend).
    The message is one line and never holds credentials."""


# ----------------------------------------------------------------------------------------------
# names


def scheme(location: str | os.PathLike) -> str:
    """``"s3"``, ``"gs"``, ``"memory"``, …; ``""`` for a local path (``file://`` included)."""
    m = _SCHEME.match(os.fspath(location))
    if not m:
        return ""
    s = m.group(1).lower()
    s = _ALIASES.get(s, s)
    return "" if s == "file" else s


def is_local(location: str | os.PathLike) -> bool:
    return scheme(location) == ""


def redact(location: str | os.PathLike) -> str:
    """The location as it may appear in a message: without a ``user:password@`` part."""
    return _USERINFO.sub(r"\1", os.fspath(location))


def normalize(location: str | os.PathLike) -> str:
    """One spelling per location: ``file://`` and ``~`` resolved to a local path, ``gcs://`` and
    ``s3a://`` to ``gs://`` / ``s3://``, duplicate and trailing slashes removed. A ``..`` segment
    in a URL is refused (object stores would take it literally), and so is a ``user:password@``
    part (credentials come from the standard places only; the message never shows them)."""
    text = os.fspath(location)
    if not text:
        raise ValueError("empty location")
    s = scheme(text)
    if not s:
        m = _SCHEME.match(text)
        local = text[m.end():] if m else text  # file:///x -> /x
        return os.path.normpath(os.path.expanduser(local))
    if _USERINFO.match(text):
        raise ValueError(f"{redact(text)}: credentials in a URL are not used; they come from the environment, "
                         f"a profile or an instance role (docs/STORAGE.md)")
    rest = text[_SCHEME.match(text).end():]
    parts = [p for p in rest.split("/") if p]
    if not parts:
        raise ValueError(f"{redact(text)}: no bucket or path after the scheme")
    if ".." in parts or "." in parts:
        raise ValueError(f"{redact(text)}: '.' and '..' segments are not allowed in a URL")
    return f"{s}://" + "/".join(parts)


def join(base: str | os.PathLike, *names: str) -> str:
    """``base`` / name / …, for both kinds; names are plain relative names (no ``..``)."""
    base = normalize(base)
    for n in names:
        if not n or n.startswith("/") or ".." in n.split("/"):
            raise ValueError(f"not a plain relative name: {n!r}")
    if is_local(base):
        return os.path.join(base, *names)
    return posixpath.join(base, *names)


def basename(location: str | os.PathLike) -> str:
    """The last name of a location (``s3://b/cc3m/00000.tar`` -> ``00000.tar``)."""
    location = normalize(location)
    return os.path.basename(location) if is_local(location) else posixpath.basename(location)


def stem(location: str | os.PathLike) -> str:
    """The last name without its extension (``00000.tar`` -> ``00000``): a shard's name."""
    return os.path.splitext(basename(location))[0]


def parent(location: str) -> str:
    location = normalize(location)
    if is_local(location):
        return os.path.dirname(location) or "."
    s = scheme(location)
    rest = location[len(s) + 3:]
    head = posixpath.dirname(rest)
    return f"{s}://{head}" if head else location


def expand(pattern: str | os.PathLike) -> list[str]:
    """Brace expansion (``s3://b/cc3m/{00000..00331}.tar``), each result normalised, in order."""
    return [normalize(p) for p in braceexpand(os.fspath(pattern))]


# ----------------------------------------------------------------------------------------------
# filesystems


def filesystem(location: str):
    """(fsspec filesystem, path inside it) for a URL. Listings are never cached: other processes
    (workers on other nodes) write into the same prefixes."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(normalize(location), use_listings_cache=False)
    except ImportError as e:
        s = scheme(location)
        need = BACKENDS.get(s, f"the fsspec backend for {s}://")
        raise StorageError(f"{redact(location)}: {s}:// locations need {need}") from e
    except ValueError as e:
        raise StorageError(f"{redact(location)}: {e}") from e


def _full(fs, path: str) -> str:
    return normalize(fs.unstrip_protocol(path))


# ----------------------------------------------------------------------------------------------
# reading


def exists(location: str) -> bool:
    if is_local(location):
        return os.path.exists(normalize(location))
    fs, path = filesystem(location)
    return fs.exists(path)


def size(location: str) -> int:
    """Bytes of a file / object; FileNotFoundError when there is none."""
    if is_local(location):
        return os.stat(normalize(location)).st_size
    fs, path = filesystem(location)
    info = fs.info(path)
    if info.get("type") == "directory":
        raise IsADirectoryError(redact(location))
    return int(info["size"])


def open_read(location: str) -> BinaryIO:
    """A binary file object for streaming reads (read-ahead buffered on object stores)."""
    if is_local(location):
        return open(normalize(location), "rb")
    fs, path = filesystem(location)
    return fs.open(path, "rb", block_size=8 * CHUNK, cache_type="readahead")


def read_bytes(location: str) -> bytes:
    with open_read(location) as f:
        return f.read()


def sha256(location: str) -> str:
    """Hex sha256 of the content, streamed in 1 MiB reads."""
    h = hashlib.sha256()
    with open_read(location) as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def listdir(location: str) -> dict[str, int]:
    """The files directly under a folder / prefix: {full location: size}, sorted by name. A folder
    or prefix that does not exist lists as empty; a missing bucket is FileNotFoundError."""
    location = normalize(location)
    if is_local(location):
        try:
            with os.scandir(location) as it:
                entries = {e.path: e.stat().st_size for e in it if e.is_file()}
        except (FileNotFoundError, NotADirectoryError):
            return {}
        return dict(sorted(entries.items()))
    fs, path = filesystem(location)
    try:
        found = fs.ls(path, detail=True)
    except FileNotFoundError:
        if not _bucket_exists(fs, path):
            raise
        return {}
    out = {_full(fs, e["name"]): int(e.get("size") or 0) for e in found if e.get("type") == "file"}
    return dict(sorted(out.items()))


def _bucket_exists(fs, path: str) -> bool:
    """Whether the first path segment (the bucket) exists; filesystems without buckets (those
    with a root folder, like memory://): True."""
    if fs.root_marker:
        return True
    bucket = path.split("/", 1)[0]
    try:
        return bool(fs.exists(bucket))
    except OSError:
        return False


def list_existing(pattern: str | os.PathLike) -> dict[str, int]:
    """The expansion of a brace pattern, restricted to the files that exist: {location: size}, in
    pattern order. One listing per distinct folder / prefix (not one request per name)."""
    wanted = expand(pattern)
    listed: dict[str, dict[str, int]] = {}
    out: dict[str, int] = {}
    for loc in wanted:
        folder = parent(loc)
        if folder not in listed:
            listed[folder] = listdir(folder)
        if loc in listed[folder]:
            out[loc] = listed[folder][loc]
    return out


def glob(pattern: str | os.PathLike) -> list[str]:
    """Shell-style wildcards (``*``, ``?``, ``[…]``) after brace expansion; sorted, no duplicates."""
    found: set[str] = set()
    for p in expand(pattern):
        if is_local(p):
            found.update(os.path.normpath(x) for x in globmod.glob(p) if os.path.isfile(x))
        else:
            fs, path = filesystem(p)
            found.update(_full(fs, x) for x in fs.glob(path) if fs.isfile(x))
    return sorted(found)


# ----------------------------------------------------------------------------------------------
# writing


SCRATCH_ENV = "CLIPTEX_SCRATCH"
# local spool files and copies of remote files: "cliptex-<pid>-…", so a later process can tell
# which ones a dead process left behind
_SPOOL = re.compile(r"^cliptex-(\d+)-")


def scratch_dir() -> str:
    """The local folder for spooled uploads and local copies of remote files: ``$CLIPTEX_SCRATCH``,
    else the system's temporary folder (``$TMPDIR``). Give it room for one shard's label tars per
    worker (job) and one shard's label tars per DataLoader worker (trainer)."""
    folder = os.environ.get(SCRATCH_ENV) or tempfile.gettempdir()
    os.makedirs(folder, exist_ok=True)
    return folder


def _spool_file(name: str) -> str:
    fd, path = tempfile.mkstemp(prefix=f"cliptex-{os.getpid()}-", suffix=f"-{name}", dir=scratch_dir())
    os.close(fd)
    return path


def remove_dead_spools() -> list[str]:
    """Remove the scratch files of processes that no longer exist (a killed worker's spooled
    tars); returns what was removed. Files of live processes are left alone."""
    removed = []
    folder = scratch_dir()
    for name in os.listdir(folder):
        m = _SPOOL.match(name)
        if not m or _alive(int(m.group(1))):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(folder, name))
            removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _fsync_dir(folder: str) -> None:
    """Make a rename durable: fsync the folder that holds the new name."""
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be opened / fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def local_tmp_name(path: str) -> str:
    """The temporary sibling a local atomic write uses: ``.<name>.tmp<pid>`` (a rerun finds and
    removes what a killed writer left with ``remove_stale_tmp``)."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.tmp{os.getpid()}")


def remove_stale_tmp(location: str | os.PathLike) -> None:
    """Temporary siblings a killed writer left next to ``location`` (never visible under a final
    name). Object stores have none: their writers spool in the scratch folder."""
    location = normalize(location)
    if not is_local(location):
        return
    folder, name = os.path.split(location)
    for p in globmod.glob(os.path.join(globmod.escape(folder or "."), f".{globmod.escape(name)}.tmp*")):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


def _publish(tmp: str, location: str) -> None:
    """A complete local file ``tmp`` becomes ``location``, whole: locally a fsync and a rename
    (made durable), on an object store one upload (an object appears only once its whole body is
    in, module doc). ``tmp`` is gone afterwards."""
    if is_local(location):
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, location)
        _fsync_dir(os.path.dirname(location) or ".")
        return
    fs, path = filesystem(location)
    try:
        fs.put_file(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _tmp_for(location: str) -> str:
    """Where a write to ``location`` goes first: the local temporary sibling, or a spool file in
    the scratch folder for an object store."""
    if is_local(location):
        os.makedirs(os.path.dirname(location) or ".", exist_ok=True)
        return local_tmp_name(location)
    return _spool_file(basename(location))


@contextlib.contextmanager
def atomic_path(location: str | os.PathLike) -> Iterator[str]:
    """For code that writes a file by name (a downloader, ``tarfile``): yields a local file name;
    on a normal exit that file becomes ``location`` whole (rename or upload), on an exception it is
    removed and ``location`` is untouched."""
    location = normalize(location)
    tmp = _tmp_for(location)
    try:
        yield tmp
        _publish(tmp, location)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def open_write_atomic(location: str | os.PathLike) -> Iterator[BinaryIO]:
    """Write a file / object through a binary file object. On a normal exit the content appears
    whole under ``location``; on an exception (or a killed process) nothing changes there.

    Local: a temporary sibling, fsync, rename, fsync of the folder. Object store: a spool file in
    the scratch folder, uploaded on success (one PUT, or a multipart upload completed only after
    its last part)."""
    with atomic_path(location) as tmp, open(tmp, "wb") as f:
        yield f


def write_bytes_atomic(location: str | os.PathLike, data: bytes) -> None:
    """``data`` under ``location``, all or nothing (see ``open_write_atomic``)."""
    location = normalize(location)
    if is_local(location):
        with open_write_atomic(location) as f:
            f.write(data)
        return
    fs, path = filesystem(location)
    data = data if isinstance(data, bytes) else bytes(data)
    if scheme(location) in ("s3", "gs"):
        fs.pipe_file(path, data, chunksize=MULTIPART_CHUNK)
    else:
        fs.pipe_file(path, data)


def write_json_atomic(location: str | os.PathLike, obj) -> None:
    write_bytes_atomic(location, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def write_text_atomic(location: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(location, text.encode())


def upload(local_file: str | os.PathLike, location: str | os.PathLike) -> None:
    """A copy of the local file ``local_file`` under ``location``, all or nothing (the file is kept)."""
    location = normalize(location)
    if is_local(location) and os.path.abspath(location) == os.path.abspath(local_file):
        return
    with open(local_file, "rb") as src, open_write_atomic(location) as dst:
        for chunk in iter(lambda: src.read(8 * CHUNK), b""):
            dst.write(chunk)


@contextlib.contextmanager
def local_copy(location: str | os.PathLike) -> Iterator[str]:
    """A local file name with the content of ``location``: the file itself when it is local, else
    a copy in the scratch folder, removed when the block ends (for readers that need a real file,
    e.g. ``pread`` on a label tar's members)."""
    location = normalize(location)
    if is_local(location):
        yield location
        return
    fs, path = filesystem(location)
    tmp = _spool_file(basename(location))
    try:
        fs.get_file(path, tmp)
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def remove(location: str | os.PathLike, missing_ok: bool = True) -> None:
    location = normalize(location)
    try:
        if is_local(location):
            os.unlink(location)
        else:
            fs, path = filesystem(location)
            if not missing_ok and not fs.exists(path):  # deleting a missing S3 key succeeds silently
                raise FileNotFoundError(redact(location))
            fs.rm_file(path)
    except FileNotFoundError:
        if not missing_ok:
            raise


def makedirs(location: str | os.PathLike) -> None:
    """A local folder (and its parents); nothing for an object store, where prefixes need none."""
    location = normalize(location)
    if is_local(location):
        os.makedirs(location, exist_ok=True)


# ----------------------------------------------------------------------------------------------
# an exclusive lock on an output location


class LockHeld(StorageError):
    """Another process holds the lock. ``holder``: what it recorded (host, pid, start time), if
    readable."""

    def __init__(self, message: str, holder: dict | None = None):
        super().__init__(message)
        self.holder = holder or {}


# a lock object on a bucket is a lease: its holder rewrites it every RENEW_SECONDS; one not
# rewritten for LEASE_SECONDS belongs to a holder that is gone (a killed driver) and is taken over
LEASE_SECONDS = 600.0
RENEW_SECONDS = 60.0


@contextlib.contextmanager
def exclusive(location: str | os.PathLike, owner: dict | None = None, *,
              lease_seconds: float = LEASE_SECONDS, renew_seconds: float = RENEW_SECONDS) -> Iterator[None]:
    """Hold the lock ``location`` for the duration of the block, or raise ``LockHeld`` at once.

    Local: ``flock`` on that file (the OS releases it when the holder dies). Object store: an
    object created with a conditional write (S3 ``If-None-Match: *``; fsspec's ``mode="create"``),
    so of two processes creating it exactly one succeeds. It holds ``owner`` (host, pid, start
    time), is rewritten every ``renew_seconds`` while held, and is removed at the end. On S3, a lock
    object not rewritten for ``lease_seconds`` (its holder was killed) is taken over with a write
    conditional on its ETag (``If-Match``), so of two processes taking it over one succeeds; on
    other stores such a lock must be removed by hand (the message names it)."""
    import fcntl
    import socket
    import time

    location = normalize(location)
    shown = redact(location)
    owner = {"host": socket.gethostname(), "pid": os.getpid(),
             "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(owner or {})}
    if is_local(location):
        os.makedirs(os.path.dirname(location) or ".", exist_ok=True)
        with open(location, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = _parse_owner(f.read())
                raise LockHeld(f"{shown} is held by {_describe_owner(holder)}", holder) from None
            f.seek(0)
            f.truncate()
            f.write(json.dumps(owner) + "\n")
            f.flush()
            yield
        return
    lease = _Lease(location, owner, lease_seconds)
    lease.acquire()
    renewer = _Renewer(lease, renew_seconds)
    try:
        yield
    finally:
        renewer.stop()
        lease.release()


class _Lease:
    """The lock object of ``exclusive`` on an object store."""

    def __init__(self, location: str, owner: dict, lease_seconds: float):
        self.location, self.owner, self.lease_seconds = location, owner, lease_seconds
        self.fs, self.path = filesystem(location)
        self.s3 = scheme(location) == "s3"
        self.etag: str | None = None
        self.lost = False

    def _body(self) -> bytes:
        import time

        # to the millisecond: each renewal is a new body (so a new ETag), also within one second
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
        return (json.dumps({**self.owner, "renewed": stamp}) + "\n").encode()

    def _put(self, **condition) -> None:
        out = self.fs.pipe_file(self.path, self._body(), **condition)
        self.etag = out.get("ETag") if isinstance(out, dict) else None

    def acquire(self) -> None:
        import time

        shown = redact(self.location)
        try:
            self._put(mode="create")
            return
        except FileExistsError:
            pass
        except TypeError as e:  # a backend whose pipe_file predates fsspec's mode="create"
            raise StorageError(f"{shown}: the {scheme(self.location)}:// backend cannot create an object only if "
                               f"absent (fsspec pipe_file mode='create'); update it") from e
        info, holder = {}, {}
        with contextlib.suppress(Exception):  # noqa: BLE001 - the message is informative either way
            info = self.fs.info(self.path)
            holder = _parse_owner(read_bytes(self.location).decode())
        modified = info.get("LastModified")
        age = time.time() - modified.timestamp() if hasattr(modified, "timestamp") else None
        if self.s3 and age is not None and age >= self.lease_seconds and info.get("ETag"):
            try:  # the holder stopped renewing: take over, unless another process did first
                self._put(IfMatch=info["ETag"])
                return
            except (FileExistsError, FileNotFoundError, OSError):
                pass
        how = (f"it is taken over once not renewed for {self.lease_seconds:.0f} s" if self.s3 else
               f"if that process is gone, remove {shown} and rerun")
        raise LockHeld(f"{shown} is held by {_describe_owner(holder)} ({how})", holder)

    def renew(self) -> None:
        if self.lost:
            return
        try:
            self._put(**({"IfMatch": self.etag} if self.s3 and self.etag else {}))
        except (FileExistsError, FileNotFoundError, OSError):
            self.lost = True  # taken over after we failed to renew in time: leave it to its new holder

    def release(self) -> None:
        if self.lost:
            return
        with contextlib.suppress(Exception):  # noqa: BLE001 - the lock is only ours if its ETag is
            if self.s3 and self.etag and self.fs.info(self.path).get("ETag") != self.etag:
                return
            remove(self.location)


class _Renewer:
    """A daemon thread renewing a lease every ``seconds`` until stopped."""

    def __init__(self, lease: _Lease, seconds: float):
        import threading

        self.lease, self.seconds = lease, seconds
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="cliptex-lock-renewer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(self.seconds):
            self.lease.renew()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()


def _parse_owner(text: str) -> dict:
    try:
        doc = json.loads(text)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _describe_owner(holder: dict) -> str:
    if not holder:
        return "another process"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}"


# ----------------------------------------------------------------------------------------------
# preflight: one clear error before any work starts


def _why(e: BaseException) -> str:
    """One line for an I/O failure, without credentials (service messages never carry them)."""
    if isinstance(e, PermissionError):
        kind = "permission denied"
    elif isinstance(e, FileNotFoundError):
        kind = "not found"
    elif type(e).__name__ == "NoCredentialsError":
        kind = "no credentials found (environment, profile or instance role)"
    else:
        kind = type(e).__name__
    detail = " ".join(str(e).split())
    if isinstance(e, FileNotFoundError) and " " not in detail:
        detail = ""  # just the backend's path again
    detail = detail if len(detail) <= 200 else detail[:199] + "…"
    return f"{kind}: {detail}" if detail and detail.lower() != kind else kind


def error(verb: str, location: str | os.PathLike, e: BaseException) -> StorageError:
    """A ``StorageError`` for a failed I/O call: ``cannot <verb> <location>: <why>`` on one line."""
    return StorageError(f"cannot {verb} {redact(location)}: {_why(e)}")


def check_readable(location: str | os.PathLike) -> None:
    """Raise StorageError unless ``location`` (a file, a folder / prefix, or a bucket) can be read:
    the bucket exists, credentials work, listing or reading is allowed, and something is there."""
    shown = redact(location)
    try:
        location = normalize(location)
        if is_local(location):
            if not os.path.exists(location):
                raise StorageError(f"cannot read {shown}: no such file or folder")
            if not os.access(location, os.R_OK):
                raise StorageError(f"cannot read {shown}: permission denied")
            return
        fs, path = filesystem(location)
        if fs.isfile(path):
            with fs.open(path, "rb") as f:
                f.read(1)
            return
        if not fs.ls(path):
            raise StorageError(f"cannot read {shown}: nothing there")
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001 - every backend failure becomes one clear line
        raise error("read", shown, e) from e


def check_writable(location: str | os.PathLike) -> None:
    """Raise StorageError unless objects can be created and deleted under the folder / prefix
    ``location``: writes and removes one small probe object there (a local folder is created)."""
    shown = redact(location)
    probe = None
    try:
        location = normalize(location)
        if is_local(location):
            os.makedirs(location, exist_ok=True)
        probe = join(location, f".cliptex-write-check-{uuid.uuid4().hex}")
        write_bytes_atomic(probe, b"")
        remove(probe, missing_ok=False)
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001
        what = "delete in" if probe is not None and _exists_quietly(probe) else "write to"
        raise error(what, shown, e) from e


def _exists_quietly(location: str) -> bool:
    try:
        return exists(location)
    except Exception:  # noqa: BLE001
        return False


# ----------------------------------------------------------------------------------------------
# deterministic tars


def tarinfo(name: str, size: int) -> tarfile.TarInfo:
    """A member header with fixed metadata (mtime 0, root-owned, 0644): identical content gives
    identical tar bytes."""
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = size, 0, 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


class AtomicTarWriter:
    """A deterministic tar (GNU format, ``tarinfo`` headers) streamed to a local file — the
    temporary sibling of a local ``location``, or a spool file in the scratch folder for an object
    store. ``finish`` closes and fsyncs it, still unpublished; ``commit`` publishes it (rename, or
    upload), so a shard's tars can all be complete locally before the first one becomes visible;
    ``abort`` removes it. ``suffixes`` collects the member suffixes written (``"depth.lbl"``, ...)."""

    def __init__(self, location: str | os.PathLike):
        self.location = normalize(location)
        self.tmp = _tmp_for(self.location)
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
        """Publish; returns {"sha256", "bytes", "members"} of the published content (hashed from
        the local file: an upload is checked by the store against its own checksum)."""
        done = {"sha256": sha256(self.tmp), "bytes": os.path.getsize(self.tmp), "members": self.members}
        _publish(self.tmp, self.location)
        return done

    def abort(self) -> None:
        try:
            if not self._f.closed:
                self._f.close()
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp)


def write_tar_atomic(location: str | os.PathLike, members) -> tuple[str, int]:
    """A deterministic tar of (name, bytes) in order, written atomically. Returns (sha256, size)."""
    w = AtomicTarWriter(location)
    try:
        for name, data in members:
            w.add(name, data)
        w.finish()
        done = w.commit()
    except BaseException:
        w.abort()
        raise
    return done["sha256"], done["bytes"]
