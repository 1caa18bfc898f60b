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
