"""pipeline.storage: names, listing, hashing and atomic writes on a local disk, fsspec's memory
filesystem and a real S3 API (moto's server, see tests/s3server.py). Objects are written and
checked with an independent client (boto3 / hashlib / os) wherever the code under test would
otherwise check itself."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline import storage
from pipeline.storage import StorageError
from tests.conftest import REPO


# ----------------------------------------------------------------------------------------------
# names


@pytest.mark.parametrize("given, expected", [
    ("s3://bucket/cc3m/", "s3://bucket/cc3m"),
    ("s3://bucket//cc3m///00000.tar", "s3://bucket/cc3m/00000.tar"),
    ("s3a://bucket/x", "s3://bucket/x"),
    ("gcs://bucket/x/", "gs://bucket/x"),
    ("gs://bucket", "gs://bucket"),
    ("file:///data/cc3m/", "/data/cc3m"),
    ("/data//cc3m/./x.tar", "/data/cc3m/x.tar"),
    ("data/labels/", "data/labels"),
    ("memory:///a/b", "memory://a/b"),
])
def test_normalize(given, expected):
    assert storage.normalize(given) == expected


@pytest.mark.parametrize("bad", ["", "s3://", "s3://bucket/../other", "s3://bucket/./x", "s3://AKIA:s3cret@bucket/x"])
def test_normalize_refuses(bad):
    with pytest.raises(ValueError) as e:
        storage.normalize(bad)
    assert "s3cret" not in str(e.value)


def test_names():
    assert storage.scheme("/x") == "" and storage.scheme("file:///x") == ""
    assert storage.scheme("S3://b/k") == "s3" and storage.scheme("gcs://b") == "gs"
    assert storage.join("s3://b/labels/", "seg", "00000.tar") == "s3://b/labels/seg/00000.tar"
    assert storage.join("/out", "_stats", "00000.json") == "/out/_stats/00000.json"
    assert storage.parent("s3://b/labels/seg/00000.tar") == "s3://b/labels/seg"
    assert storage.parent("s3://b/x.tar") == "s3://b"
    assert storage.parent("/out/x.tar") == "/out"
    with pytest.raises(ValueError):
        storage.join("s3://b", "../escape")
    assert storage.redact("s3://AKIA:s3cret@bucket/k") == "s3://bucket/k"
    assert storage.expand("s3://b/cc3m/{00000..00002}.tar") == [
        "s3://b/cc3m/00000.tar", "s3://b/cc3m/00001.tar", "s3://b/cc3m/00002.tar"]


# ----------------------------------------------------------------------------------------------
# local disk and memory://


def test_local_listing_hashing_and_writes(tmp_path):
    for i, body in enumerate([b"a", b"bb", b"ccc"]):
        (tmp_path / f"{i:05d}.tar").write_bytes(body)
    (tmp_path / "00001.parquet").write_bytes(b"not a shard")
    (tmp_path / "sub").mkdir()
    found = storage.list_existing(f"{tmp_path}/{{00000..00004}}.tar")
    assert found == {f"{tmp_path}/00000.tar": 1, f"{tmp_path}/00001.tar": 2, f"{tmp_path}/00002.tar": 3}
    assert storage.glob(f"{tmp_path}/*.{{tar,parquet}}") == sorted(
        [f"{tmp_path}/00000.tar", f"{tmp_path}/00001.tar", f"{tmp_path}/00002.tar", f"{tmp_path}/00001.parquet"])
    assert storage.list_existing(f"{tmp_path}/missing/{{0..1}}.tar") == {}
    assert storage.sha256(f"file://{tmp_path}/00002.tar") == hashlib.sha256(b"ccc").hexdigest()
    assert storage.size(str(tmp_path / "00001.tar")) == 2

    target = tmp_path / "out" / "x.json"
    storage.write_json_atomic(str(target), {"b": 1, "a": [1, 2]})
    assert json.loads(target.read_text()) == {"a": [1, 2], "b": 1}
    storage.remove(str(target))
    assert not target.exists()
    storage.remove(str(target))  # missing_ok
    with pytest.raises(FileNotFoundError):
        storage.remove(str(target), missing_ok=False)


def test_local_interrupted_write_keeps_old_content(tmp_path):
    target = tmp_path / "seg" / "00000.tar"
    storage.write_bytes_atomic(str(target), b"old, whole")
    with pytest.raises(RuntimeError, match="boom"):
        with storage.open_write_atomic(str(target)) as f:
            f.write(b"new but partial")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old, whole"
    assert sorted(os.listdir(target.parent)) == ["00000.tar"]  # the temporary file is gone


def _start_writer(code: str, env: dict | None = None) -> subprocess.Popen:
    """A Python child that prints 'ready' once the interesting state is reached."""
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


@pytest.mark.timeout(60)
def test_local_killed_writer_leaves_nothing_under_final_name(tmp_path):
    target = tmp_path / "depth" / "00001.tar"
    child = _start_writer(f"""
import time
from pipeline import storage
with storage.open_write_atomic({str(target)!r}) as f:
    f.write(b"x" * (1 << 20))
    f.flush()
    print("ready", flush=True)
    time.sleep(60)
""")
    try:
        assert child.stdout.readline().strip() == "ready"
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        child.kill()
        child.stdout.close()
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir()] == [f".00001.tar.tmp{child.pid}"]  # a rerun's cleanup finds it


def test_memory_filesystem_roundtrip():
    base = "memory://cliptex-test-roundtrip"
    storage.write_bytes_atomic(f"{base}/seg/00000.tar", b"one")
    storage.write_bytes_atomic(f"{base}/seg/00002.tar", b"three")
    assert storage.list_existing(f"{base}/seg/{{00000..00003}}.tar") == {
        f"{base}/seg/00000.tar": 3, f"{base}/seg/00002.tar": 5}
    assert storage.sha256(f"{base}/seg/00002.tar") == hashlib.sha256(b"three").hexdigest()
    with pytest.raises(RuntimeError):
        with storage.open_write_atomic(f"{base}/seg/00001.tar") as f:
            f.write(b"partial")
            raise RuntimeError("interrupted")
    assert not storage.exists(f"{base}/seg/00001.tar")
    with storage.open_write_atomic(f"{base}/seg/00001.tar") as f:
        f.write(b"two")
    assert storage.read_bytes(f"{base}/seg/00001.tar") == b"two"
    storage.check_writable(f"{base}/seg")
    assert sorted(storage.listdir(f"{base}/seg")) == [f"{base}/seg/0000{i}.tar" for i in range(3)]


def test_missing_backend_is_a_storage_error():
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("gcsfs is installed here: its absence cannot be shown")
    with pytest.raises(StorageError, match=r"gcsfs \(pip install 'cliptex\[gcs\]'\)"):
        storage.listdir("gs://some-bucket/cc3m")
    with pytest.raises(StorageError, match="gcsfs"):
        storage.check_readable("gs://some-bucket/cc3m")


def test_local_preflight(tmp_path):
    storage.check_writable(str(tmp_path / "new" / "labels"))  # created
    assert os.listdir(tmp_path / "new" / "labels") == []      # probe removed
    with pytest.raises(StorageError, match="no such file"):
        storage.check_readable(str(tmp_path / "absent"))
    (tmp_path / "a-file").write_bytes(b"")
    with pytest.raises(StorageError, match="cannot write to .*a-file/labels"):
        storage.check_writable(str(tmp_path / "a-file" / "labels"))  # works as root too


# ----------------------------------------------------------------------------------------------
# a real S3 API


def _keys(s3_server, bucket: str) -> list[str]:
    resp = s3_server.client().list_objects_v2(Bucket=bucket.removeprefix("s3://"))
    return sorted(o["Key"] for o in resp.get("Contents", []))


def _uploads(s3_server, bucket: str) -> list[dict]:
    return s3_server.client().list_multipart_uploads(Bucket=bucket.removeprefix("s3://")).get("Uploads", [])


@pytest.mark.timeout(120)
def test_s3_listing_with_braces_and_hashing(s3_server, s3_bucket):
    client, name = s3_server.client(), s3_bucket.removeprefix("s3://")
    bodies = {f"cc3m/{i:05d}.tar": os.urandom(1000 + i) for i in (0, 1, 3)}
    bodies["cc3m/00001.parquet"] = b"p"
    for key, body in bodies.items():  # written by boto3, read by storage
        client.put_object(Bucket=name, Key=key, Body=body)
    found = storage.list_existing(f"{s3_bucket}/cc3m/{{00000..00004}}.tar")
    assert found == {f"{s3_bucket}/cc3m/00000.tar": 1000, f"{s3_bucket}/cc3m/00001.tar": 1001,
                     f"{s3_bucket}/cc3m/00003.tar": 1003}
    assert storage.glob(f"{s3_bucket}/cc3m/*.parquet") == [f"{s3_bucket}/cc3m/00001.parquet"]
    assert storage.list_existing(f"{s3_bucket}/nothing/{{0..3}}.tar") == {}
    key = "cc3m/00003.tar"
    assert storage.sha256(f"{s3_bucket}/{key}") == hashlib.sha256(bodies[key]).hexdigest()
    assert storage.size(f"{s3_bucket}/{key}") == len(bodies[key])
    with storage.open_read(f"{s3_bucket}/{key}") as f:
        assert f.read(10) == bodies[key][:10]
        assert f.read() == bodies[key][10:]
    assert not storage.exists(f"{s3_bucket}/cc3m/00002.tar")
    with pytest.raises(FileNotFoundError):
        storage.size(f"{s3_bucket}/cc3m/00002.tar")


@pytest.mark.timeout(120)
def test_s3_writes_are_whole_and_interruptions_leave_nothing(s3_server, s3_bucket):
    client, name = s3_server.client(), s3_bucket.removeprefix("s3://")
    marker = {"shard": "00000", "outputs": {"seg": {"bytes": 3}}}
    storage.write_json_atomic(f"{s3_bucket}/labels/_stats/00000.json", marker)
    got = client.get_object(Bucket=name, Key="labels/_stats/00000.json")["Body"].read()
    assert json.loads(got) == marker

    big = os.urandom(12 << 20)  # above s3fs's 5 MiB part minimum: a real multipart upload
    with pytest.raises(RuntimeError, match="worker died"):
        with storage.open_write_atomic(f"{s3_bucket}/labels/seg/00000.tar") as f:
            f.write(big)
            raise RuntimeError("worker died")
    assert _keys(s3_server, s3_bucket) == ["labels/_stats/00000.json"]

    with storage.open_write_atomic(f"{s3_bucket}/labels/seg/00000.tar") as f:
        f.write(big)
    got = client.get_object(Bucket=name, Key="labels/seg/00000.tar")["Body"].read()
    assert hashlib.sha256(got).digest() == hashlib.sha256(big).digest()
    assert _uploads(s3_server, s3_bucket) == []
    storage.remove(f"{s3_bucket}/labels/_stats/00000.json")
    assert _keys(s3_server, s3_bucket) == ["labels/seg/00000.tar"]
    storage.remove(f"{s3_bucket}/labels/_stats/00000.json")  # missing_ok
    with pytest.raises(FileNotFoundError):
        storage.remove(f"{s3_bucket}/labels/_stats/00000.json", missing_ok=False)


@pytest.mark.timeout(180)
def test_s3_writer_killed_mid_multipart_upload(s3_server, s3_bucket):
    """SIGKILL while the parts of a multipart upload are going up: nothing appears under the key
    (the upload stays incomplete, invisible); the rerun's write is whole."""
    target = f"{s3_bucket}/labels/depth/00001.tar"
    code = f"""
import hashlib
from pipeline import storage
storage.MULTIPART_CHUNK = 5 << 20   # S3's smallest part: many parts, time to interrupt
block = hashlib.sha256(b"seed").digest() * (1 << 15)   # 1 MiB, deterministic
storage.write_bytes_atomic({target!r}, block * 96)
print("finished", flush=True)
"""
    child = _start_writer(code)
    parts_seen = 0
    try:
        deadline = time.monotonic() + 120
        while child.poll() is None and time.monotonic() < deadline:
            uploads = _uploads(s3_server, s3_bucket)
            if uploads:
                parts = s3_server.client().list_parts(Bucket=s3_bucket.removeprefix("s3://"),
                                                      Key="labels/depth/00001.tar",
                                                      UploadId=uploads[0]["UploadId"]).get("Parts", [])
                if parts:
                    parts_seen = len(parts)
                    child.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.01)
        child.wait(30)
    finally:
        child.kill()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL and parts_seen, "the upload finished before the kill: test is void"
    assert _keys(s3_server, s3_bucket) == []
    assert len(_uploads(s3_server, s3_bucket)) == 1  # incomplete, not an object

    rerun = _start_writer(code)
    out, _ = rerun.communicate(timeout=120)
    assert out.strip() == "finished"
    block = hashlib.sha256(b"seed").digest() * (1 << 15)
    assert storage.sha256(target) == hashlib.sha256(block * 96).hexdigest()
    assert storage.size(target) == 96 << 20


@pytest.mark.timeout(60)
def test_s3_missing_bucket_is_one_clear_error(s3_server):
    for check in (storage.check_readable, storage.check_writable):
        with pytest.raises(StorageError, match=r"s3://no-such-bucket-cliptex/cc3m: not found: .*bucket does not exist"):
            check("s3://no-such-bucket-cliptex/cc3m")
    with pytest.raises(FileNotFoundError):
        storage.listdir("s3://no-such-bucket-cliptex/cc3m")


@pytest.mark.timeout(60)
def test_s3_empty_prefix_is_not_readable_but_writable(s3_server, s3_bucket):
    with pytest.raises(StorageError, match="nothing there|not found"):
        storage.check_readable(f"{s3_bucket}/cc3m")
    storage.check_writable(f"{s3_bucket}/labels")
    assert _keys(s3_server, s3_bucket) == []  # the probe object was removed


@contextlib.contextmanager
def _credentials(monkeypatch, key_id: str, secret: str):
    """Use these credentials from the environment (the standard place) in fresh s3fs clients."""
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield
    finally:
        monkeypatch.undo()
        s3fs.S3FileSystem.clear_instance_cache()


def read_only_user(s3_server, bucket: str) -> dict:
    """An IAM user of the moto server that may list and read ``bucket`` and nothing else:
    {"AccessKeyId", "SecretAccessKey", ...} (enforced inside ``s3_server.require_auth()``)."""
    name = bucket.removeprefix("s3://")
    iam = s3_server.client("iam")
    user = f"reader-{name[-8:]}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="read-only", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"],
                       "Resource": [f"arn:aws:s3:::{name}", f"arn:aws:s3:::{name}/*"]}]}))
    return iam.create_access_key(UserName=user)["AccessKey"]


@pytest.mark.timeout(60)
def test_s3_permissions_enforced_and_credentials_never_shown(s3_server, s3_bucket, monkeypatch):
    name = s3_bucket.removeprefix("s3://")
    s3_server.client().put_object(Bucket=name, Key="cc3m/00000.tar", Body=b"shard")
    key = read_only_user(s3_server, s3_bucket)
    secret = key["SecretAccessKey"]

    with s3_server.require_auth():
        with _credentials(monkeypatch, key["AccessKeyId"], secret):
            storage.check_readable(f"{s3_bucket}/cc3m")
            assert storage.read_bytes(f"{s3_bucket}/cc3m/00000.tar") == b"shard"
            with pytest.raises(StorageError, match="cannot write to .*permission denied") as e:
                storage.check_writable(f"{s3_bucket}/labels")
            assert secret not in str(e.value)
        with _credentials(monkeypatch, "AKIANOSUCHKEY0000000", "wrong-secret-value"):
            with pytest.raises(StorageError, match="cannot read .*permission denied") as e:
                storage.check_readable(f"{s3_bucket}/cc3m")
            assert "wrong-secret-value" not in str(e.value)
    assert _keys(s3_server, s3_bucket) == ["cc3m/00000.tar"]


# ----------------------------------------------------------------------------------------------
# the label tar writer, local copies and spools, the output lock


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    folder = tmp_path / "scratch"
    monkeypatch.setenv(storage.SCRATCH_ENV, str(folder))
    return folder


@pytest.mark.timeout(120)
def test_s3_tar_writer_publishes_on_commit_only(s3_server, s3_bucket, scratch):
    from pipeline.shards import tar_bytes

    members = [("000000001.seg.lbl", b"s" * 3000), ("000000002.seg.lbl", b"t" * 10)]
    target = f"{s3_bucket}/labels/seg/00000.tar"
    w = storage.AtomicTarWriter(target)
    for name, data in members:
        w.add(name, data)
    w.finish()
    assert _keys(s3_server, s3_bucket) == []  # complete, spooled locally, not yet visible
    assert [p.name for p in scratch.iterdir()] == [os.path.basename(w.tmp)]
    done = w.commit()
    expected = tar_bytes(members)  # the same deterministic bytes, built independently of the writer
    got = s3_server.client().get_object(Bucket=s3_bucket.removeprefix("s3://"), Key="labels/seg/00000.tar")
    assert got["Body"].read() == expected
    assert done == {"sha256": hashlib.sha256(expected).hexdigest(), "bytes": len(expected), "members": 2}
    assert list(scratch.iterdir()) == []  # the spool is gone

    aborted = storage.AtomicTarWriter(f"{s3_bucket}/labels/depth/00000.tar")
    aborted.add(*members[0])
    aborted.abort()
    assert _keys(s3_server, s3_bucket) == ["labels/seg/00000.tar"] and list(scratch.iterdir()) == []


@pytest.mark.timeout(60)
def test_s3_local_copy_and_upload(s3_server, s3_bucket, scratch, tmp_path):
    body = os.urandom(3 << 20)
    src = tmp_path / "local.bin"
    src.write_bytes(body)
    storage.upload(str(src), f"{s3_bucket}/runs/x/metrics.jsonl")
    with storage.local_copy(f"{s3_bucket}/runs/x/metrics.jsonl") as local:
        assert os.path.dirname(local) == str(scratch)
        with open(local, "rb") as f:
            assert hashlib.sha256(f.read()).digest() == hashlib.sha256(body).digest()
    assert not os.path.exists(local)
    with storage.local_copy(str(src)) as same:  # a local file is used in place
        assert same == str(src)
    assert src.exists()


def test_dead_processes_spools_are_removed(scratch):
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                           text=True, check=True)
    dead = int(child.stdout)
    scratch.mkdir()
    (scratch / f"cliptex-{dead}-abc-00000.tar").write_bytes(b"left by a killed worker")
    (scratch / f"cliptex-{os.getpid()}-def-00001.tar").write_bytes(b"ours, in use")
    (scratch / "other-file").write_bytes(b"not ours")
    assert storage.remove_dead_spools() == [f"cliptex-{dead}-abc-00000.tar"]
    assert sorted(p.name for p in scratch.iterdir()) == [f"cliptex-{os.getpid()}-def-00001.tar", "other-file"]


def test_local_lock_is_exclusive(tmp_path):
    lock = str(tmp_path / "labels" / ".lock")
    with storage.exclusive(lock, {"job": "first"}):
        with pytest.raises(storage.LockHeld, match=f"held by pid {os.getpid()}") as e:
            with storage.exclusive(lock):
                pass
        assert e.value.holder["job"] == "first"
    with storage.exclusive(lock):  # released
        pass


@pytest.mark.timeout(60)
def test_s3_lock_is_exclusive_renewed_and_taken_over_when_stale(s3_server, s3_bucket, monkeypatch):
    lock = f"{s3_bucket}/labels/.lock"
    with storage.exclusive(lock, {"job": "first"}, renew_seconds=0.2):
        first = s3_server.client().head_object(Bucket=s3_bucket.removeprefix("s3://"), Key="labels/.lock")
        with pytest.raises(storage.LockHeld, match=f"held by pid {os.getpid()} .*taken over once") as e:
            with storage.exclusive(lock):
                pass
        assert e.value.holder["job"] == "first"
        time.sleep(1.0)
        renewed = s3_server.client().head_object(Bucket=s3_bucket.removeprefix("s3://"), Key="labels/.lock")
        assert renewed["ETag"] != first["ETag"]  # the holder rewrites its lease
    assert _keys(s3_server, s3_bucket) == []  # removed at the end

    # a holder that stopped renewing (killed): its lock is taken over once stale, and its own
    # release then leaves the new holder's lock alone
    with contextlib.ExitStack() as old:
        old.enter_context(storage.exclusive(lock, {"job": "killed"}, renew_seconds=3600))
        with storage.exclusive(lock, {"job": "new"}, lease_seconds=0):
            old.close()
            assert json.loads(storage.read_bytes(lock))["job"] == "new"
    assert _keys(s3_server, s3_bucket) == []

    # two processes taking over the same stale lock: the write is conditional on the ETag both
    # saw, so only the first succeeds
    storage.write_bytes_atomic(lock, b'{"job": "killed"}')
    fs, path = storage.filesystem(lock)
    stale = fs.info(path)
    with storage.exclusive(lock, {"job": "winner"}, lease_seconds=0):
        monkeypatch.setattr(fs, "info", lambda p, **kw: stale)  # the second saw the same stale lock
        with pytest.raises(storage.LockHeld):
            with storage.exclusive(lock, {"job": "loser"}, lease_seconds=0):
                pass
        monkeypatch.undo()
        assert json.loads(storage.read_bytes(lock))["job"] == "winner"
