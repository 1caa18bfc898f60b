"""Shared fixtures. Everything runs offline: hubs are switched off before any import uses them."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset pulls albumentations, which phones home

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    """A fresh copy of the embedded sample (2 img2dataset shards of real photographs)."""
    from pipeline.sample import build

    out = tmp_path_factory.mktemp("sample")
    build(out)
    return out


@pytest.fixture(scope="session")
def smoke_labels(sample_dir, tmp_path_factory) -> Path:
    """Label trees for the sample shards (seg, depth, normal), as the pseudo-label job writes them."""
    from pipeline import labels
    from pipeline.shards import iter_samples, write_tar_atomic

    out = tmp_path_factory.mktemp("labels")
    for shard in sorted(sample_dir.glob("*.tar")):
        per_task = {t: [] for t in labels.TASKS}
        for s in iter_samples(shard):
            h, w = s.image.shape[:2]
            grey = s.image.mean(-1).astype(np.float32)
            maps = {"seg": (grey // 64).astype(np.uint8), "depth": grey / 255.0,
                    "normal": np.broadcast_to(np.float32([0, 0, -1]), (h, w, 3)).copy(),
                    "normal_conf": np.full((h, w), 10, np.float32)}
            for task, members in labels.encode_sample(s.key, maps, (h, w)).items():
                per_task[task] += members.items()
        for task, members in per_task.items():
            write_tar_atomic(out / task / shard.name, members)
    return out
