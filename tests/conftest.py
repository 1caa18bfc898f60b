"""Shared fixtures. Everything runs offline: hubs are switched off before any import uses them."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset pulls albumentations, which phones home

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    """A fresh copy of the embedded sample (2 img2dataset shards of real photographs)."""
    from pipeline.sample import build

    out = tmp_path_factory.mktemp("sample")
    build(out)
    return out


@pytest.fixture(scope="session")
def null_experts():
    """Zero-cost constant maps: for tests about the data path, not the maps' content."""
    from pipeline.labels import TASKS
    from pipeline.worker import build_experts

    return build_experts(TASKS, "null", "cpu")


@pytest.fixture(scope="session")
def smoke_labels(sample_dir, tmp_path_factory) -> Path:
    """Label trees for the sample shards (seg, depth, normal), written by the real pseudo-label job
    (``python -m pipeline --profile smoke`` on local Ray, 2 workers x 1 torch thread)."""
    from pipeline.__main__ import main

    out = tmp_path_factory.mktemp("labels")
    manifest = out.parent / f"{out.name}-sample.yaml"
    manifest.write_text(f"name: sample\nroot: {sample_dir}\nshards: \"{{00000..00001}}.tar\"\n"
                        f"expected_samples: 16\noutput: {out}\n")
    rc = main(["--shards", str(manifest), "--profile", "smoke", "--out", str(out), "--workers", "2",
               "--threads-per-worker", "1", "--no-progress"])
    assert rc == 0, "the smoke pseudo-label job failed (see stderr)"
    return out


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's server on 127.0.0.1, random port, own process) for the whole session;
    the standard AWS variables point at it while it runs. Tests use buckets of their own names."""
    from tests.s3server import S3Server

    server = S3Server()
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in server.env.items():
                mp.setenv(k, v)
            yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh, empty bucket for one test: ``s3://<name>``."""
    import re
    import uuid

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    s3_server.client().create_bucket(Bucket=name)
    return f"s3://{name}"


# ---- "no network call was made": event checks instead of wall-clock bounds -----------------------

_GUARD = '''
import atexit, os, socket, sys
_events = os.environ["CLIPTEX_TEST_EVENTS"]


def _record(what):
    with open(_events, "a") as f:
        f.write(what + "\\n")


def _getaddrinfo(host, *args, **kwargs):
    _record(f"getaddrinfo {host!r}")
    raise OSError("network refused by the test")


_connect = socket.socket.connect


def _guarded_connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _record(f"connect {address!r}")
        raise OSError("network refused by the test")
    return _connect(self, address)


socket.getaddrinfo = _getaddrinfo
socket.socket.connect = _guarded_connect


@atexit.register
def _ray_state():
    ray = sys.modules.get("ray")
    if ray is not None and getattr(ray, "is_initialized", lambda: False)():
        _record("ray initialised")
'''


def network_guard(tmp_path: Path) -> tuple[dict, Path]:
    """Environment for a subprocess in which every DNS lookup and internet connection is refused
    and written to the returned events file, as is a Ray instance still up at exit."""
    site = tmp_path / "network-guard"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_GUARD)
    events = tmp_path / "network-guard.events"
    path = os.pathsep.join(p for p in (str(site), str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "CLIPTEX_TEST_EVENTS": str(events)}, events


def guard_events(events: Path) -> list[str]:
    return events.read_text().splitlines() if events.exists() else []


@pytest.fixture
def no_network(monkeypatch) -> list[str]:
    """In this process: every DNS lookup or internet connection fails and is recorded in the list."""
    import socket

    attempts: list[str] = []
    connect = socket.socket.connect

    def getaddrinfo(host, *args, **kwargs):
        attempts.append(f"getaddrinfo {host!r}")
        raise OSError("network refused by the test")

    def guarded_connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(f"connect {address!r}")
            raise OSError("network refused by the test")
        return connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    return attempts
