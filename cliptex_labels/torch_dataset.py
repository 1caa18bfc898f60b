"""An optional torch ``IterableDataset`` over ``reader.samples`` (this module imports torch; the rest
of the package does not)."""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .reader import JoinReport, samples, shard_paths


class LabelDataset(IterableDataset):
    """Joined, decoded samples as tensors, in the layouts of ``samples`` (image uint8 (H, W, 3),
    seg uint8 (h, w), depth float32 (h, w), normal float32 (h, w, 3), ...); key and caption stay
    strings. Shards are split over DataLoader workers (and over ``world_size`` ranks), each reads
    its own. ``transform`` is applied to each numpy sample dict first (crop, resize, ...)."""

    def __init__(self, sources, label_root, tasks: Sequence[str] | None = None, *,
                 kinds: Mapping[str, Sequence[str]] | None = None, transform: Callable[[dict], dict] | None = None,
                 rank: int = 0, world_size: int = 1):
        super().__init__()
        self.shards = [str(p) for p in shard_paths(sources)]
        self.label_root, self.tasks, self.kinds = str(label_root), tasks, kinds
        self.transform = transform
        self.rank, self.world_size = rank, world_size
        self.report = JoinReport()  # of the reading done in this process

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = self.shards[self.rank * workers + worker::self.world_size * workers]
        for s in samples(mine, self.label_root, self.tasks, kinds=self.kinds, report=self.report):
            if self.transform is not None:
                s = self.transform(s)
            yield {k: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v)
                   for k, v in s.items()}
