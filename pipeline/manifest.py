"""Shard-set manifests: ``manifests/<name>.yaml`` names the source shards of a job.

    name: cc3m
    root: data/cc3m            # default root
    root_env: CC3M_ROOT        # optional: the environment variable that overrides root
    shards: "{00000..00331}.tar"   # brace pattern, relative to root
    expected_samples: 2900000  # optional: a sanity figure reported next to what was found
    output: data/labels/cc3m   # default label output root

Any problem is a ``ManifestError`` whose message fits on one line; CLIs print it and exit 2.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml
from braceexpand import braceexpand

from pipeline import storage

REQUIRED = {"name", "root", "shards", "output"}
OPTIONAL = {"root_env", "expected_samples", "description"}
MANIFEST_DIR = Path(__file__).resolve().parent.parent / "manifests"


class ManifestError(ValueError):
    pass


@dataclass(frozen=True)
class ShardSet:
    name: str
    root: Path
    shards: tuple[Path, ...]
    output: Path
    expected_samples: int | None = None

    @property
    def shard_names(self) -> list[str]:
        return [p.stem for p in self.shards]


def manifest_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        return p
    return MANIFEST_DIR / f"{name_or_path}.yaml"


def load_manifest(name_or_path: str, *, require_shards: bool = True) -> ShardSet:
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
    if not storage.is_local(root_text):  # until shards are read through pipeline.storage
        raise ManifestError(f"{path}: root {storage.redact(root_text)} is an object-store URL; reading "
                            f"shards from a bucket is not supported yet (docs/STORAGE.md)")
    root = Path(storage.normalize(root_text))
    shards = tuple(root / s for s in braceexpand(doc["shards"]))
    if require_shards:
        present = [p for p in shards if p.is_file()]
        if not present:
            hint = f" (set {doc['root_env']} to its folder)" if doc.get("root_env") else ""
            if doc["name"] == "sample":
                hint = " (run `make sample` first)"
            raise ManifestError(f"{path}: pattern {str(root / doc['shards'])!r} matches no shard{hint}")
        shards = tuple(present)
    return ShardSet(doc["name"], root, shards, Path(doc["output"]), expected)


def main(argv=None) -> int:
    """``python -m pipeline.manifest NAME``: resolve a manifest and list its shards (exit 2 if bad)."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(description="check a shard-set manifest")
    ap.add_argument("name", help="manifest name (manifests/<name>.yaml) or a path to a .yaml")
    args = ap.parse_args(argv)
    try:
        s = load_manifest(args.name)
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{s.name}: {len(s.shards)} shards under {s.root} -> {s.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
