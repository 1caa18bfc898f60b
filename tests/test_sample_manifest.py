"""make sample determinism and layout, manifest errors (one line, exit 2), the img2dataset command."""
import inspect
import json
import os
import subprocess
import sys
import tarfile

import pyarrow.parquet as pq
import pytest

from pipeline import download, sample
from pipeline.manifest import ManifestError, load_manifest
from tests.conftest import REPO


def test_sample_layout(sample_dir):
    shards = sorted(p.name for p in sample_dir.glob("*.tar"))
    assert shards == ["00000.tar", "00001.tar"]
    n = 0
    for shard in shards:
        stem = shard[:-4]
        with tarfile.open(sample_dir / shard) as tar:
            names = tar.getnames()
        keys = sorted({m.split(".")[0] for m in names})
        assert all(len(k) == 9 and k.startswith(stem) for k in keys)
        assert names == [f"{k}.{e}" for k in keys for e in ("jpg", "txt", "json")]
        table = pq.read_table(sample_dir / f"{stem}.parquet")
        assert table.column("key").to_pylist() == keys
        assert set(table.column("status").to_pylist()) == {"success"}
        stats = json.loads((sample_dir / f"{stem}_stats.json").read_text())
        assert stats["successes"] == len(keys)
        n += len(keys)
    assert n == len(sample.PHOTOS) >= 12
    assert {"camera", "coins", "moon", "stereo_motorcycle"} <= {p for p, _ in sample.PHOTOS}


def test_sample_is_byte_identical(sample_dir, tmp_path):
    sample.build(tmp_path)
    for f in sorted(sample_dir.iterdir()):
        assert (tmp_path / f.name).read_bytes() == f.read_bytes(), f.name


def test_sample_manifest_resolves(monkeypatch, sample_dir):
    monkeypatch.chdir(sample_dir.parent)
    (sample_dir.parent / "data").mkdir(exist_ok=True)
    link = sample_dir.parent / "data" / "sample"
    if not link.exists():
        link.symlink_to(sample_dir)
    s = load_manifest("sample")
    assert s.shards == ("data/sample/00000.tar", "data/sample/00001.tar") and s.expected_samples == 16
    assert s.sizes == {p: os.path.getsize(p) for p in s.shards}  # from the one listing


def test_cc3m_root_from_environment(tmp_path, monkeypatch):
    (tmp_path / "00007.tar").write_bytes(b"")
    monkeypatch.setenv("CC3M_ROOT", str(tmp_path))
    s = load_manifest("cc3m")
    assert s.shard_names == ["00007"] and s.root == str(tmp_path)


@pytest.mark.parametrize("text,message", [
    ("name: x\nroot: .\nshards: '{0..1}.tar'\n", r"missing field\(s\) \['output'\]"),
    ("name: x\nroot: .\nshards: a.tar\noutput: o\ncolour: red\n", r"unknown field\(s\) \['colour'\]"),
    ("name: x\nroot: .\nshards: 'nothing{0..3}.tar'\noutput: o\n", "matches no shard"),
    ("- just\n- a list\n", "expected a mapping"),
    ("name: [unclosed\n", "not valid YAML"),
    ("name: x\nroot: .\nshards: a.tar\noutput: o\nexpected_samples: many\n", "non-negative integer"),
])
def test_bad_manifest_one_line_exit_2(tmp_path, text, message):
    path = tmp_path / "m.yaml"
    path.write_text(text)
    with pytest.raises(ManifestError, match=message):
        load_manifest(str(path))
    r = subprocess.run([sys.executable, "-m", "pipeline.manifest", str(path)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\nroot: .\nshards: a\noutput: o\n")
    with pytest.raises(ManifestError, match="not valid YAML"):
        load_manifest(str(path))


def test_download_command_matches_img2dataset(tmp_path):
    img2dataset = pytest.importorskip("img2dataset")
    params = inspect.signature(img2dataset.download).parameters
    cmd = download.build_command("cc3m.tsv", str(tmp_path))
    assert cmd[0] == "img2dataset"
    for arg in cmd[1:]:
        name, _, value = arg[2:].partition("=")
        assert name in params, f"img2dataset has no option --{name}"
        default = params[name].default
        if isinstance(default, bool):
            assert value in ("True", "False"), arg
        elif isinstance(default, int):
            int(value)
    assert "--output_format=webdataset" in cmd and "--caption_col=caption" in cmd


def test_download_adds_the_tsv_header(tmp_path, monkeypatch):
    tsv = tmp_path / "Train_GCC-training.tsv"
    tsv.write_text("a dog on a beach\thttp://example.invalid/1.jpg\n")
    monkeypatch.setenv("CC3M_ROOT", str(tmp_path / "cc3m"))
    assert download.main(["--tsv", str(tsv), "--dry-run"]) == 0
    headed = tmp_path / "cc3m" / "Train_GCC-training.with_header.tsv"
    assert headed.read_text().splitlines() == ["caption\turl", "a dog on a beach\thttp://example.invalid/1.jpg"]
    assert download.main(["--tsv", str(tmp_path / "missing.tsv"), "--dry-run"]) == 2


def test_download_to_a_bucket_keeps_the_headed_tsv_local(tmp_path, monkeypatch, capsys):
    tsv = tmp_path / "Train_GCC-training.tsv"
    tsv.write_text("a dog on a beach\thttp://example.invalid/1.jpg\n")
    monkeypatch.setenv("CC3M_ROOT", "s3://my-bucket/cc3m")
    assert download.main(["--tsv", str(tsv), "--dry-run"]) == 0  # prints the command, contacts nothing
    cmd = capsys.readouterr().out.split()
    assert "--output_folder=s3://my-bucket/cc3m" in cmd  # img2dataset writes the shards there (fsspec)
    assert f"--url_list={tmp_path / 'Train_GCC-training.with_header.tsv'}" in cmd
    assert (tmp_path / "Train_GCC-training.with_header.tsv").is_file()
