"""Where checkpoints come from, and how they are loaded.

Resolution order for every checkpoint (the first hit wins):

1. an explicit local path given by the caller (``weights=...``); if it does not exist that is an
   error, never a silent fall-through to another file;
2. the cache directory ``$CLIPTEX_WEIGHTS_DIR`` (default ``~/.cache/cliptex``), laid out as
   ``<dir>/<expert>/<file>`` (Hugging Face repos under ``<dir>/hf``), plus the caches the upstream
   libraries already use (torch hub, the default Hugging Face cache);
3. the public source (torchvision / SAM URL, Hugging Face hub id) — only when we are online.
   NLL-AngMF has no working automatic source (Google Drive), so its file must be supplied locally.

"Online" is decided without waiting on hub retries: the HF/transformers offline variables switch
it off, and otherwise one TCP connect with a short timeout to the source's host decides. Anything
that cannot be resolved raises :class:`MissingWeightsError` naming the file and how to supply it.

Loading is restricted to tensors: ``torch.load(weights_only=True)`` or safetensors.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import time
import urllib.parse
from pathlib import Path

from pipeline import storage

from .base import MissingWeightsError

ENV_WEIGHTS_DIR = "CLIPTEX_WEIGHTS_DIR"
OFFLINE_ENV = ("CLIPTEX_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
CONNECT_TIMEOUT_S = 3.0
_SHA_CACHE_NAME = "sha256-cache.json"
_sha_memo: dict[tuple[str, int, int], str] = {}
_reach_memo: dict[tuple[str, int], tuple[bool, float]] = {}


def weights_dir() -> Path:
    return Path(os.environ.get(ENV_WEIGHTS_DIR) or Path.home() / ".cache" / "cliptex").expanduser()


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def offline_by_env() -> bool:
    return any(_truthy(os.environ.get(k)) for k in OFFLINE_ENV)


def can_reach(url: str, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """One TCP connect to the URL's host (or the HTTPS proxy), bounded in time.

    getaddrinfo has no timeout of its own and can hang for tens of seconds on a half-configured
    resolver, so the whole probe runs in a thread that we stop waiting for after ``timeout``.
    """
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urllib.parse.urlsplit(proxy if proxy else url)
    host = target.hostname
    port = target.port or (443 if target.scheme in ("https", "") else 80)
    if not host:
        return False

    def probe() -> bool:
        with socket.create_connection((host, port), timeout=timeout):
            return True

    key = (host, port)
    if key in _reach_memo and time.monotonic() - _reach_memo[key][1] < 60:
        return _reach_memo[key][0]  # several experts share a host: probe it once
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        ok = pool.submit(probe).result(timeout=timeout + 0.5)
    except Exception:  # noqa: BLE001 - any failure means "not reachable"
        ok = False
    finally:
        pool.shutdown(wait=False)
    _reach_memo[key] = (ok, time.monotonic())
    return ok


# ----------------------------------------------------------------------------------------------
# hashing


def _sha_cache_path() -> Path:
    return weights_dir() / _SHA_CACHE_NAME


def sha256_file(path: str | os.PathLike) -> str:
    """``pipeline.storage.sha256`` of a checkpoint, remembered by (real path, size, mtime) so
    a 1.4 GB file is hashed once per machine rather than once per worker start."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns)
    if key in _sha_memo:
        return _sha_memo[key]
    disk: dict = {}
    try:
        disk = json.loads(_sha_cache_path().read_text())
        hit = disk.get(real)
        if hit and hit["size"] == st.st_size and hit["mtime_ns"] == st.st_mtime_ns:
            _sha_memo[key] = hit["sha256"]
            return hit["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        disk = {}
    digest = storage.sha256(real)
    _sha_memo[key] = digest
    disk[real] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    try:  # a read-only cache dir only costs a re-hash next time
        storage.write_bytes_atomic(_sha_cache_path(), json.dumps(disk, indent=0, sort_keys=True).encode())
    except OSError:
        pass
    return digest


# ----------------------------------------------------------------------------------------------
# loading


def load_tensors(path: str | os.PathLike) -> dict:
    """A checkpoint as plain tensors: safetensors, or a torch pickle restricted to tensors and
    containers (``weights_only=True`` refuses arbitrary code in a downloaded file)."""
    import torch

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------
# resolution


def _missing(what: str, filename: str, looked: list[str], how: str) -> MissingWeightsError:
    lines = [f"{what} needs the checkpoint file '{filename}', which was not found.",
             "  looked in: " + ("; ".join(looked) if looked else "(nowhere)"),
             f"  how to supply it: {how}"]
    return MissingWeightsError("\n".join(lines))


def download_url(url: str, dest: Path, sha256_prefix: str | None = None) -> Path:
    """Download to a temporary name, then rename: a killed download never looks like a checkpoint.
    ``sha256_prefix`` (torchvision puts one in its file names) is checked before the rename."""
    import torch.hub

    with storage.atomic_path(dest) as tmp:
        torch.hub.download_url_to_file(url, str(tmp), hash_prefix=sha256_prefix, progress=True)
    return dest


def resolve_file(filename: str, *, what: str, subdir: str, explicit: str | os.PathLike | None = None,
                 url: str | None = None, extra_dirs: tuple[Path, ...] = (), how: str = "",
                 sha256_prefix: str | None = None) -> Path:
    """Find (or fetch) one checkpoint file; see the module docstring for the order."""
    if explicit is not None:
        p = Path(explicit).expanduser()
        if p.is_file():
            return p
        raise _missing(what, Path(explicit).name, [f"{p} (explicit path: does not exist)"],
                       how or "pass an existing file")
    cached = weights_dir() / subdir / filename
    candidates = [cached] + [Path(d) / filename for d in extra_dirs]
    for c in candidates:
        if c.is_file():
            return c
    looked = [str(c) for c in candidates]
    if url is not None:
        if offline_by_env():
            looked.append(f"{url} (skipped: offline by environment)")
        elif not can_reach(url):
            looked.append(f"{url} (host not reachable)")
        else:
            try:
                return download_url(url, cached, sha256_prefix)
            except Exception as e:  # noqa: BLE001 - every download failure means "missing"
                looked.append(f"{url} (download failed: {e})")
    hint = how or (f"download {url} " if url else "obtain the file ") + \
        f"and put it at {cached}, or pass weights=/path/{filename}"
    raise _missing(what, filename, looked, hint)


def hf_cache_dirs() -> tuple[Path | None, ...]:
    """Our cache first, then whatever cache huggingface_hub uses by default (None = its default)."""
    return (weights_dir() / "hf", None)


def resolve_hf(repo_id: str, *, what: str, files: tuple[str, ...], weight_files: tuple[str, ...],
               explicit: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """A Hugging Face model directory: returns (directory, weights file).

    ``files`` must all exist; of ``weight_files`` the first present is used (safetensors first).
    """
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    if explicit is not None:
        d = Path(explicit).expanduser()
        for wf in weight_files:
            if d.is_dir() and (d / wf).is_file() and all((d / f).is_file() for f in files):
                return d, d / wf
        raise _missing(what, f"{d}/{{{', '.join(files + weight_files)}}}",
                       [f"{d} (explicit directory: incomplete or missing)"],
                       f"pass a directory holding {', '.join(files)} and one of {', '.join(weight_files)}")

    looked = []
    for cache in hf_cache_dirs():
        found = [try_to_load_from_cache(repo_id, f, cache_dir=cache) for f in files]
        if all(isinstance(p, str) for p in found):
            for wf in weight_files:
                p = try_to_load_from_cache(repo_id, wf, cache_dir=cache)
                if isinstance(p, str):
                    return Path(found[0]).parent, Path(p)
        looked.append(f"{cache if cache else 'default Hugging Face cache'} ({repo_id})")

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    ours = weights_dir() / "hf"
    if offline_by_env():
        looked.append(f"{endpoint}/{repo_id} (skipped: offline by environment)")
    elif not can_reach(endpoint):
        looked.append(f"{endpoint}/{repo_id} (host not reachable)")
    else:
        try:
            paths = [hf_hub_download(repo_id, f, cache_dir=ours) for f in files]
            errors = []
            for wf in weight_files:
                try:
                    return Path(paths[0]).parent, Path(hf_hub_download(repo_id, wf, cache_dir=ours))
                except Exception as e:  # noqa: BLE001 - try the next weight format
                    errors.append(f"{wf}: {e}")
            looked.append(f"{endpoint}/{repo_id} (no weight file: {'; '.join(errors)})")
        except Exception as e:  # noqa: BLE001
            looked.append(f"{endpoint}/{repo_id} (download failed: {e})")
    raise _missing(what, f"{repo_id}/{weight_files[0]}", looked,
                   f"run once with internet access (it downloads into {ours}), e.g. "
                   f"`hf download {repo_id} {' '.join(files)} {weight_files[0]} --cache-dir {ours}`, "
                   f"or pass checkpoint=/local/dir holding {', '.join(files)} and the weights")
