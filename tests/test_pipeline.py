"""Pseudo-label worker, resume planning, manifest, CLI errors and preview — no Ray here (the Ray
job, faults and clusters are in test_pipeline_ray.py / test_pipeline_cluster.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from cliptex_labels import LabelTar
from pipeline import labels
from pipeline.shards import Sample, iter_samples, tar_bytes
from pipeline.worker import WorkerConfig, process_shard, stats_path
from tests.conftest import guard_events, network_guard

REPO = Path(__file__).resolve().parent.parent
PROFILE = "smoke"


# ----------------------------------------------------------------------------------------------
# helpers shared with the Ray tests


def source_keys(shard: Path) -> list[str]:
    """Keys of the samples that decode, in source order."""
    return [s.key for s in iter_samples(shard) if isinstance(s, Sample)]


def tar_members(tar: Path) -> list[tuple[str, bytes]]:
    """Every (name, bytes) of any tar, in order: for building damaged inputs and comparing bytes."""
    with tarfile.open(tar) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers()]


def label_keys(tar: Path) -> list[str]:
    """Keys of a label tar in tar order, through the project's one label-tar reader."""
    with LabelTar(tar) as t:
        assert t.damage is None and not t.index.duplicates and not t.index.foreign, tar
        return t.keys()


def tree_files(root: Path) -> dict[str, bytes]:
    """Every label tar under root (relative path -> bytes)."""
    return {str(p.relative_to(root)): p.read_bytes()
            for task in labels.TASKS for p in sorted((root / task).glob("*.tar"))}


def assert_aligned(src_dir: Path, out: Path, tasks=labels.TASKS) -> None:
    shards = sorted(src_dir.glob("*.tar"))
    for task in tasks:
        assert sorted(p.name for p in (out / task).glob("*.tar")) == [p.name for p in shards], task
        for shard in shards:
            assert label_keys(out / task / shard.name) == source_keys(shard), (task, shard.name)


def write_manifest_yaml(path: Path, root: Path, name: str = "test", pattern: str = "*.tar") -> Path:
    shards = sorted(p.name for p in root.glob(pattern))
    pattern = "{" + ",".join(p[:-4] for p in shards) + "}.tar" if len(shards) > 1 else shards[0]
    path.write_text(f"name: {name}\nroot: {root}\nshards: \"{pattern}\"\noutput: {root}/labels\n")
    return path


@pytest.fixture(scope="module")
def smoke_experts():
    import torch

    from pipeline.worker import build_experts

    torch.set_num_threads(1)
    return build_experts(labels.TASKS, PROFILE, "cpu")


def small_shard(src: Path, dst: Path, n: int) -> Path:
    """The first ``n`` samples of a shard, as a new shard."""
    keys = source_keys(src)[:n]
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(tar_bytes([(m, d) for m, d in tar_members(src) if m.split(".")[0] in keys]))
    return dst


def _cfg(**kw) -> WorkerConfig:
    return WorkerConfig(profile=PROFILE, torch_threads=1, **kw)


# ----------------------------------------------------------------------------------------------
# the worker


@pytest.mark.timeout(300)
def test_process_shard_labels_every_sample_in_source_order(sample_dir, null_experts, tmp_path):
    shard = sorted(sample_dir.glob("*.tar"))[0]
    stats = process_shard(shard, tmp_path, null_experts, _cfg(batch_size=3))
    keys = source_keys(shard)
    assert stats["ok"] == len(keys) == 8 and stats["skipped"] == 0 and stats["skips"] == []
    images = {s.key: s.image.shape[:2] for s in iter_samples(shard)}
    for task in labels.TASKS:
        tar = tmp_path / task / shard.name
        assert label_keys(tar) == keys
        members = tar_members(tar)
        # the streaming writer makes the same bytes as the reference writer
        assert tar.read_bytes() == tar_bytes(members)
        assert stats["outputs"][task]["members"] == len(members)
        with LabelTar(tar) as t:
            for key, kinds in t.items():
                assert list(kinds) == list(stats["outputs"][task]["kinds"])
                for kind, data in kinds.items():
                    header, arr = labels.decode_with_header(data)
                    assert tuple(header["image_size"]) == images[key] and header["orientation"] == 1
                    assert arr.shape[:2] == labels.label_shape(images[key], 0.5)
    assert stats["outputs"]["normal"]["kinds"] == ["normal", "normal_conf"]
    marker = json.loads(Path(stats_path(tmp_path, shard.stem)).read_text())
    assert marker["ok"] == 8 and marker["outputs"]["seg"]["sha256"] == stats["outputs"]["seg"]["sha256"]
    assert sum(marker["class_pixels"]) + marker["ignore_pixels"] == sum(
        int(np.prod(labels.label_shape(hw, 0.5))) for hw in images.values())
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


@pytest.mark.timeout(300)
def test_process_shard_is_deterministic_and_rewrites_atomically(sample_dir, smoke_experts, tmp_path):
    shard = small_shard(sorted(sample_dir.glob("*.tar"))[1], tmp_path / "src" / "00001.tar", 3)
    a, b = tmp_path / "a", tmp_path / "b"
    process_shard(shard, a, smoke_experts, _cfg(batch_size=3))
    # a stale temporary file from a killed worker is removed, the old marker is dropped first
    (b / "seg").mkdir(parents=True)
    (b / "seg" / f".{shard.name}.tmp999999").write_bytes(b"partial")
    process_shard(shard, b, smoke_experts, _cfg(batch_size=3))
    assert tree_files(a) == tree_files(b)
    assert not list((b / "seg").glob(".*"))


@pytest.mark.timeout(300)
def test_device_codes_and_host_encoding_write_the_same_bytes(sample_dir, smoke_experts, tmp_path):
    """On a CPU the device conversion (pipeline.labels_torch) is bit-identical to the host's, so a
    worker's output does not depend on where the codes were computed."""
    shard = small_shard(sorted(sample_dir.glob("*.tar"))[0], tmp_path / "src" / "00000.tar", 3)
    host, device = tmp_path / "host", tmp_path / "device"
    process_shard(shard, host, smoke_experts, _cfg(batch_size=3))
    for e in smoke_experts.values():
        e.device_codes = True
    try:
        process_shard(shard, device, smoke_experts, _cfg(batch_size=3))
    finally:
        for e in smoke_experts.values():
            e.device_codes = False
    a = tree_files(host)
    assert len(a) == len(labels.TASKS) and a == tree_files(device)


@pytest.mark.timeout(120)
def test_codes_at_the_wrong_size_are_a_recorded_skip(sample_dir, null_experts, tmp_path):
    from expert_wrappers.null import constant_codes

    class WrongSize:
        task, name, checkpoints = "depth", "wrong-size", {}

        def predict(self, images, sizes=None):
            return [{"depth": constant_codes("depth", (h + 1, w))} for h, w in sizes]

        def describe(self):
            return {"name": self.name}

    shard = small_shard(sorted(sample_dir.glob("*.tar"))[0], tmp_path / "src" / "00000.tar", 2)
    stats = process_shard(shard, tmp_path / "out", {**null_experts, "depth": WrongSize()}, _cfg())
    assert stats["ok"] == 0 and stats["skip_reasons"] == {"label_encode_error": 2}
    assert "label resolution" in stats["skips"][0]["detail"]


def _damaged_dir(sample_dir: Path, root: Path) -> dict[str, list[str]]:
    """Shards with a truncated tar, corrupt/truncated JPEGs, a missing caption and an empty file.
    Returns the keys expected to be labelled per shard."""
    root.mkdir(parents=True, exist_ok=True)
    src = sorted(sample_dir.glob("*.tar"))
    raw = src[0].read_bytes()
    # cut in the middle of the archive: the samples before the damage are kept
    (root / "00000.tar").write_bytes(raw[: len(raw) * 3 // 5])
    members = tar_members(src[1])
    bad = []
    for name, data in members:
        if name == "000010001.jpg":
            data = data[: len(data) // 3]  # truncated JPEG
        elif name == "000010003.jpg":
            data = b"\xff\xd8\xff\xe0 this is not a jpeg" * 10
        elif name == "000010005.txt":
            continue  # no caption
        bad.append((name, data))
    (root / "00001.tar").write_bytes(tar_bytes(bad))
    (root / "00002.tar").write_bytes(b"")
    return {p.name: source_keys(p) for p in sorted(root.glob("*.tar"))}


@pytest.mark.timeout(300)
def test_damaged_shards_complete_with_skips_recorded(sample_dir, null_experts, tmp_path):
    expected = _damaged_dir(sample_dir, tmp_path / "src")
    assert 0 < len(expected["00000.tar"]) < 8 and len(expected["00001.tar"]) == 5
    out = tmp_path / "out"
    reasons = {}
    damage = {}
    for shard in sorted((tmp_path / "src").glob("*.tar")):
        stats = process_shard(shard, out, null_experts, _cfg())
        reasons[shard.stem] = {(s["key"], s["reason"]) for s in stats["skips"]}
        damage[shard.stem] = [d["reason"] for d in stats["shard_damage"]]
        assert stats["ok"] == len(expected[shard.name])
        assert stats["samples"] == stats["ok"] + stats["skipped"]
        for task in labels.TASKS:
            assert label_keys(out / task / shard.name) == expected[shard.name]
    assert damage == {"00000": ["truncated_tar"], "00001": [], "00002": ["empty_tar"]}
    assert {r for _, r in reasons["00000"]} <= {"incomplete_sample"}  # the sample the cut went through
    got = dict(reasons["00001"])
    assert set(got) == {"000010001", "000010003", "000010005"}
    assert got["000010001"] == "truncated_image" and got["000010005"] == "missing_caption"
    assert got["000010003"] in ("truncated_image", "not_an_image")
    assert reasons["00002"] == set()


class _FailOn:
    """A real expert that raises on one image size: one bad image must cost only itself."""

    def __init__(self, inner, bad_hw):
        self.inner, self.bad_hw = inner, bad_hw
        self.task, self.name, self.checkpoints = inner.task, inner.name, inner.checkpoints

    def predict(self, images, sizes=None):
        if any(im.shape[:2] == self.bad_hw for im in images):
            raise RuntimeError("CUDA out of memory (simulated)")
        return self.inner.predict(images, sizes)

    def describe(self):
        return self.inner.describe()


@pytest.mark.timeout(300)
def test_expert_error_skips_only_that_image(sample_dir, null_experts, tmp_path):
    shard = sorted(sample_dir.glob("*.tar"))[0]
    samples = [s for s in iter_samples(shard)]
    bad = samples[2]
    experts = dict(null_experts, depth=_FailOn(null_experts["depth"], bad.image.shape[:2]))
    same_size = [s.key for s in samples if s.image.shape[:2] == bad.image.shape[:2]]
    stats = process_shard(shard, tmp_path, experts, _cfg(batch_size=4))
    assert [(s["key"], s["reason"]) for s in stats["skips"]] == [(k, "expert_error") for k in same_size]
    assert "out of memory" in stats["skips"][0]["detail"]
    for task in labels.TASKS:
        assert label_keys(tmp_path / task / shard.name) == [s.key for s in samples if s.key not in same_size]


# ----------------------------------------------------------------------------------------------
# resume planning


@pytest.mark.timeout(300)
def test_plan_redoes_only_shards_without_an_intact_output(sample_dir, null_experts, tmp_path):
    from pipeline.plan import plan

    shards = sorted(sample_dir.glob("*.tar"))
    cfg = _cfg(fingerprint="fp1")
    process_shard(shards[0], tmp_path, null_experts, cfg)
    done, todo, why = plan(shards, tmp_path, labels.TASKS, "fp1")
    assert list(done) == ["00000"] and todo == [shards[1]] and why["00001"] == "no marker"
    # another config -> redo
    assert plan(shards, tmp_path, labels.TASKS, "fp2")[1] == shards
    # a flipped byte in a tar -> redo (sha256), though the size still matches
    depth = tmp_path / "depth" / shards[0].name
    data = bytearray(depth.read_bytes())
    data[1000] ^= 0xFF
    depth.write_bytes(bytes(data))
    done, todo, why = plan(shards, tmp_path, labels.TASKS, "fp1")
    assert todo == shards and why["00000"] == "depth tar checksum differs"
    assert plan(shards, tmp_path, labels.TASKS, "fp1", verify="size")[0].keys() == {"00000"}
    depth.unlink()
    assert plan(shards, tmp_path, labels.TASKS, "fp1", verify="size")[2]["00000"] == "depth tar missing"



@pytest.fixture(scope="module")
def completed_shard(sample_dir, null_experts, tmp_path_factory):
    """A 2-sample source shard and its complete label output (fingerprint "fp1")."""
    root = tmp_path_factory.mktemp("completed")
    src = small_shard(sorted(sample_dir.glob("*.tar"))[0], root / "src" / "00000.tar", 2)
    process_shard(src, root / "out", null_experts, _cfg(fingerprint="fp1"))
    return src, root / "out"


def _edit_marker(change):
    def edit(src, out):
        marker = Path(stats_path(out, src.stem))
        stats = json.loads(marker.read_text())
        change(stats)
        marker.write_text(json.dumps(stats))
    return edit


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# every reason check_complete gives for redoing a shard: (damage done to a copy of a complete
# shard, the reason expected). Each case fails if its check is removed from check_complete.
REDO = {
    "no marker": (lambda src, out: Path(stats_path(out, src.stem)).unlink(), "no marker"),
    "unreadable marker": (lambda src, out: Path(stats_path(out, src.stem)).write_text('{"stats_version": 1, '),
                          "unreadable marker: "),
    "marker not a mapping": (lambda src, out: Path(stats_path(out, src.stem)).write_text("[1]"), "marker of another version"),
    "other stats version": (_edit_marker(lambda s: s.update(stats_version=s["stats_version"] + 1)),
                            "marker of another version"),
    "other fingerprint": (_edit_marker(lambda s: s.update(fingerprint="fp0")), "made with another config"),
    "source grew": (lambda src, out: src.write_bytes(src.read_bytes() + b"\0" * 512), "source shard changed"),
    "source gone": (lambda src, out: src.unlink(), "source unreadable: "),
    "marker lists no tar": (_edit_marker(lambda s: s["outputs"].pop("depth")), "marker lists no depth tar"),
    "tar missing": (lambda src, out: (out / "depth" / src.name).unlink(), "depth tar missing"),
    "tar size differs": (lambda src, out: (out / "normal" / src.name).write_bytes(
        (out / "normal" / src.name).read_bytes() + b"\0"), "normal tar size differs"),
    "tar checksum differs": (lambda src, out: _flip_byte(out / "seg" / src.name), "seg tar checksum differs"),
}


@pytest.mark.parametrize("case", list(REDO))
def test_resume_redoes_a_shard_for_each_reason(case, completed_shard, tmp_path):
    import shutil

    from pipeline.plan import check_complete, plan

    src = tmp_path / "src" / completed_shard[0].name
    src.parent.mkdir()
    shutil.copy(completed_shard[0], src)
    out = tmp_path / "out"
    shutil.copytree(completed_shard[1], out)
    stats, why = check_complete(src, out, labels.TASKS, "fp1")
    assert why == "" and stats["fingerprint"] == "fp1"  # the intact copy is complete
    damage, reason = REDO[case]
    damage(src, out)
    stats, why = check_complete(src, out, labels.TASKS, "fp1")
    assert stats is None and why.startswith(reason) and (why == reason or reason.endswith(": ")), why
    if src.exists():
        done, todo, whys = plan([src], out, labels.TASKS, "fp1")
        assert done == {} and todo == [src] and whys[src.stem] == why
    if case == "tar checksum differs":  # size-only verification cannot see a flipped byte: it trusts the tar
        assert check_complete(src, out, labels.TASKS, "fp1", verify="size")[1] == ""


@pytest.mark.parametrize("module,name", [("pipeline.labels", "FORMAT_VERSION"), ("pipeline.plan", "STATS_VERSION"),
                                         ("pipeline.plan", "PIPELINE_VERSION")])
def test_fingerprint_follows_each_version(module, name, null_experts, monkeypatch):
    """A new label format, marker layout or pipeline version gives another fingerprint, so every
    marker written before it is "made with another config" and its shard is redone."""
    import importlib

    import pipeline.plan as job

    described = {t: e.describe() for t, e in null_experts.items()}  # what the driver fingerprints
    now = job.fingerprint(_cfg(), described)
    mod = importlib.import_module(module)
    monkeypatch.setattr(mod, name, getattr(mod, name) + 1)
    assert job.fingerprint(_cfg(), described) != now

# ----------------------------------------------------------------------------------------------
# the job's outputs (built by the session fixture, which runs the real Ray job)


def test_smoke_labels_fixture_is_the_job_output(sample_dir, smoke_labels):
    import pandas as pd

    assert_aligned(sample_dir, smoke_labels)
    m = json.loads((smoke_labels / "_manifest.json").read_text())
    assert m["format_version"] == labels.FORMAT_VERSION
    assert m["counts"]["ok"] == 16 and m["counts"]["skipped"] == 0 and m["counts"]["shards"] == 2
    assert m["counts"]["samples"] == 16 and m["counts"]["shard_damage"] == {}
    assert m["kinds"] == {"seg": ["seg"], "depth": ["depth"], "normal": ["normal", "normal_conf"]}
    assert m["config"]["profile"] == PROFILE and m["config"]["label_scale"] == 0.5
    # what changes labels beyond the last bits is recorded as the workers ran it (CPU: fp32, host codes)
    assert m["config"]["device"] == "cpu"
    assert m["config"]["label_settings"] == {t: {"precision": "fp32", "device_codes": False} for t in labels.TASKS}
    assert {t: (d["precision"], d["device_codes"]) for t, d in m["experts"].items()} == \
        {t: ("fp32", False) for t in labels.TASKS}
    assert m["run"] == {"batch_size": 8, "torch_threads": 1} and m["run_differs_in_shards"] == []
    assert set(m["experts"]) == set(labels.TASKS)
    assert m["checkpoints"] == {k: v for d in m["experts"].values() for k, v in d["checkpoints"].items()}
    assert len(m["classes"]) == len(m["class_pixels"]) == len(m["class_instances"]) == 81
    assert m["classes"][1] == "person" and m["classes"][80] == "toothbrush"
    assert sum(m["class_pixels"]) + m["ignore_pixels"] == sum(
        int(np.prod(labels.label_shape(s.image.shape[:2], 0.5)))
        for p in sorted(sample_dir.glob("*.tar")) for s in iter_samples(p))
    df = pd.read_parquet(smoke_labels / "_manifest.parquet")
    assert list(df["shard"]) == ["00000", "00001"] and list(df["ok"]) == [8, 8]
    for task in labels.TASKS:
        for _, row in df.iterrows():
            p = smoke_labels / task / f"{row['shard']}.tar"
            assert row[f"{task}_bytes"] == p.stat().st_size
            from pipeline.storage import sha256

            assert row[f"{task}_sha256"] == sha256(p)


@pytest.mark.timeout(120)
def test_preview_writes_contact_sheet_and_class_chart(sample_dir, smoke_labels, tmp_path):
    from PIL import Image

    from pipeline.preview import main

    yaml = write_manifest_yaml(tmp_path / "m.yaml", sample_dir)
    assert main(["--shards", str(yaml), "--labels", str(smoke_labels), "--n", "3",
                 "--out", str(tmp_path / "pv")]) == 0
    sheet = Image.open(tmp_path / "pv" / "contact_sheet.png")
    chart = Image.open(tmp_path / "pv" / "class_frequency.png")
    assert sheet.size[0] > 600 and sheet.size[1] > 400 and chart.size[0] > 300
    # the sheet is not blank: images and maps were drawn
    assert np.asarray(sheet.convert("L")).std() > 10
    # the chart's bars (read back from the drawing) are the manifest's per-class counts, largest first
    from pipeline.coco import COCO_CLASSES

    m = json.loads((smoke_labels / "_manifest.json").read_text())
    shown = json.loads((tmp_path / "pv" / "class_frequency.json").read_text())
    what = "instances" if sum(m["class_instances"][1:]) else "pixels"
    counts = m[f"class_{what}"]
    want = sorted(((counts[c], c) for c in range(1, 81) if counts[c] > 0), key=lambda vc: (-vc[0], vc[1]))
    assert len(want) >= 2 and shown["what"] == what
    assert shown["values"] == [v for v, _ in want]
    assert shown["classes"] == [COCO_CLASSES[c - 1] for _, c in want]
    assert f"({m['counts']['ok']} images" in shown["title"]


# ----------------------------------------------------------------------------------------------
# CLI errors come back fast, as one line, exit 2


def _cli(args, env_extra, tmp_path, timeout=60):
    """Run the CLI with the network refused; returns the process and what it tried (network, Ray)."""
    guard, events = network_guard(tmp_path)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CLIPTEX_OFFLINE="1",
               CLIPTEX_WEIGHTS_DIR=str(tmp_path / "weights"), HF_HOME=str(tmp_path / "hf"),
               TORCH_HOME=str(tmp_path / "torch"), **guard, **env_extra)
    r = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=timeout)
    return r, guard_events(events)


@pytest.mark.timeout(120)
def test_default_profile_offline_stops_with_missing_weights(sample_dir, tmp_path):
    yaml = write_manifest_yaml(tmp_path / "m.yaml", sample_dir)
    r, events = _cli(["--shards", str(yaml), "--out", str(tmp_path / "out"), "--no-progress"], {}, tmp_path)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert any(w in lines[0] for w in (".pt", ".pth", ".safetensors", "dpt", "weights")), lines[0]
    assert events == []  # no download or hub probe, and it stopped before Ray started
    assert not (tmp_path / "out" / "seg").exists()  # nothing started


@pytest.mark.timeout(60)
def test_bad_manifest_is_one_line_exit_2(tmp_path):
    r, _ = _cli(["--shards", "no-such-set", "--profile", "null"], {}, tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: no manifest") and r.stderr.count("\n") == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nroot: /nonexistent\nshards: '{0..3}.tar'\noutput: /tmp/x\n")
    r, _ = _cli(["--shards", str(bad), "--profile", "null"], {}, tmp_path)
    assert r.returncode == 2 and "matches no shard" in r.stderr and r.stderr.count("\n") == 1


def test_instance_histogram_counts_objects_not_fragments():
    from pipeline.worker import count_instances, encode_maps

    seg = np.zeros((50, 50), np.uint8)
    seg[2:10, 2:10] = 3
    seg[20:30, 20:30] = 3        # a second, separate object of class 3
    seg[40, 40] = 3              # a 1-pixel fragment: not an object
    seg[5:9, 30:34] = 7
    seg[45:48, 0:2] = labels.SEG_IGNORE
    counts = count_instances(seg)
    assert counts[3] == 2 and counts[7] == 1 and counts.sum() == 3
    # an expert that reports its painted instances' classes is trusted over the map
    maps = {"seg": seg, "instance_classes": np.array([3, 3, 3, 7])}
    _, hist = encode_maps("k", maps, (50, 50), ("seg",), 1.0)
    assert hist["instances"][3] == 3 and hist["instances"][7] == 1
    assert hist["pixels"][3] == 64 + 100 + 1 and hist["pixels"][labels.SEG_IGNORE] == 6


_MALLOC_PROBE = """
import ctypes, ctypes.util, json, sys
libc = ctypes.CDLL(ctypes.util.find_library("c"))
class MallInfo2(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def mmapped_by_a_48mb_block():  # above glibc's 32 MB dynamic mmap threshold: mmapped unless tuned
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(48 << 20)
    after = libc.mallinfo2().hblkhd
    libc.free(block)
    return after - before

from pipeline.worker import ShardWorker, WorkerConfig
untuned = mmapped_by_a_48mb_block()
worker = ShardWorker(WorkerConfig(profile="null", torch_threads=1))
print(json.dumps({"untuned": untuned, "in_worker": mmapped_by_a_48mb_block(), "reported": worker.malloc_tuned}))
"""


def test_worker_keeps_freed_memory_for_reuse():
    """A ShardWorker tunes glibc (keep_freed_memory) when it starts: in a fresh process a 48 MB
    block comes from its own mmap before the worker exists and from the heap once it does (the
    effect on throughput is measured by the P2 benchmark, not here)."""
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or \
            tuple(int(x) for x in platform.libc_ver()[1].split(".")[:2]) < (2, 33):
        pytest.skip("glibc >= 2.33 only (mallinfo2)")
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", _MALLOC_PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["untuned"] >= 48 << 20  # the probe sees glibc's default
    assert got["in_worker"] == 0 and got["reported"] is True
