"""cliptex_labels, the light reader: the strict key join (and the trainer's use of it), decoded
samples, the webdataset handler, the torch dataset, EXIF orientation end to end, and a fresh virtual
environment without torch running docs/LABELS.md's examples."""
from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image, ImageOps

import cliptex_labels as CL
from cliptex_labels import JoinReport, Joined, LabelTar, Skip, join_shard, samples
from cliptex_labels.images import apply_orientation, decode_record
from pipeline import labels
from pipeline.shards import Record, iter_records
from pipeline.storage import write_tar_atomic
from pipeline.worker import WorkerConfig, process_shard
from tests.conftest import REPO
from tests.test_shards import jpeg, raw_tar


def stored(root: Path, task: str, shard: str) -> dict[str, dict[str, bytes]]:
    with LabelTar(root / task / shard) as t:
        return dict(t.items())


@pytest.fixture(scope="module")
def photos(sample_dir):
    return [r for r in iter_records(sorted(sample_dir.glob("*.tar"))[0]) if isinstance(r, Record)]


def members(rec: Record, key: str) -> list[tuple[str, bytes]]:
    return [(f"{key}.{ext}", data) for ext, data in rec.members.items()]


# ---- decoded samples ------------------------------------------------------------------------------

@pytest.mark.timeout(300)
def test_samples_are_the_pipelines_images_with_their_own_labels(sample_dir, smoke_labels):
    report = JoinReport()
    got = list(samples(sample_dir, smoke_labels, report=report))
    assert report.summary() == {"samples": 16, "joined": 16, "skipped": {}, "missing": {}, "extra": {},
                                "damage": []}
    sources = {r.key: r for p in sorted(sample_dir.glob("*.tar")) for r in iter_records(p)}
    assert [s["key"] for s in got] == list(sources)
    trees = {t: {k: v for p in sorted(sample_dir.glob("*.tar")) for k, v in stored(smoke_labels, t, p.name).items()}
             for t in labels.TASKS}
    for s in got:
        ref = decode_record(sources[s["key"]])
        assert np.array_equal(s["image"], ref.image) and s["caption"] == ref.caption and s["orientation"] == 1
        kinds = {k for t in labels.TASKS for k in trees[t][s["key"]]}
        assert kinds == {"seg", "depth", "normal", "normal_conf"} <= set(s)
        for t in labels.TASKS:
            for kind, data in trees[t][s["key"]].items():
                want = labels.decode(labels.member_name(s["key"], kind), data)
                assert s[kind].dtype == want.dtype and np.array_equal(s[kind], want), (s["key"], kind)
    # any subset of the trees, and the kinds required
    only = list(samples(sample_dir, smoke_labels, tasks=("depth",), kinds={"depth": ["depth"]}, decode_images=False))
    assert len(only) == 16 and set(only[0]) == {"key", "image", "caption", "depth", "orientation"}
    assert isinstance(only[0]["image"], bytes)


# ---- the join: missing, extra, repeated, damaged ---------------------------------------------------

@pytest.mark.timeout(300)
def test_join_reports_missing_extra_repeated_and_damaged_labels(sample_dir, smoke_labels, tmp_path):
    shard = sorted(sample_dir.glob("*.tar"))[0]
    keys = [r.key for r in iter_records(shard)]
    root = tmp_path / "labels"
    depth = stored(smoke_labels, "depth", shard.name)
    normal = stored(smoke_labels, "normal", shard.name)
    seg = stored(smoke_labels, "seg", shard.name)
    # depth: keys[0] missing, keys[1]'s member twice (the second another sample's map), one extra key
    write_tar_atomic(root / "depth" / shard.name,
                     [(labels.member_name(k, "depth"), depth[k]["depth"]) for k in keys[1:]]
                     + [(labels.member_name(keys[1], "depth"), depth[keys[2]]["depth"]),
                        (labels.member_name("zzz", "depth"), depth[keys[3]]["depth"])])
    # normal: cut in the middle of the tar -> damage, and the keys after the cut are missing
    write_tar_atomic(root / "normal" / shard.name, [(labels.member_name(k, kind), b) for k in keys
                                                    for kind, b in normal[k].items()])
    data = (root / "normal" / shard.name).read_bytes()
    (root / "normal" / shard.name).write_bytes(data[: len(data) // 2])
    write_tar_atomic(root / "seg" / shard.name, [(labels.member_name(k, "seg"), seg[k]["seg"]) for k in keys])

    report = JoinReport()
    tars = {t: root / t / shard.name for t in labels.TASKS}
    items = list(join_shard(shard, tars, report=report))
    joined = [i for i in items if isinstance(i, Joined)]
    skips = [(i.key, i.reason) for i in items if isinstance(i, Skip)]
    with LabelTar(tars["normal"]) as t:
        normal_keys = [k for k in t.keys() if set(t.kinds(k)) == {"normal", "normal_conf"}]
    assert 0 < len(normal_keys) < len(keys)
    ok = [k for k in keys[2:] if k in normal_keys]
    assert [j.key for j in joined] == ok
    for j in joined:  # every joined record carries exactly its own key's bytes
        assert j.labels["depth"]["depth"] == depth[j.key]["depth"] and j.labels["seg"]["seg"] == seg[j.key]["seg"]
        assert j.labels["normal"] == normal[j.key] and j.members["jpg"] == next(
            r for r in iter_records(shard) if r.key == j.key).members["jpg"]
    assert skips[0] == (None, "label_read_error")
    assert (keys[0], "missing_depth") in skips and (keys[1], "duplicate_label_member") in skips
    assert ("zzz", "extra_depth") in skips
    assert {k for k, r in skips if r == "missing_normal"} == set(keys[2:]) - set(normal_keys)
    s = report.summary()
    assert s["samples"] == len(keys) == s["joined"] + sum(s["skipped"].values())
    assert report.extra == {"depth": ["zzz"]} and report.missing["depth"] == [keys[0]]
    assert len(report.damage) == 1 and report.damage[0].startswith("normal tar")


@pytest.mark.timeout(300)
def test_a_zstd_bomb_in_a_label_tar_costs_its_sample_only(sample_dir, smoke_labels, tmp_path):
    import json
    import struct

    import zstandard

    shard = sorted(sample_dir.glob("*.tar"))[0]
    keys = [r.key for r in iter_records(shard)]
    depth = stored(smoke_labels, "depth", shard.name)
    header, _ = labels.read_header(depth[keys[2]]["depth"])
    h = json.dumps(header).encode()  # a true header, and 1 GiB of zeros behind it (about 40 KB)
    bomb = struct.pack("<4sHH", b"CTXL", 2, len(h)) + h + zstandard.ZstdCompressor().compress(bytes(1 << 30))
    write_tar_atomic(tmp_path / "depth" / shard.name,
                     [(labels.member_name(k, "depth"), bomb if k == keys[2] else depth[k]["depth"]) for k in keys])
    report = JoinReport()
    got = [s["key"] for s in samples(shard, tmp_path, report=report)]
    assert got == keys[:2] + keys[3:]
    assert report.summary()["skipped"] == {"bad_depth": 1} and report.samples == len(keys)


def test_label_tar_hands_each_key_out_once(smoke_labels):
    tar = sorted((smoke_labels / "seg").glob("*.tar"))[0]
    with LabelTar(tar) as t:
        key = t.keys()[0]
        first = t.take(key, ["seg"])
        assert isinstance(first, dict) and first["seg"] == t.read(key, "seg")
        assert t.take(key, ["seg"]) == "duplicate_key"  # never a second copy of one key's labels
        assert t.take("no-such-key", ["seg"]) == "missing"
        assert key not in t.extra() and len(t.extra()) == len(t.keys()) - 1


@pytest.mark.timeout(120)
def test_a_source_sample_skipped_by_the_reader_leaves_no_extra_labels(photos, null_experts, tmp_path):
    """Labels made from a clean copy; the shard then gets a repeated member in k1: k1 is skipped
    (duplicate_member), and its labels are not 'extra' — the source has the key."""
    (tmp_path / "clean").mkdir()
    clean = raw_tar(tmp_path / "clean" / "00000.tar", members(photos[0], "k1") + members(photos[1], "k2"))
    process_shard(clean, tmp_path / "labels", null_experts, WorkerConfig(profile="null", torch_threads=1))
    bad = raw_tar(tmp_path / "00000.tar", [("k1.jpg", photos[2].members["jpg"])] + members(photos[0], "k1")
                  + members(photos[1], "k2"))
    report = JoinReport()
    items = list(join_shard(bad, {t: tmp_path / "labels" / t / "00000.tar" for t in labels.TASKS}, report=report))
    assert [(i.key, type(i).__name__, getattr(i, "reason", "")) for i in items] == [
        ("k1", "Skip", "duplicate_member"), ("k2", "Joined", "")]
    assert report.extra == {} and report.summary()["skipped"] == {"duplicate_member": 1}


def test_unreadable_label_tars_are_damage_not_silence(tmp_path, sample_dir):
    shard = sorted(sample_dir.glob("*.tar"))[0]
    (tmp_path / "garbage.tar").write_bytes(b"this is not a tar" * 100)
    for tar in (tmp_path / "garbage.tar", tmp_path / "absent.tar"):
        report = JoinReport()
        items = list(join_shard(shard, {"seg": tar}, report=report))
        assert [(i.key, i.reason) for i in items if i.key is None] == [(None, "label_read_error")]
        assert report.summary()["skipped"] == {"missing_seg": 8} and report.joined == 0


# ---- the trainer reads through the join (issue 11: duplicate keys / members, read errors) ---------

@pytest.mark.timeout(120)
def test_trainer_never_gives_a_repeated_key_the_first_samples_labels(photos, null_experts, tmp_path):
    from trainer import data as D

    src = raw_tar(tmp_path / "00000.tar", members(photos[0], "a") + members(photos[1], "b") + members(photos[2], "a"))
    out = tmp_path / "labels"
    process_shard(src, out, null_experts, WorkerConfig(profile="null", torch_threads=1))
    tars = {t: str(out / t / src.name) for t in labels.TASKS}
    items = list(D.join_shard(str(src), tars, D.TASK_KINDS))
    recs = [i for i in items if isinstance(i, dict)]
    assert [(r["key"], r["img"]) for r in recs] == [("a", photos[0].members["jpg"]), ("b", photos[1].members["jpg"])]
    assert [i[1] for i in items if isinstance(i, tuple)] == ["duplicate_key", "samples_skipped"]
    for r in recs:
        header, _ = labels.read_header(r["labels"]["depth"]["depth"])
        img = Image.open(io.BytesIO(r["img"]))
        assert header["image_size"] == [img.height, img.width]  # labels made for this very image
    assert photos[0].members["jpg"] != photos[2].members["jpg"]


@pytest.mark.timeout(120)
def test_trainer_skips_repeated_label_members_and_counts_read_errors(sample_dir, smoke_labels, tmp_path):
    from trainer import data as D

    shard = sorted(sample_dir.glob("*.tar"))[0]
    keys = [r.key for r in iter_records(shard)]
    depth = stored(smoke_labels, "depth", shard.name)
    tar = tmp_path / "depth" / shard.name
    write_tar_atomic(tar, [(labels.member_name(k, "depth"), depth[k]["depth"]) for k in keys]
                     + [(labels.member_name(keys[3], "depth"), depth[keys[4]]["depth"])])  # keys[3] twice
    items = list(D.join_shard(str(shard), {"depth": str(tar)}, D.TASK_KINDS))
    assert [i["key"] for i in items if isinstance(i, dict)] == keys[:3] + keys[4:]
    assert [i[1] for i in items if isinstance(i, tuple)] == ["duplicate_label_member", "samples_skipped"]

    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])  # damaged: what comes after the cut is missing
    items = list(D.join_shard(str(shard), {"depth": str(tar)}, D.TASK_KINDS))
    reasons = [i[1] for i in items if isinstance(i, tuple)]
    n_ok = sum(isinstance(i, dict) for i in items)
    assert reasons[0] == "label_read_error" and reasons.count("label_read_error") == 1
    assert 0 < n_ok < len(keys) and reasons.count("samples_skipped") == len(keys) - n_ok
    assert reasons.count("missing_depth") + reasons.count("duplicate_label_member") == len(keys) - n_ok
    assert set(reasons) <= set(D.REASONS)


# ---- webdataset and torch ------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_webdataset_decode_handler(smoke_labels):
    import webdataset as wds

    tar = sorted((smoke_labels / "normal").glob("*.tar"))[0]
    want = stored(smoke_labels, "normal", tar.name)
    got = list(wds.WebDataset(str(tar), shardshuffle=False).decode(CL.wds_decoder))
    assert [s["__key__"] for s in got] == list(want)
    for s in got:
        for kind in ("normal", "normal_conf"):
            ref = labels.decode(labels.member_name(s["__key__"], kind), want[s["__key__"]][kind])
            assert np.array_equal(s[f"{kind}.lbl"], ref)
    assert CL.wds_decoder(".jpg", b"\xff\xd8") is None  # other members are left to other handlers
    with pytest.raises(labels.LabelFormatError, match="holds a 'normal'"):
        CL.wds_decoder(".depth.lbl", want[got[0]["__key__"]]["normal"])


@pytest.mark.timeout(300)
def test_torch_dataset_splits_shards_over_workers(sample_dir, smoke_labels):
    import torch

    ds = CL.LabelDataset(sample_dir, smoke_labels, tasks=("seg", "depth"))
    seen = list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2))
    ref = {s["key"]: s for s in samples(sample_dir, smoke_labels, tasks=("seg", "depth"))}
    assert sorted(s["key"] for s in seen) == sorted(ref) and len(seen) == 16
    for s in seen:
        assert s["seg"].dtype == torch.uint8 and s["depth"].dtype == torch.float32
        assert np.array_equal(s["depth"].numpy(), ref[s["key"]]["depth"])
        assert np.array_equal(s["image"].numpy(), ref[s["key"]]["image"])


# ---- EXIF orientation -----------------------------------------------------------------------------

def test_apply_orientation_matches_pil_exif_transpose():
    a = np.arange(3 * 5 * 3, dtype=np.uint8).reshape(3, 5, 3)
    for o in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = o
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG", exif=exif.tobytes())
        img = Image.open(io.BytesIO(buf.getvalue()))
        want = np.asarray(ImageOps.exif_transpose(img))
        assert np.array_equal(apply_orientation(a, o), want), o
    with pytest.raises(ValueError):
        apply_orientation(a, 9)


class RedSeg:
    """A seg 'expert' whose map is a function of the image it is given (class 1 where red > 128), so
    the labels show which orientation of the image they were made from."""
    task, name, checkpoints = "seg", "red", {}

    @staticmethod
    def map_of(image: np.ndarray, hw) -> np.ndarray:
        small = np.asarray(Image.fromarray(image).resize((hw[1], hw[0]), Image.NEAREST))
        return (small[..., 0] > 128).astype(np.uint8)

    def predict(self, images, sizes=None):
        return [{"seg": self.map_of(im, hw)} for im, hw in zip(images, sizes)]

    def describe(self):
        return {"name": self.name}


@pytest.mark.timeout(120)
def test_labels_follow_the_exif_orientation_for_square_and_other_images(null_experts, tmp_path):
    import skimage.data

    astro = skimage.data.astronaut()  # 512 x 512, red-heavy top left, not symmetric
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, displayed rotated 90 degrees clockwise
    tall = jpeg(astro[::2, :300:2], exif=exif.tobytes())      # stored 256 x 150
    square = jpeg(astro[::2, ::2], exif=exif.tobytes())       # stored 256 x 256
    src = raw_tar(tmp_path / "00000.tar", [("tall.jpg", tall), ("tall.txt", b"a"), ("sq.jpg", square), ("sq.txt", b"b")])
    out = tmp_path / "labels"
    stats = process_shard(src, out, {**null_experts, "seg": RedSeg()}, WorkerConfig(profile="null", torch_threads=1))
    assert stats["exif_orientations"] == {"6": 2} and stats["ok"] == 2
    got = {s["key"]: s for s in samples(src, out)}
    for key, data in (("tall", tall), ("sq", square)):
        with LabelTar(out / "seg" / src.name) as t:
            header, seg = labels.decode_with_header(t.read(key, "seg"))
        plain = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # what a plain reader sees
        assert header["orientation"] == 6 == got[key]["orientation"]
        assert header["image_size"] == [plain.shape[1], plain.shape[0]]  # after the rotation
        upright = apply_orientation(plain, header["orientation"])
        assert np.array_equal(upright, got[key]["image"])  # the reader's image is the labelled one
        assert np.array_equal(RedSeg.map_of(got[key]["image"], seg.shape), seg)
        # without the rotation a square image's labels fit the shape, and are wrong
        if key == "sq":
            assert plain.shape == upright.shape and not np.array_equal(RedSeg.map_of(plain, seg.shape), seg)


# ---- a fresh virtual environment: the light package alone ------------------------------------------

def _index_reachable() -> bool:
    url = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple")
    host = urlparse(url).hostname or "pypi.org"
    try:
        socket.create_connection((host, 443), timeout=5).close()
        return True
    except OSError:
        return False


def doc_examples() -> list[str]:
    """The code blocks of docs/LABELS.md marked as executed by this test."""
    doc = (REPO / "docs" / "LABELS.md").read_text()
    return re.findall(r"<!-- executed by tests/test_light_reader\.py[^>]*-->\n```python\n(.*?)```", doc, re.S)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_light_package_installs_without_torch_and_runs_the_documented_example(sample_dir, smoke_labels, tmp_path):
    examples = doc_examples()
    assert len(examples) == 2 and len(examples[0].strip().splitlines()) <= 10
    if not _index_reachable():
        pytest.skip("no package index reachable (PIP_INDEX_URL / pypi.org): cannot install into a fresh venv")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    pkg = tmp_path / "src" / "cliptex_labels"  # a copy: building must not write into the checkout
    shutil.copytree(REPO / "cliptex_labels", pkg, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{pkg}[all]"],
                       capture_output=True, text=True, timeout=800)
    assert r.returncode == 0, r.stdout + r.stderr
    frozen = subprocess.run([str(py), "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout
    names = {ln.split("==")[0].split(" @ ")[0].lower() for ln in frozen.splitlines()}
    assert "cliptex-labels" in names and not names & {"torch", "ray", "transformers", "torchvision"}, names
    work = tmp_path / "work"
    (work / "data" / "labels").mkdir(parents=True)
    (work / "data" / "sample").symlink_to(sample_dir, target_is_directory=True)
    (work / "data" / "labels" / "sample").symlink_to(smoke_labels, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    outputs = []
    for code in examples:
        r = subprocess.run([str(py), "-c", "import sys; assert 'torch' not in sys.modules\n" + code
                            + "\nassert 'torch' not in sys.modules"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        outputs.append(r.stdout)
    lines = outputs[0].strip().splitlines()
    assert len(lines) == 17 and "'joined': 16" in lines[-1], outputs[0]
    assert len(outputs[1].strip().splitlines()) == 8, outputs[1]
    r = subprocess.run([str(py), "-c", "import torch"], capture_output=True, text=True)
    assert r.returncode != 0  # and torch really is not there
