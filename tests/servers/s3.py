"""A real S3 server for tests: ``moto_server`` started as a subprocess on 127.0.0.1.

Why a subprocess and not ``mock_aws``: the code under test (and, in end-to-end tests, whole
``storage-initializer`` processes) must talk HTTP to a server, exactly as in a cluster, so that
addressing style, signing, ranges, error bodies and retries are exercised for real. Moto serves
path-style requests, keeps objects in memory and accepts any credentials.

Use the session-scoped fixture :func:`s3_server`; every test creates its own bucket with
:meth:`S3Server.new_bucket`, so tests never see each other's objects.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import requests

from tests.servers.process import end_process, free_port
from tests.servers.proxy import CountingProxy

ACCESS_KEY = "AKIATESTFIXTURE00001"
SECRET_KEY = "fixture-secret-key-0123456789abcdef"
REGION = "us-east-1"
STARTUP_DEADLINE = 60.0


def wait_until_http_ready(url: str, process: subprocess.Popen[bytes], deadline: float) -> None:
    """Poll ``url`` until it answers; fail early if the server process died."""
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode} before it was ready")
        try:
            requests.get(url, timeout=1.0)
            return
        except requests.RequestException as exc:
            last = exc
        time.sleep(0.05)  # polling interval of a readiness probe, not a synchronisation
    raise RuntimeError(f"server at {url} not ready before the deadline: {last}")


def _moto_command(port: int) -> list[str]:
    exe = shutil.which("moto_server")
    if exe:
        return [exe, "-H", "127.0.0.1", "-p", str(port)]
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]


class S3Server:
    """A running S3 endpoint and helpers to fill it."""

    def __init__(self, endpoint: str, process: subprocess.Popen[bytes] | None = None) -> None:
        self.endpoint = endpoint
        self.process = process
        self._client: Any = None

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """The AWS_* variables a subprocess needs to reach this server (or a proxy in front)."""
        return {
            "AWS_ENDPOINT_URL": endpoint or self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
        }

    def client(self) -> Any:
        """A boto3 client for setting up fixtures (path-style, dummy credentials)."""
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.session.Session().client(
                "s3",
                endpoint_url=self.endpoint,
                aws_access_key_id=ACCESS_KEY,
                aws_secret_access_key=SECRET_KEY,
                region_name=REGION,
                config=Config(s3={"addressing_style": "path"}),
            )
        return self._client

    def new_bucket(self, files: Mapping[str, bytes] | None = None, prefix: str = "t") -> str:
        """Create a bucket with a unique name, optionally filled with ``{key: bytes}``."""
        name = f"{prefix}-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        if files:
            self.upload(name, files)
        return name

    def upload(self, bucket: str, files: Mapping[str, bytes], **extra: Any) -> None:
        """Put each ``{key: bytes}`` as a single-part object (extra args go to put_object)."""
        for key, data in files.items():
            self.client().put_object(Bucket=bucket, Key=key, Body=data, **extra)

    def upload_multipart(self, bucket: str, key: str, parts: list[bytes]) -> None:
        """Upload one object in several parts, so its ETag is ``<md5-of-md5s>-N``."""
        client = self.client()
        upload = client.create_multipart_upload(Bucket=bucket, Key=key)
        done = []
        for number, data in enumerate(parts, start=1):
            answer = client.upload_part(
                Bucket=bucket,
                Key=key,
                PartNumber=number,
                UploadId=upload["UploadId"],
                Body=data,
            )
            done.append({"PartNumber": number, "ETag": answer["ETag"]})
        client.complete_multipart_upload(
            Bucket=bucket,
            Key=key,
            UploadId=upload["UploadId"],
            MultipartUpload={"Parts": done},
        )

    def stop(self) -> None:
        end_process(self.process)


def start_moto(attempts: int = 3) -> S3Server:
    """Start ``moto_server`` on a free loopback port; retry if another process took the port."""
    error: Exception | None = None
    for _ in range(attempts):
        port = free_port()
        env = dict(os.environ)
        # The server must not pick up credentials or endpoints meant for clients.
        for name in list(env):
            if name.startswith("AWS_"):
                del env[name]
        process = subprocess.Popen(
            _moto_command(port),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        endpoint = f"http://127.0.0.1:{port}"
        server = S3Server(endpoint, process)
        try:
            wait_until_http_ready(
                endpoint + "/moto-api/", process, time.monotonic() + STARTUP_DEADLINE
            )
        except RuntimeError as exc:
            error = exc
            server.stop()
            continue
        return server
    raise RuntimeError(f"could not start moto_server: {error}")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server shared by the whole session."""
    server = start_moto()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[CountingProxy]:
    """A fresh counting, fault-injecting proxy in front of the session's moto (one per test,
    so counts and faults never leak between tests)."""
    with CountingProxy(s3_server.endpoint) as counting:
        yield counting
