"""Step-level checkpoints and run-directory helpers. A run directory is a location
(``pipeline.storage``): a local folder or a URL (``s3://bucket/runs/x``); every file in it is
written whole (temporary file + fsync + rename locally, one upload on a bucket).

A checkpoint ``<run>/checkpoints/step_XXXXXXXX.pt`` holds everything a resumed run needs to continue
exactly where the interrupted one was: model, optimizer, scheduler position, grad scaler, every rank's
data-stream positions and RNG states, the skip counters and the config. ``<run>/checkpoints/latest``
names the newest complete checkpoint; it is only updated after that file is in place, so a crash
while saving leaves the previous one usable. Loading uses ``torch.load(weights_only=True)``: the
states hold only tensors, numbers, strings, lists, tuples and dicts (Python's ``random`` state is a
tuple of ints; numpy's global RNG is not used by the training process and is not saved).

Files that grow by appending (``metrics.jsonl``, TensorBoard events) cannot be appended to on a
bucket: ``local_run_dir`` gives a local folder for them, and ``sync_run_files`` uploads it into the
run directory with every checkpoint.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random

import torch
import torch.distributed as dist

from pipeline import storage

VERSION = 2  # 2: data.skips is {reason: count} (1: a list in the order of V1_SKIP_REASONS)
V1_SKIP_REASONS = ("samples_skipped", "bad_image", "missing_caption", "source_read_error", "label_read_error",
                   "missing_seg", "missing_depth", "missing_normal", "orphan_seg", "orphan_depth",
                   "orphan_normal", "bad_seg", "bad_depth", "bad_normal")
CHECKPOINTS = "checkpoints"
LATEST = "latest"


class CheckpointError(RuntimeError):
    pass


def save_torch(obj, location) -> None:
    """``torch.save`` to a file or object, whole or not at all."""
    with storage.open_write_atomic(location) as f:
        torch.save(obj, f)


def _steps(run_dir) -> list[str]:
    """The run's checkpoint files, oldest first."""
    listing = storage.listdir(storage.join(run_dir, CHECKPOINTS))
    return sorted(p for p in listing if storage.basename(p).startswith("step_") and p.endswith(".pt"))


def has_checkpoints(run_dir) -> bool:
    return bool(_steps(run_dir))


def find(run_dir, resume: str) -> str | None:
    """``latest`` -> the newest complete checkpoint of the run (None when there is none yet: a fresh
    start, as open_clip's ``--resume latest``); otherwise a checkpoint location that must exist."""
    if resume != LATEST:
        if not storage.exists(resume):
            raise CheckpointError(f"checkpoint {storage.redact(resume)} not found")
        return storage.normalize(resume)
    d = storage.join(run_dir, CHECKPOINTS)
    try:
        named = storage.join(d, storage.read_bytes(storage.join(d, LATEST)).decode().strip())
        if storage.exists(named):
            return named
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        pass
    found = _steps(run_dir)
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


def save(run_dir, step: int, *, distributed: bool, main: bool, model, optimizer, scaler, config: dict,
         arch: dict, data: dict, keep: int = 2, local_dir=None) -> str:
    """Collective: every rank contributes its RNG state and data positions; rank 0 writes (and,
    with ``local_dir``, uploads the run's appended files after the checkpoint)."""
    mine = {"rng": rng_state(), "positions": [list(p) for p in data["positions"]]}
    if distributed:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    d = storage.join(run_dir, CHECKPOINTS)
    path = storage.join(d, f"step_{step:08d}.pt")
    if main:
        state = {"version": VERSION, "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict(), "config": config, "arch": arch,
                 "data": {**data, "positions": [g["positions"] for g in gathered]},
                 "rng": [g["rng"] for g in gathered]}
        save_torch(state, path)
        storage.write_text_atomic(storage.join(d, LATEST), storage.basename(path) + "\n")
        for old in _steps(run_dir)[:-keep]:
            storage.remove(old)
        if local_dir is not None:
            sync_run_files(local_dir, run_dir)
    if distributed:
        dist.barrier()
    return path


def load(path) -> dict:
    """A checkpoint as the current version's layout (older versions are converted)."""
    shown = storage.redact(path)
    try:
        with storage.local_copy(path) as local:  # a remote checkpoint is fetched once, whole
            state = torch.load(local, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which one
        raise CheckpointError(f"cannot load checkpoint {shown}: {e}") from None
    version = state.get("version") if isinstance(state, dict) else None
    if version not in (1, VERSION):
        raise CheckpointError(f"checkpoint {shown} has version {version!r}; this trainer reads 1 and {VERSION}")
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


def truncate_metrics(path, step: int) -> None:
    """On resume, drop metric lines of steps after the checkpoint (they will be recomputed)."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path) as f:
        lines = f.read().splitlines()
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError):
            continue
    storage.write_text_atomic(path, "".join(k + "\n" for k in keep))


def local_run_dir(run_dir) -> str:
    """The local folder for the run's appended files: the run directory itself when it is local,
    else a folder in the scratch space named after it (the same one when the run resumes here)."""
    run_dir = storage.normalize(run_dir)
    if storage.is_local(run_dir):
        return run_dir
    digest = hashlib.sha256(run_dir.encode()).hexdigest()[:16]
    return os.path.join(storage.scratch_dir(), f"cliptex-run-{digest}")


def fetch_run_file(run_dir, name: str) -> str:
    """``<local run dir>/<name>``, first copied from a remote run directory when it exists there
    (``metrics.jsonl`` of a run that resumes on another machine)."""
    local = os.path.join(local_run_dir(run_dir), name)
    if not storage.is_local(run_dir):
        try:
            storage.write_bytes_atomic(local, storage.read_bytes(storage.join(run_dir, name)))
        except FileNotFoundError:
            pass
    return local


def sync_run_files(local_dir, run_dir) -> None:
    """Upload every file under ``local_dir`` to the same name under a remote ``run_dir``
    (nothing to do when the run directory is local: the files are already there)."""
    run_dir = storage.normalize(run_dir)
    if storage.is_local(run_dir):
        return
    for folder, _, files in os.walk(local_dir):
        for name in files:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, local_dir).replace(os.sep, "/")
            storage.upload(path, storage.join(run_dir, rel))


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
