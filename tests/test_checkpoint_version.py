"""Checkpoint versions: the version field is read — version 1's skip counters (a list in the old
reason order) come back by name, an unknown version is refused with the file named."""
import pytest
import torch

from trainer import checkpoint as ckpt


def _state(version, skips):
    return {"version": version, "step": 3, "model": {}, "optimizer": {}, "scaler": {}, "config": {}, "arch": {},
            "data": {"world_size": 1, "num_streams": 1, "seed": 0, "positions": [[[0, 0]]], "skips": skips},
            "rng": []}


def test_version_1_skip_counters_come_back_by_name(tmp_path):
    old = [0.0] * len(ckpt.V1_SKIP_REASONS)
    old[ckpt.V1_SKIP_REASONS.index("orphan_seg")] = 2.0
    old[ckpt.V1_SKIP_REASONS.index("missing_depth")] = 5.0
    torch.save(_state(1, old), tmp_path / "v1.pt")
    skips = ckpt.load(tmp_path / "v1.pt")["data"]["skips"]
    assert skips["extra_seg"] == 2.0 and skips["missing_depth"] == 5.0 and "orphan_seg" not in skips
    torch.save(_state(ckpt.VERSION, {"missing_seg": 1.0}), tmp_path / "v2.pt")
    assert ckpt.load(tmp_path / "v2.pt")["data"]["skips"] == {"missing_seg": 1.0}


def test_unknown_version_is_refused(tmp_path):
    torch.save(_state(99, {}), tmp_path / "future.pt")
    with pytest.raises(ckpt.CheckpointError, match="future.pt has version 99"):
        ckpt.load(tmp_path / "future.pt")
