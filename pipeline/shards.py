"""Source shards as the pipeline reads them, the per-sample books of a shard, and tars in memory.

Reading is the light reader's own code (``cliptex_labels.tars`` / ``.images``, re-exported here), so
what the pipeline labelled and what a reader of the labels gets are the same samples, decoded the
same way. It is split in two so decoding can run on a thread pool: ``iter_records`` walks the tar
and groups members into samples (cheap, sequential); ``decode_record`` turns one into a ``Sample``
or a ``Skip`` (image decode, caption checks). Neither ever raises on bad data: every sample that
cannot be used comes back as a ``Skip`` with a reason from ``SKIP_REASONS``.

``SampleLedger`` keeps the books of one shard: every sample the reader found ends labelled or
skipped, exactly once, so that for every shard samples = ok + skipped.
"""
from __future__ import annotations

import io
import os
import tarfile
from collections import Counter
from typing import Iterable, Iterator

from cliptex_labels.images import (DEFAULT_MAX_PIXELS, IMAGE_EXTS, NEAR_CONSTANT_STD, Sample,  # noqa: F401
                                   decode_image, decode_record, open_image)
from cliptex_labels.tars import (MAX_MEMBER_BYTES, SHARD_DAMAGE, SKIP_REASONS, Record, Skip,  # noqa: F401
                                 is_unsafe_name, iter_records)
from pipeline import storage
from pipeline.storage import tarinfo

# Reasons the labelling adds to the reader's SKIP_REASONS.
LABELLING_SKIP_REASONS = {
    "expert_error": "an expert raised on this image (alone, after its batch failed)",
    "label_encode_error": "an expert map could not be resized/encoded (wrong dtype/shape, NaN)",
}


def iter_samples(location: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[Sample | Skip]:
    """Decoded samples (or skips) of a source shard at a local path or URL, streamed."""
    with storage.open_read(location) as f:
        for item in iter_records(f):
            yield item if isinstance(item, Skip) else decode_record(item, max_pixels)


def tar_bytes(members: Iterable[tuple[str, bytes]]) -> bytes:
    """A deterministic tar (GNU format, mtime 0, root-owned, 0644) of (name, bytes) in order: the
    same bytes ``pipeline.storage.AtomicTarWriter`` writes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            if is_unsafe_name(name):
                raise ValueError(f"refusing to write unsafe member name {name!r}")
            tar.addfile(tarinfo(name, len(data)), io.BytesIO(data))
    return buf.getvalue()


class SampleLedger:
    """The books of one source shard. ``read`` takes each item of the reader in source order: a
    ``Skip`` of a sample is settled at once, shard-level damage (a truncated or empty tar: key None)
    is kept apart, as it is not a sample; a ``Sample`` stays open until ``labelled`` or ``skip``
    settles it. ``stats`` refuses books where a sample was settled twice or never.

    It also counts what the decoded images were (every sample whose image decoded): source modes,
    EXIF orientations applied and near-constant images; ``sample_notes`` lists each sample that is
    not plain RGB, was rotated or is near-constant, so every sample's mode and orientation is on
    record (a sample not listed was RGB, orientation 1, not near-constant)."""

    REASONS = {**SKIP_REASONS, **LABELLING_SKIP_REASONS}

    def __init__(self) -> None:
        self._open: dict[int, str] = {}
        self.ok = 0
        self.skips: list[dict] = []
        self.damage: list[dict] = []
        self.reasons: Counter = Counter()
        self.modes: Counter = Counter()
        self.orientations: Counter = Counter()
        self.near_constant = 0
        self.notes: list[dict] = []

    def read(self, index: int, item: Sample | Skip) -> Sample | None:
        """Book one reader item; returns the sample if it goes on to the experts."""
        if isinstance(item, Skip):
            if item.key is None:
                if item.reason not in SHARD_DAMAGE:
                    raise ValueError(f"a skip without a key must be shard damage, got {item.reason!r}")
                self.damage.append({"index": index, "reason": item.reason, "detail": item.detail})
                return None
            self._open[index] = item.key
            self.skip(index, item.key, item.reason, item.detail)
            return None
        self._open[index] = item.key
        self.modes[item.source_mode] += 1
        self.orientations[item.orientation] += 1
        self.near_constant += item.near_constant
        if item.source_mode != "RGB" or item.orientation != 1 or item.near_constant:
            self.notes.append({"index": index, "key": item.key, "mode": item.source_mode,
                               "orientation": item.orientation, "near_constant": item.near_constant})
        return item

    def _settle(self, index: int) -> None:
        if self._open.pop(index, None) is None:
            raise RuntimeError(f"sample {index} was settled twice, or never read")

    def skip(self, index: int, key: str, reason: str, detail: str = "") -> None:
        if reason not in self.REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        self._settle(index)
        self.skips.append({"index": index, "key": key, "reason": reason, "detail": detail})
        self.reasons[reason] += 1

    def labelled(self, index: int) -> None:
        self._settle(index)
        self.ok += 1

    def stats(self) -> dict:
        """The marker's accounting fields."""
        if self._open:
            raise RuntimeError(f"{len(self._open)} sample(s) read but neither labelled nor skipped: "
                               f"{sorted(self._open.values())[:5]}")
        return {"samples": self.ok + len(self.skips), "ok": self.ok, "skipped": len(self.skips),
                "skip_reasons": dict(sorted(self.reasons.items())),
                "skips": sorted(self.skips, key=lambda s: s["index"]),
                "shard_damage": self.damage,
                "source_modes": dict(sorted(self.modes.items())),
                "exif_orientations": {str(k): n for k, n in sorted(self.orientations.items())},
                "near_constant": self.near_constant,
                "sample_notes": sorted(self.notes, key=lambda s: s["index"])}
