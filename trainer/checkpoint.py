"""Step-level checkpoints, written atomically (temporary file + fsync + rename), and run-dir helpers.

A checkpoint ``<run>/checkpoints/step_XXXXXXXX.pt`` holds everything a resumed run needs to continue
exactly where the interrupted one was: model, optimizer, scheduler position, grad scaler, every rank's
data-stream positions and RNG states, the skip counters and the config. ``<run>/checkpoints/latest``
names the newest complete checkpoint; it is only updated after that file is in place, so a crash
while saving leaves the previous one usable. Loading uses ``torch.load(weights_only=True)``: the
states hold only tensors, numbers, strings, lists, tuples and dicts (Python's ``random`` state is a
tuple of ints; numpy's global RNG is not used by the training process and is not saved).
"""
from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.storage import open_write_atomic, write_bytes_atomic


VERSION = 2  # 2: data.skips is {reason: count} (1: a list in the order of V1_SKIP_REASONS)
V1_SKIP_REASONS = ("samples_skipped", "bad_image", "missing_caption", "source_read_error", "label_read_error",
                   "missing_seg", "missing_depth", "missing_normal", "orphan_seg", "orphan_depth",
                   "orphan_normal", "bad_seg", "bad_depth", "bad_normal")


class CheckpointError(RuntimeError):
    pass


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(Path(path), text.encode())


def torch_save_atomic(obj, path: Path) -> None:
    with open_write_atomic(path) as f:
        torch.save(obj, f)


def has_checkpoints(run_dir: Path) -> bool:
    d = Path(run_dir) / "checkpoints"
    return d.is_dir() and any(d.glob("step_*.pt"))


def find(run_dir: Path, resume: str) -> Path | None:
    """``latest`` -> the newest complete checkpoint of the run (None when there is none yet: a fresh
    start, as open_clip's ``--resume latest``); otherwise a checkpoint path that must exist."""
    if resume != "latest":
        p = Path(resume)
        if not p.is_file():
            raise CheckpointError(f"checkpoint {p} not found")
        return p
    d = Path(run_dir) / "checkpoints"
    pointer = d / "latest"
    if pointer.is_file():
        p = d / pointer.read_text().strip()
        if p.is_file():
            return p
    found = sorted(d.glob("step_*.pt")) if d.is_dir() else []
    return found[-1] if found else None


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate()}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    v, internal, gauss = s["python"]
    random.setstate((v, tuple(internal), gauss))


def save(run_dir: Path, step: int, *, distributed: bool, main: bool, model, optimizer, scaler, config: dict,
         arch: dict, data: dict, keep: int = 2) -> Path:
    """Collective: every rank contributes its RNG state and data positions; rank 0 writes."""
    mine = {"rng": rng_state(), "positions": [list(p) for p in data["positions"]]}
    if distributed:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    d = Path(run_dir) / "checkpoints"
    path = d / f"step_{step:08d}.pt"
    if main:
        state = {"version": VERSION, "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict(), "config": config, "arch": arch,
                 "data": {**data, "positions": [g["positions"] for g in gathered]},
                 "rng": [g["rng"] for g in gathered]}
        torch_save_atomic(state, path)
        write_text_atomic(d / "latest", path.name + "\n")
        for old in sorted(d.glob("step_*.pt"))[:-keep]:
            old.unlink(missing_ok=True)
    if distributed:
        dist.barrier()
    return path


def load(path: Path) -> dict:
    """A checkpoint as the current version's layout (older versions are converted)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which one
        raise CheckpointError(f"cannot load checkpoint {path}: {e}") from None
    version = state.get("version") if isinstance(state, dict) else None
    if version not in (1, VERSION):
        raise CheckpointError(f"checkpoint {path} has version {version!r}; this trainer reads 1 and {VERSION}")
    if version == 1:  # the skip counters by name; the reader now calls orphan label keys "extra"
        names = [r.replace("orphan_", "extra_") for r in V1_SKIP_REASONS]
        state["data"]["skips"] = dict(zip(names, state["data"]["skips"]))
    return state


def check_compatible(saved: dict, current: dict) -> None:
    """The model and tasks must match the checkpoint; other differences are allowed (e.g. more steps)."""
    keys = ("arch", "psp_channels", "psp_pool_sizes", "head_layers")
    diff = [k for k in keys if saved["model"].get(k) != current["model"].get(k)]
    if saved.get("tasks") != current.get("tasks"):
        diff.append("tasks")
    if diff:
        raise CheckpointError(f"the checkpoint was made with different {diff}: "
                              f"saved {[saved['model'].get(k, saved.get(k)) for k in diff]}")


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines of steps after the checkpoint (they will be recomputed)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError):
            continue
    write_text_atomic(path, "".join(k + "\n" for k in keep))


@contextlib.contextmanager
def rank0_first(distributed: bool, is_local_zero: bool):
    """Local rank 0 runs the block first (e.g. downloads weights into the cache), then the others."""
    if distributed and not is_local_zero:
        dist.barrier()
    try:
        yield
    finally:
        if distributed and is_local_zero:
            dist.barrier()
