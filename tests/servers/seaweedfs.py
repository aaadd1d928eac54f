"""A real S3 server that checks signatures: SeaweedFS (``weed mini``) on 127.0.0.1.

Why besides moto: moto accepts any credentials and cannot check a presigned URL, so "a URL
signed for GET only is refused a HEAD" (what AWS, MinIO and SeaweedFS do) can only be tested
against a server that verifies signatures. ``weed mini`` starts in about a second with one
identity, the keys given in its environment.

Use the session-scoped fixture :func:`seaweedfs`; each test makes its own bucket.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.servers.process import end_process, free_port

ACCESS_KEY = "AKIASEAWEEDFIXTURE01"
SECRET_KEY = "seaweed-fixture-secret-0123456789"
REGION = "us-east-1"
STARTUP_DEADLINE = 90.0


class SeaweedFs:
    def __init__(self, endpoint: str, process: subprocess.Popen[bytes], workdir: str) -> None:
        self.endpoint = endpoint
        self.process = process
        self.workdir = workdir
        self._client: Any = None

    def client(self, endpoint: str | None = None) -> Any:
        """A boto3 client (path-style, SigV4); ``endpoint``: another address of this server,
        such as a proxy in front of it (a presigned URL's signature covers the host)."""
        if endpoint is not None:
            return self._make_client(endpoint)
        if self._client is None:
            self._client = self._make_client(self.endpoint)
        return self._client

    @staticmethod
    def _make_client(endpoint: str) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
            config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"),
        )

    def new_bucket(self) -> str:
        name = f"t-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def presigned_get(
        self, bucket: str, key: str, expires: int = 3600, endpoint: str | None = None
    ) -> str:
        """A URL signed for GET of ``key`` only (a HEAD of it is refused with 403)."""
        return self.client(endpoint).generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires
        )

    def stop(self) -> None:
        end_process(self.process, grace=20)
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_seaweedfs() -> SeaweedFs:
    weed = shutil.which("weed")
    if weed is None:
        pytest.skip("weed (SeaweedFS) is not installed")
    workdir = tempfile.mkdtemp(prefix="si-weed-")
    ports = {name: free_port() for name in ("master", "volume", "filer", "s3", "admin")}
    command = [
        weed, "mini", f"-dir={workdir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-admin.ui=false", "-webdav=false", "-master.telemetry=false",
        f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
        f"-filer.port={ports['filer']}", f"-s3.port={ports['s3']}",
        f"-admin.port={ports['admin']}", f"-debug.port={free_port()}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=workdir
    )
    server = SeaweedFs(f"http://127.0.0.1:{ports['s3']}", process, workdir)
    deadline = time.monotonic() + STARTUP_DEADLINE
    while True:  # the S3 port opens before the filer accepts writes: ready once a bucket is made
        if process.poll() is not None:
            server.stop()
            raise RuntimeError(f"weed mini exited with code {process.returncode}")
        try:
            server.client().delete_bucket(Bucket=server.new_bucket())
            return server
        except Exception:
            if time.monotonic() > deadline:
                server.stop()
                raise
            time.sleep(0.2)  # polling interval of a readiness probe


@pytest.fixture(scope="session")
def seaweedfs() -> Iterator[SeaweedFs]:
    server = start_seaweedfs()
    try:
        yield server
    finally:
        server.stop()
