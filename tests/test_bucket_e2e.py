"""The job and the trainer on object storage, against a real S3 API (moto's server on 127.0.0.1,
``tests/s3server.py``): the sample uploaded to a bucket and labelled into it by
``python -m pipeline``, a worker killed mid-shard, a damaged shard redone by a rerun, every tar
compared byte for byte with the local job's (``smoke_labels``); the trainer streaming shards and
labels from the bucket and checkpointing into it; unreadable buckets stopping both with one
``error:`` line (exit 2) before any work.

Every bucket object is read back with boto3, independently of ``pipeline.storage``.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.test_pipeline import tree_files
from tests.test_pipeline_ray import wait_for
from tests.test_storage import _credentials, read_only_user

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.ray


class Bucket:
    """One bucket of the moto server, read and written with boto3."""

    def __init__(self, server, name: str):
        self.client, self.name, self.url = server.client(), name, f"s3://{name}"

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.name, Key=key)["Body"].read()

    def put(self, key: str, body: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=key, Body=body)

    def upload_tree(self, folder: Path, prefix: str) -> None:
        for p in sorted(folder.rglob("*")):
            if p.is_file() and not p.name.startswith("."):
                self.put(f"{prefix}/{p.relative_to(folder)}", p.read_bytes())

    def uploads(self) -> list:
        return self.client.list_multipart_uploads(Bucket=self.name).get("Uploads", [])


@pytest.fixture(scope="module")
def bucket(s3_server, sample_dir, smoke_labels) -> Bucket:
    """A bucket holding the sample (``sample/``, as img2dataset writes it) and the labels the local
    job made of it (``smoke-labels/``)."""
    b = Bucket(s3_server, f"cliptex-e2e-{uuid.uuid4().hex[:8]}")
    b.client.create_bucket(Bucket=b.name)
    b.upload_tree(sample_dir, "sample")
    b.upload_tree(smoke_labels, "smoke-labels")
    return b


def _env(scratch: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RAY_DISABLE_USAGE_STATS="1",
               PYTHONPATH=str(REPO), CLIPTEX_SCRATCH=str(scratch))
    for k in ("RAY_ADDRESS", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _job(bucket: Bucket, out: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "--shards", f"{bucket.url}/sample/{{00000..00001}}.tar",
            "--out", out, "--profile", "smoke", "--workers", "2", "--threads-per-worker", "1",
            "--no-progress", *extra]


def _label_tars(bucket: Bucket, prefix: str) -> dict[str, bytes]:
    """Every label tar under the prefix, as ``tree_files`` gives them for a local tree."""
    return {k[len(prefix) + 1:]: bucket.get(k) for k in bucket.keys(prefix + "/")
            if re.fullmatch(rf"{re.escape(prefix)}/(seg|depth|normal)/\d+\.tar", k)}


@pytest.mark.timeout(420)
def test_job_from_bucket_to_bucket_survives_a_killed_worker_and_resumes_byte_identical(
        bucket, smoke_labels, tmp_path):
    out, prefix = f"{bucket.url}/job-labels", "job-labels"
    scratch = tmp_path / "scratch"
    env = _env(scratch)
    proc = subprocess.Popen(_job(bucket, out, "--sample-delay", "0.3"), cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        # mid-shard: a worker spools shard 00000's tars in the scratch folder, a few samples in
        spools = lambda: sorted(scratch.glob("cliptex-*-00000.tar")) if scratch.is_dir() else []  # noqa: E731
        wait_for(lambda: spools() or proc.poll() is not None, 200, "shard 00000 to start")
        assert proc.poll() is None, proc.communicate()
        time.sleep(1.0)
        victim = int(spools()[0].name.split("-")[1])
        assert f"{prefix}/_stats/00000.json" not in bucket.keys(), "shard finished before the kill; test is void"
        # its tars are being written, and none is visible under its final key
        assert [k for k in bucket.keys() if k.endswith("/00000.tar") and k.startswith(prefix)] == []
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # the driver we started, and its process group (its local Ray)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    assert "pseudolabel sample: 2 shards (2 labelled now, 0 already complete), 16 samples ok" in stdout
    redone = json.loads(bucket.get(f"{prefix}/_stats/00000.json"))
    assert redone["worker"]["pid"] != victim and redone["source"] == f"{bucket.url}/sample/00000.tar"
    # every tar equals the local job's, byte for byte; nothing else is in the bucket (no temporary
    # keys, no lock left, no pending upload); the manifest names the bucket shards
    assert _label_tars(bucket, prefix) == tree_files(smoke_labels)
    assert bucket.keys(prefix + "/") == sorted(
        [f"{prefix}/{t}/0000{i}.tar" for t in ("seg", "depth", "normal") for i in (0, 1)]
        + [f"{prefix}/_stats/00000.json", f"{prefix}/_stats/00001.json",
           f"{prefix}/_manifest.json", f"{prefix}/_manifest.parquet"])
    assert bucket.uploads() == []
    manifest = bucket.get(f"{prefix}/_manifest.json")
    m = json.loads(manifest)
    assert m["shard_set"]["root"] == f"{bucket.url}/sample" and m["counts"]["ok"] == 16
    # the killed worker's spooled tars are all that is left in the scratch folder
    assert {int(p.name.split("-")[1]) for p in scratch.iterdir()} <= {victim}

    # a flipped byte in one tar (same size): the dry run names exactly that shard, the rerun redoes
    # only it, and everything is byte-identical again
    key = f"{prefix}/depth/00001.tar"
    data = bytearray(bucket.get(key))
    data[len(data) // 2] ^= 0xFF
    bucket.put(key, bytes(data))
    marker = bucket.get(f"{prefix}/_stats/00000.json")
    dry = subprocess.run(_job(bucket, out, "--dry-run"), cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert dry.stdout.splitlines()[:2] == ["  00000  complete", "  00001  would run (depth tar checksum differs)"]
    rerun = subprocess.run(_job(bucket, out), cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                           start_new_session=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "(1 labelled now, 1 already complete)" in rerun.stdout
    assert bucket.get(f"{prefix}/_stats/00000.json") == marker  # the complete shard was not touched
    assert _label_tars(bucket, prefix) == tree_files(smoke_labels)
    assert bucket.get(f"{prefix}/_manifest.json") == manifest


@pytest.mark.timeout(300)
def test_trainer_streams_shards_and_labels_from_the_bucket_and_checkpoints_into_it(bucket, tmp_path):
    run = f"{bucket.url}/runs/smoke"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "trainer.train", "--shards", f"{bucket.url}/sample/{{00000..00001}}.tar",
           "--labels", f"{bucket.url}/smoke-labels", "--profile", "smoke", "--steps", "10",
           "--run-dir", run, "--set", "run.ckpt_every=5"]
    scratch = tmp_path / "scratch"
    p = subprocess.run(cmd, cwd=REPO, env=_env(scratch), capture_output=True, text=True, timeout=280)
    assert p.returncode == 0, p.stderr[-4000:]
    keys = bucket.keys("runs/smoke/")
    assert {"runs/smoke/checkpoints/step_00000005.pt", "runs/smoke/checkpoints/step_00000010.pt",
            "runs/smoke/checkpoints/latest", "runs/smoke/config.yaml", "runs/smoke/run.json",
            "runs/smoke/metrics.jsonl"} <= set(keys)
    assert any(k.startswith("runs/smoke/tb/") for k in keys)
    assert bucket.get("runs/smoke/checkpoints/latest") == b"step_00000010.pt\n"
    metrics = [json.loads(line) for line in bucket.get("runs/smoke/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in metrics] == list(range(1, 11))
    # the strict join found every sample's labels: nothing skipped, both shards used
    assert all(r["skipped"] == {} for r in metrics)
    assert json.loads(bucket.get("runs/smoke/run.json"))["num_shards"] == 2
    # the label tars were copied to scratch for their shard only
    assert not [p for p in scratch.rglob("*.tar")]

    import torch

    from trainer import checkpoint as ckpt

    state = ckpt.load(ckpt.find(run, "latest"))  # read back from the bucket
    assert state["step"] == 10 and all(torch.isfinite(v).all() for v in state["model"].values()
                                       if v.is_floating_point())


# ----------------------------------------------------------------------------------------------
# unreadable buckets: one error line, exit 2, before any work


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.timeout(120)
def test_job_stops_on_an_unreadable_bucket_before_experts_or_ray(bucket, s3_server, monkeypatch, capsys):
    import ray

    from pipeline.__main__ import main

    # the default profile: building its experts offline would fail on missing weights, so the
    # storage error shows the buckets are checked first
    missing = ["--shards", "s3://no-such-bucket-cliptex/sample/{00000..00001}.tar", "--out",
               f"{bucket.url}/unused", "--profile", "default", "--no-progress"]
    assert main(missing) == 2
    line = _one_error(capsys)
    assert line.startswith("error: cannot read s3://no-such-bucket-cliptex/sample: not found") and \
        "bucket does not exist" in line

    key = read_only_user(s3_server, bucket.url)
    argv = ["--shards", f"{bucket.url}/sample/{{00000..00001}}.tar", "--out", f"{bucket.url}/denied",
            "--profile", "default", "--no-progress"]
    with s3_server.require_auth():
        with _credentials(monkeypatch, key["AccessKeyId"], key["SecretAccessKey"]):
            assert main(argv) == 2  # the shards can be read, the output not written
            line = _one_error(capsys)
            assert line.startswith(f"error: cannot write to {bucket.url}/denied: permission denied")
            assert key["SecretAccessKey"] not in line
        with _credentials(monkeypatch, "AKIANOSUCHKEY0000000", "wrong-secret-value"):
            assert main(argv) == 2
            line = _one_error(capsys)
            assert line.startswith(f"error: cannot read {bucket.url}/sample: permission denied")
            assert "wrong-secret-value" not in line
    # credentials in a URL never reach a message
    assert main(["--shards", f"{bucket.url}/sample/{{00000..00001}}.tar", "--out",
                 "s3://AKIAUSER:topsecret@no-such-bucket-cliptex/labels", "--profile", "default"]) == 2
    line = _one_error(capsys)
    assert line.startswith("error: s3://no-such-bucket-cliptex/labels: credentials in a URL are not used")
    assert "topsecret" not in line and "AKIAUSER" not in line
    assert not ray.is_initialized()
    assert bucket.keys("denied/") == [] and bucket.keys("unused/") == []


@pytest.mark.timeout(120)
def test_rayjob_entrypoint_plans_against_the_bucket(bucket, monkeypatch, capsys):
    """docker/rayjob.yaml's entrypoint and environment, with the bucket names pointed at the test
    bucket, as a dry run: the shards are found under CC3M_ROOT on the bucket, nothing is written."""
    import shlex

    import ray
    import yaml

    from pipeline.__main__ import main

    (job,) = yaml.safe_load_all((REPO / "docker" / "rayjob.yaml").read_text())
    argv = shlex.split(job["spec"]["entrypoint"])[3:]
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env["CC3M_ROOT"].startswith("s3://")
    monkeypatch.setenv("CC3M_ROOT", f"{bucket.url}/sample")
    i = argv.index("--out") + 1
    argv[i] = re.sub(r"^s3://[^/]+", bucket.url, argv[i])
    assert main(argv + ["--profile", "smoke", "--dry-run"]) == 0  # smoke: no weights offline
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["  00000  would run (no marker)", "  00001  would run (no marker)"]
    assert lines[2].startswith(f"dry run cc3m: 2 shards, 0 complete, 2 would run -> {bucket.url}/labels/cc3m ")
    assert not ray.is_initialized() and bucket.keys("labels/cc3m/") == []


@pytest.mark.timeout(120)
def test_trainer_stops_on_an_unreadable_bucket_or_manifest_with_one_line(bucket, s3_server, monkeypatch,
                                                                          capsys, tmp_path):
    from trainer.train import main

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    base = ["--profile", "smoke", "--steps", "1", "--run-dir", str(tmp_path / "run")]
    assert main(["--shards", "s3://no-such-bucket-cliptex/sample/{00000..00001}.tar",
                 "--labels", f"{bucket.url}/smoke-labels", *base]) == 2
    assert _one_error(capsys).startswith("error: cannot read s3://no-such-bucket-cliptex/sample: not found")
    assert main(["--shards", f"{bucket.url}/sample", "--labels", "s3://no-such-bucket-cliptex/labels", *base]) == 2
    assert _one_error(capsys).startswith("error: cannot read s3://no-such-bucket-cliptex/labels: not found")
    assert main(["--shards", "no-such-manifest", "--labels", str(tmp_path), *base]) == 2
    assert "no manifest" in _one_error(capsys)
    with s3_server.require_auth():
        with _credentials(monkeypatch, "AKIANOSUCHKEY0000000", "wrong-secret-value"):
            assert main(["--shards", f"{bucket.url}/sample", "--labels", f"{bucket.url}/smoke-labels", *base]) == 2
            line = _one_error(capsys)
            assert line.startswith(f"error: cannot read {bucket.url}/sample: permission denied")
            assert "wrong-secret-value" not in line
    assert not (tmp_path / "run").exists()  # nothing was started
