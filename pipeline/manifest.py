"""Shard sets: which source shards a job or a training run reads.

A shard set is named by a manifest, ``manifests/<name>.yaml``::

    name: cc3m
    root: data/cc3m            # default root: a folder or a URL (s3://bucket/cc3m, gs://…)
    root_env: CC3M_ROOT        # optional: the environment variable that overrides root
    shards: "{00000..00331}.tar"   # brace pattern, relative to root
    expected_samples: 2900000  # optional: a sanity figure reported next to what was found
    output: data/labels/cc3m   # default label output root (a folder or a URL)

or given directly (``shard_set``): a folder / prefix of ``.tar`` shards, or a brace pattern
(``s3://bucket/cc3m/{00000..00331}.tar``). Locations are strings, local paths or fsspec URLs
(``pipeline.storage``); the shards that exist are found with one listing per folder / prefix,
which also gives their sizes.

A bad manifest is a ``ManifestError`` whose message fits on one line; a location that cannot be
read (missing bucket, no permission) is a ``storage.StorageError``. CLIs print either and exit 2.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline import storage

REQUIRED = {"name", "root", "shards", "output"}
OPTIONAL = {"root_env", "expected_samples", "description"}
MANIFEST_DIR = Path(__file__).resolve().parent.parent / "manifests"
SHARD_SUFFIX = ".tar"


class ManifestError(ValueError):
    pass


@dataclass(frozen=True)
class ShardSet:
    """``root``, ``shards`` and ``output`` are normalised location strings (``storage.normalize``);
    ``output`` is None when the set was not named by a manifest. ``sizes``: bytes per shard, from
    the listing that found them (empty when the shards were not listed)."""
    name: str
    root: str
    shards: tuple[str, ...]
    output: str | None
    expected_samples: int | None = None
    sizes: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        object.__setattr__(self, "root", storage.normalize(self.root))
        object.__setattr__(self, "shards", tuple(storage.normalize(s) for s in self.shards))
        if self.output is not None:
            object.__setattr__(self, "output", storage.normalize(self.output))

    @property
    def shard_names(self) -> list[str]:
        return [storage.stem(p) for p in self.shards]


def manifest_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        return p
    return MANIFEST_DIR / f"{name_or_path}.yaml"


def _listed(pattern: str, root: str) -> dict[str, int]:
    """{shard: bytes} of the pattern's shards that exist (one listing per folder / prefix)."""
    try:
        return storage.list_existing(pattern)
    except OSError as e:
        raise storage.error("read", root, e) from e


def load_manifest(name_or_path: str, *, require_shards: bool = True) -> ShardSet:
    """The shard set a manifest names. ``require_shards``: keep only the shards that exist (at
    least one must); otherwise every name of the pattern, unlisted."""
    path = manifest_path(name_or_path)
    if not path.is_file():
        known = sorted(p.stem for p in MANIFEST_DIR.glob("*.yaml"))
        raise ManifestError(f"no manifest {path} (known: {', '.join(known)})")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ManifestError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"{path}: expected a mapping of fields, got {type(doc).__name__}")
    missing, unknown = REQUIRED - doc.keys(), doc.keys() - REQUIRED - OPTIONAL
    if missing or unknown:
        parts = ([f"missing field(s) {sorted(missing)}"] if missing else []) + \
                ([f"unknown field(s) {sorted(unknown)}"] if unknown else [])
        raise ManifestError(f"{path}: {'; '.join(parts)}")
    for f in ("name", "root", "shards", "output"):
        if not isinstance(doc[f], str) or not doc[f]:
            raise ManifestError(f"{path}: field {f!r} must be a non-empty string")
    expected = doc.get("expected_samples")
    if expected is not None and (not isinstance(expected, int) or expected < 0):
        raise ManifestError(f"{path}: expected_samples must be a non-negative integer")
    root_text = os.environ.get(doc["root_env"], doc["root"]) if doc.get("root_env") else doc["root"]
    try:
        root = storage.normalize(root_text)
        pattern = storage.join(root, doc["shards"])
    except ValueError as e:
        raise ManifestError(f"{path}: {e}") from None
    if not require_shards:
        return ShardSet(doc["name"], root, tuple(storage.expand(pattern)), doc["output"], expected)
    found = _listed(pattern, root)
    if not found:
        hint = f" (set {doc['root_env']} to its folder)" if doc.get("root_env") else ""
        if doc["name"] == "sample":
            hint = " (run `make sample` first)"
        raise ManifestError(f"{path}: pattern {storage.redact(pattern)!r} matches no shard{hint}")
    return ShardSet(doc["name"], root, tuple(found), doc["output"], expected, found)


def is_location(spec: str) -> bool:
    """Whether ``spec`` names shards directly (a URL, a brace pattern, a ``.tar`` or a local
    folder) rather than a manifest."""
    return (not storage.is_local(spec) or "{" in spec or spec.endswith(SHARD_SUFFIX)
            or os.path.isdir(storage.normalize(spec)))


def shard_set(spec: str) -> ShardSet:
    """The shard set ``spec`` names: a manifest name or ``.yaml`` (``load_manifest``), a folder /
    prefix holding ``.tar`` shards, or a brace pattern / single ``.tar`` (local or URL). A set
    given directly has no default output."""
    if not is_location(spec):
        return load_manifest(spec)
    try:
        loc = storage.normalize(spec)
    except ValueError as e:
        raise ManifestError(f"{storage.redact(spec)}: {e}") from None
    if "{" in loc or loc.endswith(SHARD_SUFFIX):
        root = storage.parent(loc)
        found = _listed(loc, root)
        prefix = storage.basename(loc).split("{")[0].removesuffix(SHARD_SUFFIX)
        name = prefix.strip("_-.") or storage.basename(root)
        if not found:
            raise ManifestError(f"pattern {storage.redact(loc)!r} matches no shard")
    else:
        root, name = loc, storage.basename(loc)
        try:
            listing = storage.listdir(loc)
        except OSError as e:
            raise storage.error("read", loc, e) from e
        found = {p: n for p, n in listing.items() if p.endswith(SHARD_SUFFIX)}
        if not found:
            raise ManifestError(f"no {SHARD_SUFFIX} shards in {storage.redact(loc)}")
    return ShardSet(name, root, tuple(found), None, None, found)


def main(argv=None) -> int:
    """``python -m pipeline.manifest NAME``: resolve a manifest and list its shards (exit 2 if bad)."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(description="check a shard-set manifest")
    ap.add_argument("name", help="manifest name (manifests/<name>.yaml) or a path to a .yaml")
    args = ap.parse_args(argv)
    try:
        s = load_manifest(args.name)
    except (ManifestError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{s.name}: {len(s.shards)} shards under {storage.redact(s.root)} -> {storage.redact(s.output)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
