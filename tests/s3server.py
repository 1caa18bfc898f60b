"""A real S3 API for the tests: moto's server on 127.0.0.1 with a random port, in its own process.

    python -m tests.s3server        # serves, prints "PORT <n>", stops when stdin closes

``S3Server`` starts that process and hands out the standard AWS variables that point any client
at it — boto3, s3fs in this process, and subprocesses (Ray workers, torchrun ranks) alike:
``AWS_ENDPOINT_URL_S3`` and dummy credentials; the instance-metadata lookup is switched off and a
developer's ``~/.aws`` is never read. ``require_auth()`` turns on moto's IAM checks, so access keys
and policies are enforced like on AWS.
"""
from __future__ import annotations

import contextlib
import logging
import os
import select
import subprocess
import sys
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 60


class S3Server:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.s3server"], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], START_TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError(f"moto server did not start within {START_TIMEOUT_S} s (got {line!r})")
        self.endpoint = f"http://127.0.0.1:{int(line.split()[1])}"

    @property
    def env(self) -> dict[str, str]:
        """The variables every AWS client reads: endpoint, region, (dummy) credentials."""
        return {"AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_ENDPOINT_URL_IAM": self.endpoint,
                "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_CONFIG_FILE": os.devnull}

    def client(self, service: str = "s3", **credentials):
        import boto3

        kw = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
        kw.update(credentials)
        return boto3.client(service, endpoint_url=self.endpoint, region_name="us-east-1", **kw)

    def _set_auth_threshold(self, value: str) -> None:
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=value.encode(),
                                     method="POST", headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()

    @contextlib.contextmanager
    def require_auth(self):
        """moto checks every request's access key and IAM policy while this is active."""
        self._set_auth_threshold("0")
        try:
            yield
        finally:
            self._set_auth_threshold("inf")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc.stdout.close()


def _serve() -> None:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    print(f"PORT {server.get_host_and_port()[1]}", flush=True)
    sys.stdin.read()  # until the parent closes stdin or dies
    server.stop()


if __name__ == "__main__":
    _serve()
