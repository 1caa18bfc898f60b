"""Reading the project's tars safely: source shards (img2dataset's webdataset layout) as samples, and
label tars by key.

Names inside a tar are only parsed, never used as file-system paths; member bodies are bounded.
``iter_records`` gives every sample of a source shard exactly once — as a ``Record`` or as a ``Skip``
with its reason — so a consumer can account for each one. ``LabelTar`` reads a label tar through an
index of its member headers, hands each key's members out at most once and reports the keys nobody
asked for. Only the standard library and this package are used here.
"""
from __future__ import annotations

import functools
import os
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator, Sequence

from .format import KINDS, LabelFormatError, split_member_name, split_name

# Tar member bodies are read into memory: refuse anything absurd for an image-text sample.
MAX_MEMBER_BYTES = 64 << 20

# Why a source sample is not used. A skip with key None is damage to the shard itself, not a sample.
SKIP_REASONS = {
    "empty_tar": "the shard holds no members (shard damage, not a sample)",
    "truncated_tar": "the tar ends or breaks mid-archive; samples before the damage were kept (shard damage)",
    "incomplete_sample": "the tar broke while this sample's members were being read",
    "unsafe_member_name": "a member name is absolute or contains '..'",
    "not_a_file": "a member is a directory, link or device",
    "member_too_large": "a member is larger than MAX_MEMBER_BYTES",
    "duplicate_key": "a key seen earlier in the shard appears again (the first sample keeps it)",
    "duplicate_member": "a member name appears twice in one sample (e.g. 000010.jpg twice): which "
                        "copy belongs to the sample is unknowable",
    "missing_image": "no image member for this key",
    "empty_image": "zero-byte image",
    "not_an_image": "image bytes are not a known image format",
    "truncated_image": "image data ends early or is corrupt",
    "decompression_bomb": "image has more pixels than the configured cap",
    "missing_caption": "no .txt caption",
    "invalid_caption": "caption is not valid UTF-8 or is empty",
}
SHARD_DAMAGE = ("empty_tar", "truncated_tar")


@dataclass
class Record:
    """Raw members of one sample, by suffix (``jpg``, ``txt``, ``json``, ...), in tar order."""
    key: str
    members: dict[str, bytes] = field(default_factory=dict)


@dataclass
class Skip:
    key: str | None  # None when the damage is not tied to one sample (empty or truncated tar)
    reason: str
    detail: str = ""

    def as_dict(self) -> dict:
        return {"key": self.key, "reason": self.reason, "detail": self.detail}


def is_unsafe_name(name: str) -> bool:
    """A name that would escape a directory if someone extracted the tar: never extracted here, but
    such a member marks a hostile archive."""
    return name.startswith(("/", "~")) or ".." in name.split("/") or "\\" in name


class _Group:
    """The members of one key as the walk finds them; the first problem decides the sample's fate
    (later bodies of a doomed sample are not even read)."""

    def __init__(self, key: str, duplicate: bool):
        self.key = key
        self.members: dict[str, bytes] = {}
        self.problem: tuple[str, str] | None = ("duplicate_key", key) if duplicate else None

    def add(self, tar: tarfile.TarFile, info: tarfile.TarInfo, ext: str, max_member_bytes: int) -> None:
        if self.problem is None:
            name = info.name
            if is_unsafe_name(name):
                self.problem = ("unsafe_member_name", name)
            elif not info.isfile():
                self.problem = ("not_a_file", name)
            elif info.size > max_member_bytes:
                self.problem = ("member_too_large", f"{name}: {info.size} bytes")
            elif ext in self.members:
                self.problem = ("duplicate_member", name)
        if self.problem is None:
            self.members[ext] = tar.extractfile(info).read()

    def result(self) -> Record | Skip:
        return Skip(self.key, *self.problem) if self.problem else Record(self.key, self.members)


def iter_records(source: str | os.PathLike | BinaryIO, max_member_bytes: int | None = None
                 ) -> Iterator[Record | Skip]:
    """One ``Record`` or one ``Skip`` per sample of a source shard, in tar order. ``source``: a
    path, or a binary stream read once from start to end (e.g. an object-store file; it is not
    closed here). A sample is a run of consecutive members sharing a key (webdataset's grouping,
    ``format.split_name``). Damage ends the walk: the sample being read then is skipped
    (``incomplete_sample``: more of its members may have followed), and a ``Skip`` with key None
    says what happened to the shard."""
    max_member_bytes = MAX_MEMBER_BYTES if max_member_bytes is None else max_member_bytes
    seen: set[str] = set()
    group: _Group | None = None
    n_members = 0
    stream = hasattr(source, "read")
    try:
        with tarfile.open(fileobj=source if stream else None, name=None if stream else source,
                          mode="r|*") as tar:
            for info in tar:
                n_members += 1
                key, ext = split_name(info.name)
                if group is not None and key != group.key:
                    yield group.result()
                    group = None
                if group is None:
                    group = _Group(key, duplicate=key in seen)
                    seen.add(key)
                group.add(tar, info, ext, max_member_bytes)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        if group is not None:
            yield Skip(group.key, "incomplete_sample", f"the tar broke inside this sample: {e}")
        if n_members == 0 and "empty" in str(e).lower():
            yield Skip(None, "empty_tar", str(e))
        else:
            yield Skip(None, "truncated_tar", f"after {n_members} members: {e}")
        return
    if group is not None:
        yield group.result()
    if n_members == 0:
        yield Skip(None, "empty_tar", "no members")


# ----------------------------------------------------------------------------------------------
# label tars


@dataclass(frozen=True)
class LabelIndex:
    """Where each key's members are in a label tar (from the member headers alone)."""
    members: dict[str, dict[str, tuple[int, int]]]  # key -> kind -> (offset, size), keys in tar order
    duplicates: frozenset[str]  # keys with a repeated member: unusable, which copy is right is unknowable
    foreign: tuple[str, ...]    # members that are not label members (names only)
    damage: str | None          # why the index stops early, if it does

    @property
    def kinds(self) -> tuple[str, ...]:
        """Every kind the tar holds (in ``format.KINDS`` order): the writer gives every labelled
        sample of a tree the same kinds, so a key without one of them is incomplete."""
        present = {k for entry in self.members.values() for k in entry}
        return tuple(k for k in KINDS if k in present)


@functools.lru_cache(maxsize=32)
def _cached_index(path: str, version: tuple[int, int, int]) -> LabelIndex:
    members: dict[str, dict[str, tuple[int, int]]] = {}
    duplicates: set[str] = set()
    foreign: list[str] = []
    damage = None
    file_size = version[2]
    try:
        # "r:" (no compression): member offsets must be file offsets, for pread
        with tarfile.open(path, mode="r:") as tar:
            for m in tar:
                try:
                    if not m.isreg():
                        raise LabelFormatError(m.name)
                    key, kind = split_member_name(m.name)
                except LabelFormatError:
                    foreign.append(m.name)
                    continue
                if m.offset_data + m.size > file_size:
                    damage = f"{m.name} is cut short"
                    break
                entry = members.setdefault(key, {})
                if kind in entry:
                    duplicates.add(key)
                entry.setdefault(kind, (m.offset_data, m.size))
    except (tarfile.TarError, OSError, EOFError) as e:
        damage = f"unreadable after {len(members)} keys: {e}"
    return LabelIndex(members, frozenset(duplicates), tuple(foreign), damage)


def label_index(path: str | os.PathLike) -> LabelIndex:
    """The index of a label tar, read from its headers only (tarfile seeks over the bodies). Cached
    per process by (path, inode, mtime, size) — an atomic rewrite is a new inode — since resampled
    training streams reopen the same shards."""
    st = os.stat(path)
    return _cached_index(os.fspath(path), (st.st_ino, st.st_mtime_ns, st.st_size))


_pread = getattr(os, "pread", None)


class LabelTar:
    """One label tar, read by key: the one reader of label tars (trainer, preview, export and
    third-party code use it). ``take`` hands a key's members out once; ``extra`` lists the keys
    nobody took. Nothing is matched by position. Use as a context manager, or call ``close``."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.taken: set[str] = set()
        self._f = None
        try:
            self.index = label_index(self.path)
            self._f = open(self.path, "rb", buffering=0)
        except OSError as e:
            self.index = LabelIndex({}, frozenset(), (), f"cannot open {self.path}: {e}")

    @property
    def damage(self) -> str | None:
        return self.index.damage

    def keys(self) -> list[str]:
        """Keys in tar order."""
        return list(self.index.members)

    def kinds(self, key: str) -> tuple[str, ...]:
        return tuple(self.index.members.get(key, ()))

    def read(self, key: str, kind: str) -> bytes:
        """One member's bytes (KeyError if absent; OSError if the file cannot deliver them)."""
        offset, size = self.index.members[key][kind]
        if self._f is None:
            raise OSError(f"{self.path} is not open")
        if _pread is not None:
            data = _pread(self._f.fileno(), size, offset)
        else:  # pragma: no cover - platforms without pread
            self._f.seek(offset)
            data = self._f.read(size)
        if len(data) != size:
            raise OSError(f"{self.path}: {key}.{kind} is cut short ({len(data)} of {size} bytes)")
        return data

    def take(self, key: str, kinds: Sequence[str] | None = None) -> dict[str, bytes] | str:
        """The members of ``key`` — the ``kinds`` given (default: every kind the tar holds), each
        required — or the reason there are none: ``"missing"``, ``"duplicate_key"`` (taken
        before), ``"duplicate_label_member"`` or ``"label_read_error"``."""
        if key in self.taken:
            return "duplicate_key"
        entry = self.index.members.get(key)
        if entry is None:
            return "missing"
        self.taken.add(key)
        if key in self.index.duplicates:
            return "duplicate_label_member"
        wanted = self.index.kinds if kinds is None else kinds
        if any(k not in entry for k in wanted):
            return "missing"
        try:
            return {k: self.read(key, k) for k in wanted}
        except OSError:
            return "label_read_error"

    def claim(self, key: str) -> None:
        """The source has ``key`` but cannot use it: its members are not reported as extra."""
        self.taken.add(key)

    def extra(self) -> list[str]:
        """Keys nobody took, in tar order."""
        return [k for k in self.index.members if k not in self.taken]

    def items(self) -> Iterator[tuple[str, dict[str, bytes]]]:
        """(key, {kind: bytes}) for every key, in tar order (keys with repeated members left out:
        see ``index.duplicates``)."""
        for key, entry in self.index.members.items():
            if key not in self.index.duplicates:
                yield key, {k: self.read(key, k) for k in entry}

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> LabelTar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
