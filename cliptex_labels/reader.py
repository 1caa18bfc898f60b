"""Reading label trees together with their source shards.

- ``join_shard``: the strict key join of one source shard with any subset of its label tars — raw
  bytes, no decoding (what a training loader wants before it crops).
- ``samples``: decoded samples ``{key, image, caption, seg, depth, normal, normal_conf, ...}`` of
  many shards.
- ``wds_decoder``: a webdataset ``.decode()`` handler for label members.

A source sample is joined to a tree's members only through its own key, and only once: a repeated
key or a repeated member (source or label side) skips the sample with a reason, never joins it to
another sample's labels. Everything not joined is accounted for in a ``JoinReport``.
"""
from __future__ import annotations

import glob
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator, Mapping, Sequence

from . import format as F
from .tars import SKIP_REASONS, LabelTar, Record, Skip, iter_records


def join_reasons(tasks: Sequence[str] = F.TASKS) -> dict[str, str]:
    """Every reason a join (and ``samples``) can give for a skip, with what it means."""
    out = dict(SKIP_REASONS)
    out["duplicate_label_member"] = "a label tar repeats a member of this key: its labels are unusable"
    out["label_read_error"] = "a label tar is damaged or unreadable (key None), or a member could not be read"
    for t in tasks:
        out[f"missing_{t}"] = f"the {t} tree has no (complete) members for this key"
        out[f"extra_{t}"] = f"a key of the {t} tree that no source sample has (not a sample)"
        out[f"bad_{t}"] = f"a {t} member does not decode, or was made for an image of another size"
    return out


@dataclass
class Joined:
    """A source sample with its label members: ``members`` by suffix (``jpg``, ``txt``, ...),
    ``labels[task][kind]`` member bytes."""
    key: str
    members: dict[str, bytes]
    labels: dict[str, dict[str, bytes]]


@dataclass
class JoinReport:
    """What a join could not use. ``skipped``: samples per reason (each sample once, under its first
    reason); ``missing[task]`` / ``extra[task]``: keys the source has and the tree lacks / the other
    way round; ``damage``: shard-level problems (truncated or empty source, unreadable label tar)."""
    joined: int = 0
    skipped: Counter = field(default_factory=Counter)
    missing: dict[str, list[str]] = field(default_factory=dict)
    extra: dict[str, list[str]] = field(default_factory=dict)
    damage: list[str] = field(default_factory=list)

    @property
    def samples(self) -> int:
        """Source samples seen: joined + skipped."""
        return self.joined + sum(self.skipped.values())

    def summary(self) -> dict:
        return {"samples": self.samples, "joined": self.joined, "skipped": dict(self.skipped),
                "missing": {t: len(k) for t, k in self.missing.items()},
                "extra": {t: len(k) for t, k in self.extra.items()}, "damage": list(self.damage)}


def join_shard(source: str | os.PathLike | BinaryIO, label_tars: Mapping[str, str | os.PathLike],
               kinds: Mapping[str, Sequence[str]] | None = None, *, report: JoinReport | None = None,
               max_member_bytes: int | None = None) -> Iterator[Joined | Skip]:
    """Join one source shard (a path, or a binary stream read once) with label tars
    ``{task: path}`` (local files: they are read by member offset) by key, strictly.

    ``kinds[task]``: the kinds required from that tree (default: every kind the tree's tar holds, e.g.
    ``normal`` and ``normal_conf``). Yields in source order a ``Joined`` for every
    sample that has all of them and a ``Skip`` (key, reason) for every sample that has not; then a
    ``Skip(key, "extra_<task>")`` for every label key no source sample asked for. Shard-level damage
    comes as ``Skip(None, reason)``."""
    report = report if report is not None else JoinReport()
    trees = {t: LabelTar(p) for t, p in label_tars.items()}
    try:
        for t, tree in trees.items():
            if tree.damage:
                report.damage.append(f"{t} tar: {tree.damage}")
                yield Skip(None, "label_read_error", f"{t}: {tree.damage}")
        for item in iter_records(source, max_member_bytes):
            if isinstance(item, Skip):
                if item.key is None:
                    report.damage.append(f"source: {item.reason}: {item.detail}")
                else:
                    report.skipped[item.reason] += 1
                    for tree in trees.values():  # the source has the key: its labels are not extra
                        tree.claim(item.key)
                yield item
                continue
            labels, problems = {}, []
            for t, tree in trees.items():  # every tree is asked: none of the key's labels is "extra"
                got = tree.take(item.key, (kinds or {}).get(t))
                if isinstance(got, str):
                    problems.append(f"missing_{t}" if got == "missing" else got)
                    if got == "missing":
                        report.missing.setdefault(t, []).append(item.key)
                else:
                    labels[t] = got
            if problems:
                report.skipped[problems[0]] += 1
                yield Skip(item.key, problems[0], ",".join(problems))
            else:
                report.joined += 1
                yield Joined(item.key, item.members, labels)
        for t, tree in trees.items():
            for key in tree.extra():
                report.extra.setdefault(t, []).append(key)
                yield Skip(key, f"extra_{t}")
    finally:
        for tree in trees.values():
            tree.close()


def shard_paths(sources) -> list[Path]:
    """A .tar path, a folder of .tar shards, a glob pattern or an iterable of paths -> shard paths."""
    if isinstance(sources, (str, os.PathLike)):
        p = Path(sources)
        if p.is_dir():
            found = sorted(p.glob("*.tar"))
        elif any(c in str(sources) for c in "*?["):
            found = [Path(s) for s in sorted(glob.glob(str(sources)))]
        else:
            found = [p]
        if not found:
            raise FileNotFoundError(f"no .tar shards in {sources}")
        return found
    return [Path(s) for s in sources]


def tasks_under(label_root: str | os.PathLike) -> tuple[str, ...]:
    """The label trees present under a label root, in ``format.TASKS`` order."""
    return tuple(t for t in F.TASKS if (Path(label_root) / t).is_dir())


def samples(sources, label_root: str | os.PathLike, tasks: Sequence[str] | None = None, *,
            kinds: Mapping[str, Sequence[str]] | None = None, report: JoinReport | None = None,
            decode_images: bool = True) -> Iterator[dict]:
    """Decoded samples of source shards joined with their labels under ``label_root``
    (``<label_root>/<task>/<shard name>``): dicts ``{"key", "image", "caption", "orientation",
    <kind>: array, ...}`` with every kind joined (``seg`` uint8 (h, w); ``depth`` and the
    confidences float32 (h, w); ``normal`` float32 (h, w, 3)). ``image``: uint8 (H, W, 3) RGB as the
    labels see it (EXIF orientation applied; needs Pillow), or the raw image bytes with
    ``decode_images=False``. ``tasks``: default every tree present. Samples that cannot be used are
    left out and counted in ``report``."""
    report = report if report is not None else JoinReport()
    root = Path(label_root)
    tasks = tuple(tasks) if tasks is not None else tasks_under(root)
    for shard in shard_paths(sources):
        tars = {t: root / t / shard.name for t in tasks}
        for item in join_shard(shard, tars, kinds, report=report):
            if isinstance(item, Joined):
                out = _decoded(item, decode_images)
                if isinstance(out, Skip):  # joined, but unusable: booked under its reason instead
                    report.joined -= 1
                    report.skipped[out.reason] += 1
                    continue
                yield out


def _decoded(item: Joined, decode_images: bool) -> dict | Skip:
    if decode_images:
        from .images import decode_record

        s = decode_record(Record(item.key, item.members))
        if isinstance(s, Skip):
            return s
        out = {"key": s.key, "image": s.image, "caption": s.caption, "orientation": s.orientation}
        image_hw = s.image.shape[:2]
    else:
        from .images import IMAGE_EXTS

        ext = next((e for e in IMAGE_EXTS if e in item.members), None)
        if ext is None:
            return Skip(item.key, "missing_image")
        try:
            caption = item.members.get("txt", b"").decode("utf-8").strip()
        except UnicodeDecodeError:
            caption = ""
        if not caption:
            return Skip(item.key, "invalid_caption")
        out = {"key": item.key, "image": item.members[ext], "caption": caption}
        image_hw = None
    for task, members in item.labels.items():
        for kind, data in members.items():
            try:
                header, arr = F.decode_with_header(data)
            except F.LabelFormatError as e:
                return Skip(item.key, f"bad_{task}", f"{kind}: {e}")
            if header["kind"] != kind or (image_hw is not None and tuple(header["image_size"]) != image_hw):
                return Skip(item.key, f"bad_{task}", f"{kind}: made for another image")
            out[kind] = arr
            out.setdefault("orientation", header.get("orientation"))
    return out


def wds_decoder(key: str, data: bytes):
    """A webdataset decode handler: ``wds.WebDataset(url).decode(wds_decoder)`` turns every
    ``<key>.<kind>.lbl`` member into its array (webdataset passes the suffix, e.g. ``".depth.lbl"``);
    anything else is left to the other handlers (returns None)."""
    parts = key.lower().lstrip(".").split(".")
    if parts[-1] != F.MEMBER_EXT:
        return None
    header, arr = F.decode_with_header(data)
    if len(parts) >= 2 and parts[-2] in F.KINDS and header["kind"] != parts[-2]:
        raise F.LabelFormatError(f"member {key!r} holds a {header['kind']!r} map")
    return arr


__all__ = ["join_reasons", "Joined", "JoinReport", "join_shard", "shard_paths", "tasks_under", "samples",
           "wds_decoder"]
