"""``make download SHARDS=cc3m TSV=...``: fetch CC3M with img2dataset, the standard tool.

Needs internet (a user's cluster, not our machines). The manifest's root (``CC3M_ROOT``) may be a
bucket URL: img2dataset then writes the shards straight there. The TSV is Google's
``Train_GCC-training.tsv`` (caption<TAB>url, no header); we add the header img2dataset expects.

    python -m pipeline.download --shards cc3m --tsv Train_GCC-training.tsv [--processes 16] [--dry-run]
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline import storage
from pipeline.manifest import ManifestError, load_manifest

# img2dataset's documented CC3M recipe; 512 px keeps the paper's base training resolution reachable.
CC3M_OPTIONS = {
    "input_format": "tsv",
    "url_col": "url",
    "caption_col": "caption",
    "output_format": "webdataset",
    "image_size": 512,
    "resize_mode": "keep_ratio",
    "resize_only_if_bigger": True,
    "encode_quality": 95,
    "number_sample_per_shard": 10000,
    "processes_count": 16,
    "thread_count": 64,
    "timeout": 10,
    "retries": 1,
    "enable_wandb": False,
}


def with_header(tsv: Path, out_dir: Path) -> Path:
    """img2dataset needs named columns; Google's file has none."""
    first = tsv.open("rb").readline()
    if first.strip().lower() in (b"caption\turl", b"url\tcaption"):
        return tsv
    headed = out_dir / (tsv.stem + ".with_header.tsv")
    if not headed.exists():
        tmp = headed.with_suffix(".tmp")
        with tmp.open("wb") as dst, tsv.open("rb") as src:
            dst.write(b"caption\turl\n")
            shutil.copyfileobj(src, dst)
        tmp.replace(headed)
    return headed


def build_command(url_list: str, output_folder: str, **overrides) -> list[str]:
    opts = {**CC3M_OPTIONS, **overrides}
    cmd = ["img2dataset", f"--url_list={url_list}", f"--output_folder={output_folder}"]
    cmd += [f"--{k}={v}" for k, v in opts.items()]
    return cmd


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="download CC3M shards with img2dataset")
    ap.add_argument("--shards", default="cc3m", help="manifest name; its root is the output folder")
    ap.add_argument("--tsv", required=True, help="CC3M TSV (caption<TAB>url)")
    ap.add_argument("--processes", type=int, default=CC3M_OPTIONS["processes_count"])
    ap.add_argument("--dry-run", action="store_true", help="print the command only")
    args = ap.parse_args(argv)
    try:
        shard_set = load_manifest(args.shards, require_shards=False)
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tsv = Path(args.tsv)
    if not tsv.is_file():
        print(f"error: TSV {tsv} not found (pass TSV=path/to/Train_GCC-training.tsv)", file=sys.stderr)
        return 2
    # img2dataset writes to a folder or straight to a bucket (fsspec: s3://, gs://); the TSV with
    # its header stays local, in the output folder or next to the TSV
    storage.makedirs(shard_set.root)
    headed = with_header(tsv, Path(shard_set.root) if storage.is_local(shard_set.root) else tsv.parent)
    cmd = build_command(str(headed), shard_set.root, processes_count=args.processes)
    print(shlex.join(cmd))
    if args.dry_run:
        return 0
    if shutil.which("img2dataset") is None:
        print("error: img2dataset is not installed: pip install -e '.[download]'", file=sys.stderr)
        return 2
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
