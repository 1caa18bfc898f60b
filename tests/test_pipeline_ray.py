"""The pseudo-label job on a real local Ray with the smoke experts: faults and resume.

Every run here uses 1 torch thread per worker and the default batch size, like the session fixture
``smoke_labels`` (a clean, uninterrupted run of the job), so outputs can be compared byte for byte.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from pipeline.job import JobSpec, run
from pipeline.manifest import load_manifest
from pipeline.worker import WorkerConfig, stats_path
from tests.test_pipeline import _damaged_dir, assert_aligned, label_keys, tree_files

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for this module's in-process jobs (each job brings its own actors)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 object_store_memory=128 << 20, logging_level=logging.ERROR)
    yield
    ray.shutdown()


def sample_yaml(tmp_path: Path, sample_dir: Path) -> Path:
    """Same name and shards as the fixture's manifest, so the manifests compare equal too."""
    p = tmp_path / "sample.yaml"
    p.write_text(f"name: sample\nroot: {sample_dir}\nshards: \"{{00000..00001}}.tar\"\n"
                 f"expected_samples: 16\noutput: {tmp_path}/unused\n")
    return p


def spec_for(yaml: Path, out: Path, workers: int, **worker_kw) -> JobSpec:
    return JobSpec(shard_set=load_manifest(str(yaml)), out=out, workers=workers, progress=False,
                   worker=WorkerConfig(profile="smoke", torch_threads=1, **worker_kw))


def wait_for(cond, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def assert_same_output(out: Path, clean: Path) -> None:
    a, b = tree_files(out), tree_files(clean)
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
    assert (out / "_manifest.json").read_bytes() == (clean / "_manifest.json").read_bytes()
    assert not [p for p in out.rglob(".*.tmp*")], "temporary files left behind"


def assert_no_partial_visible(out: Path) -> None:
    """Every tar under a final name is a whole archive (its end-of-archive blocks are there)."""
    for p in out.glob("*/*.tar"):
        with tarfile.open(p) as t:
            t.getmembers()
        data = p.read_bytes()
        assert len(data) % 10240 == 0 and data[-1024:] == b"\0" * 1024, p


def run_in_thread(spec: JobSpec, on_event) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def target():
        try:
            box["summary"] = run(spec, on_event=on_event)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            box["error"] = e

    th = threading.Thread(target=target, daemon=True)
    th.start()
    return th, box


@pytest.mark.timeout(300)
def test_full_run_trees_aligned_with_source(sample_dir, smoke_labels):
    # smoke_labels is a full, clean run of the job (python -m pipeline, local Ray, 2 workers)
    assert_aligned(sample_dir, smoke_labels)
    for shard in ("00000", "00001"):
        stats = json.loads(Path(stats_path(smoke_labels, shard)).read_text())
        assert stats["ok"] == 8 and stats["skips"] == []
    assert_no_partial_visible(smoke_labels)


@pytest.mark.timeout(300)
def test_sigkill_worker_mid_shard_redoes_it_byte_identical(sample_dir, smoke_labels, tmp_path, ray_local):
    out = tmp_path / "labels"
    spec = spec_for(sample_yaml(tmp_path, sample_dir), out, workers=2, sample_delay=0.3)
    pids: dict[int, int] = {}
    shard_of: dict[int, str] = {}

    def on_event(kind, d):
        if kind == "actor_ready":
            pids[d["index"]] = d["pid"]
        elif kind == "shard_started":
            shard_of[d["index"]] = d["shard"]

    th, box = run_in_thread(spec, on_event)
    # mid-shard: the worker has opened its temporary tars, a couple of samples are in
    wait_for(lambda: any((out / "seg").glob(".00000.tar.tmp*")) if (out / "seg").is_dir() else False,
             150, "shard 00000 to start")
    time.sleep(1.0)
    victim = next(i for i, s in shard_of.items() if s == "00000")
    assert not Path(stats_path(out, "00000")).exists(), "shard finished before the kill; test is void"
    os.kill(pids[victim], signal.SIGKILL)
    th.join(240)
    assert not th.is_alive(), "job did not finish"
    if "error" in box:
        raise box["error"]
    assert box["summary"]["processed"] == ["00000", "00001"]
    redone = json.loads(Path(stats_path(out, "00000")).read_text())
    assert redone["worker"]["pid"] != pids[victim]
    assert_same_output(out, smoke_labels)


@pytest.mark.timeout(300)
def test_driver_interrupted_then_resume_does_only_the_rest(sample_dir, smoke_labels, tmp_path, ray_local):
    yaml, out = sample_yaml(tmp_path, sample_dir), tmp_path / "labels"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RAY_DISABLE_USAGE_STATS="1")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "--shards", str(yaml), "--profile", "smoke", "--out", str(out),
         "--workers", "1", "--threads-per-worker", "1", "--no-progress", "--sample-delay", "0.3"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        wait_for(lambda: Path(stats_path(out, "00000")).exists() or proc.poll() is not None, 200,
                 "the first shard to complete")
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)  # Ctrl-C on the driver while shard 00001 is in flight
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:  # the driver we started, and its process group (its local Ray)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert "rerun the same command to resume" in err
    assert not Path(stats_path(out, "00001")).exists()
    assert not (out / "_manifest.json").exists()
    assert_no_partial_visible(out)
    first_marker = Path(stats_path(out, "00000")).read_bytes()

    summary = run(spec_for(yaml, out, workers=1))
    assert summary["processed"] == ["00001"] and summary["resumed"] == ["00000"]
    assert Path(stats_path(out, "00000")).read_bytes() == first_marker
    assert_same_output(out, smoke_labels)
    # and a third run (other throughput settings) has nothing to do and leaves the manifest as is
    manifest = (out / "_manifest.json").read_bytes()
    again = run(spec_for(yaml, out, workers=2, batch_size=4))
    assert again["processed"] == [] and again["workers"] == 0
    assert (out / "_manifest.json").read_bytes() == manifest


@pytest.mark.timeout(300)
def test_damaged_shards_job_completes_with_skips(sample_dir, tmp_path, ray_local):
    src = tmp_path / "src"
    expected = _damaged_dir(sample_dir, src)
    yaml = tmp_path / "damaged.yaml"
    yaml.write_text(f"name: damaged\nroot: {src}\nshards: \"{{00000..00002}}.tar\"\noutput: {tmp_path}/x\n")
    out = tmp_path / "labels"
    summary = run(spec_for(yaml, out, workers=2))
    assert summary["processed"] == ["00000", "00001", "00002"]
    for task in ("seg", "depth", "normal"):
        for name, keys in expected.items():
            assert label_keys(out / task / name) == keys
    m = json.loads((out / "_manifest.json").read_text())
    assert m["counts"]["ok"] == sum(len(k) for k in expected.values())
    reasons = m["counts"]["skip_reasons"]
    assert m["counts"]["shard_damage"] == {"truncated_tar": 1, "empty_tar": 1}
    assert m["counts"]["samples"] == m["counts"]["ok"] + m["counts"]["skipped"]
    assert reasons["missing_caption"] == 1
    assert reasons.get("truncated_image", 0) + reasons.get("not_an_image", 0) == 2
    skips = json.loads(Path(stats_path(out, "00001")).read_text())["skips"]
    assert [s["key"] for s in skips] == ["000010001", "000010003", "000010005"]
    assert [s["index"] for s in skips] == [1, 3, 5]


@pytest.mark.timeout(300)
def test_driver_replaces_a_worker_ray_will_not_restart(sample_dir, tmp_path, ray_local):
    """With no Ray-level restarts left, the driver itself replaces the dead actor and redoes the
    shard (null experts: this is about the pool, not the maps)."""
    yaml, out = sample_yaml(tmp_path, sample_dir), tmp_path / "labels"
    spec = spec_for(yaml, out, workers=1, sample_delay=0.4)
    spec.worker.profile = "null"
    spec.max_restarts = spec.max_task_retries = 0
    events: list[tuple[str, dict]] = []
    pids: list[int] = []

    def on_event(kind, d):
        events.append((kind, d))
        if kind == "actor_ready":
            pids.append(d["pid"])

    th, box = run_in_thread(spec, on_event)
    wait_for(lambda: (out / "seg").is_dir() and any((out / "seg").glob(".00000.tar.tmp*")), 120,
             "shard 00000 to start")
    time.sleep(0.5)
    os.kill(pids[0], signal.SIGKILL)
    th.join(200)
    assert not th.is_alive()
    if "error" in box:
        raise box["error"]
    assert [k for k, _ in events].count("actor_replaced") == 1
    starts = [d["attempt"] for k, d in events if k == "shard_started" and d["shard"] == "00000"]
    assert starts == [1, 2]
    assert_aligned(sample_dir, out)
    assert_no_partial_visible(out)
    assert not [p for p in out.rglob(".*.tmp*")]
