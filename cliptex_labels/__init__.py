"""cliptex_labels: read (and write) CLIPTeX pseudo-label shards with numpy + zstandard.

    from cliptex_labels import samples
    for s in samples("data/sample", "data/labels/sample"):      # source shards, label root
        s["key"], s["caption"], s["image"], s["seg"], s["depth"], s["normal"], s["normal_conf"]

- ``format``: the label format (``encode``/``decode``/``decode_with_header``, constants): the one
  definition, which the CLIPTeX pipeline and trainer import too.
- ``reader``: ``join_shard`` (strict key join, raw bytes), ``samples`` (decoded), ``wds_decoder``
  (a webdataset ``.decode()`` handler), ``JoinReport``.
- ``tars``: safe readers of source shards (``iter_records``) and label tars (``LabelTar``).
- ``images``: image decoding exactly as the pipeline did it (needs Pillow), ``apply_orientation``.
- ``LabelDataset``: a torch ``IterableDataset`` (imports torch on first use).

docs/LABELS.md in the CLIPTeX repository is the format's specification.
"""
from __future__ import annotations

from .format import (FORMAT_VERSION, KINDS, NUM_SEG_CLASSES, READABLE_VERSIONS, SEG_IGNORE, TASKS,
                     LabelFormatError, decode, decode_with_header, encode, kinds_of, label_shape)
from .images import apply_orientation
from .reader import JoinReport, Joined, join_reasons, join_shard, samples, wds_decoder
from .tars import LabelTar, Record, Skip, iter_records

__version__ = "2.0.0"  # follows the label format version it writes

__all__ = ["FORMAT_VERSION", "READABLE_VERSIONS", "TASKS", "KINDS", "SEG_IGNORE", "NUM_SEG_CLASSES",
           "LabelFormatError", "encode", "decode", "decode_with_header", "kinds_of", "label_shape",
           "apply_orientation", "JoinReport", "Joined", "join_reasons", "join_shard", "samples",
           "wds_decoder", "LabelTar", "Record", "Skip", "iter_records", "LabelDataset"]


def __getattr__(name: str):
    if name == "LabelDataset":  # torch only when asked for
        from .torch_dataset import LabelDataset

        return LabelDataset
    raise AttributeError(f"module 'cliptex_labels' has no attribute {name!r}")
