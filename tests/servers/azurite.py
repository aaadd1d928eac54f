"""Real Azurite (the Azure Storage emulator, npm package ``azurite``) on 127.0.0.1 for tests.

Azurite is installed locally with ``npm install --no-save --prefix .work/node azurite@3`` (the
fixture does it once when the binary is missing; ``.work/`` is gitignored). It serves the Blob
API only; Azure File shares are tested against ``tests/servers/azure_files.py``.

Usage::

    def test_x(azurite):
        azurite.upload("models", {"m/config.json": b"{}"})
        env = azurite.env()  # AZURE_STORAGE_BLOB_ENDPOINT + AZURE_STORAGE_ACCESS_KEY
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from tests.servers.process import end_process, free_port

REPO = Path(__file__).resolve().parents[2]
NODE_PREFIX = Path(os.environ.get("AZURITE_NODE_PREFIX", REPO / ".work" / "node"))
AZURITE_BIN = NODE_PREFIX / "node_modules" / ".bin" / "azurite-blob"

#: The well-known development account of every Azure Storage emulator (public, not a secret).
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
#: How test URIs name the account; AZURE_STORAGE_BLOB_ENDPOINT sends the requests to Azurite.
PUBLIC_HOST = f"{ACCOUNT}.blob.core.windows.net"
START_TIMEOUT = 60.0


def ensure_installed() -> Path:
    """The azurite-blob launcher, installing the npm package once if it is not there yet."""
    if AZURITE_BIN.exists():
        return AZURITE_BIN
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed: cannot install Azurite")
    NODE_PREFIX.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [npm, "install", "--no-save", "--no-audit", "--no-fund", "--prefix", str(NODE_PREFIX),
         "azurite@3"],
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=600,
    )  # fmt: skip
    return AZURITE_BIN


class Azurite:
    """One running Azurite blob service and helpers to fill it."""

    def __init__(self, port: int, process: subprocess.Popen[bytes], location: str) -> None:
        self.port = port
        self.process = process
        self.location = location
        self.account = ACCOUNT
        self.key = ACCOUNT_KEY
        self.endpoint = f"http://127.0.0.1:{port}/{ACCOUNT}"
        self._counter = 0

    # -- clients and URIs -------------------------------------------------------------------
    def service(self):  # -> azure.storage.blob.BlobServiceClient
        from azure.storage.blob import BlobServiceClient

        credential = {"account_name": ACCOUNT, "account_key": ACCOUNT_KEY}
        return BlobServiceClient(self.endpoint, credential=credential)

    def uri(self, container: str, prefix: str = "", sas: str | None = None) -> str:
        """The public-looking URI a user would write; requests go to Azurite through env()."""
        text = f"https://{PUBLIC_HOST}/{container}/{prefix}"
        return f"{text}?{sas}" if sas else text

    def env(self, *, key: bool = True, endpoint: str | None = None) -> dict[str, str]:
        """Environment for a provider or a subprocess: endpoint override and the account key."""
        env = {"AZURE_STORAGE_BLOB_ENDPOINT": endpoint or self.endpoint}
        if key:
            env["AZURE_STORAGE_ACCESS_KEY"] = ACCOUNT_KEY
        return env

    def new_container_name(self, stem: str = "c") -> str:
        """Container names are global to the session: every test takes fresh ones."""
        self._counter += 1
        return f"{stem}{self._counter}-{os.getpid()}"[:63].lower()

    # -- content ----------------------------------------------------------------------------
    def upload(
        self,
        container: str,
        files: Mapping[str, bytes],
        *,
        content_md5: bool = True,
        public: bool = False,
        create: bool = True,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Create ``container`` and upload ``{blob name: bytes}``, with or without Content-MD5."""
        from azure.core.exceptions import ResourceExistsError
        from azure.storage.blob import ContentSettings

        service = self.service()
        client = service.get_container_client(container)
        if create:
            with contextlib.suppress(ResourceExistsError):
                client.create_container(public_access="container" if public else None)
        for name, data in files.items():
            if content_md5:
                settings = ContentSettings(content_md5=bytearray(hashlib.md5(data).digest()))
                client.upload_blob(
                    name, data, overwrite=True, content_settings=settings, metadata=metadata
                )
            elif not data:
                client.get_blob_client(name).commit_block_list([])
            else:
                # Put Blob makes the service compute an MD5; a block list (how large blobs are
                # uploaded) leaves Content-MD5 unset, which is the case to test.
                blob = client.get_blob_client(name)
                blob.stage_block("YmxvY2sw", data)
                blob.commit_block_list(["YmxvY2sw"])
        service.close()

    def sas(self, container: str, *, permission: str = "rl", hours: float = 1.0) -> str:
        """A container SAS token (query string without "?") signed with the account key."""
        from azure.storage.blob import ContainerSasPermissions, generate_container_sas

        now = datetime.datetime.now(datetime.UTC)
        return generate_container_sas(
            ACCOUNT,
            container,
            account_key=ACCOUNT_KEY,
            permission=ContainerSasPermissions.from_string(permission),
            start=now - datetime.timedelta(minutes=5),
            expiry=now + datetime.timedelta(hours=hours),
        )


def _wait_ready(process: subprocess.Popen[bytes], port: int, deadline: float) -> None:
    """Poll until Azurite answers HTTP; fail early if it exits. Waiting on the process (not a
    sleep) paces the polls and notices a crash at once."""
    url = f"http://127.0.0.1:{port}/{ACCOUNT}?comp=list"
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer (403 without auth) means it is serving
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"Azurite did not answer on port {port} in {START_TIMEOUT} s")
        try:
            code = process.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            continue
        raise RuntimeError(f"Azurite exited with status {code} before serving")


def start_azurite(location: str) -> Azurite:
    launcher = ensure_installed()
    last_error: Exception | None = None
    for _attempt in range(3):  # a free port can be taken between probing and binding
        port = free_port()
        # A file, not a pipe: nobody reads Azurite's output during the session.
        log = open(os.path.join(location, f"azurite-{port}.log"), "wb")  # noqa: SIM115
        process = subprocess.Popen(
            [str(launcher), "--blobHost", "127.0.0.1", "--blobPort", str(port),
             "--location", location, "--silent", "--skipApiVersionCheck", "--loose"],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )  # fmt: skip
        try:
            _wait_ready(process, port, time.monotonic() + START_TIMEOUT)
        except RuntimeError as exc:
            stop(process)
            log.close()
            with open(log.name, errors="replace") as handle:
                last_error = RuntimeError(f"{exc}; log: {handle.read()[-2000:]}")
            continue
        log.close()  # the child keeps its own descriptor
        return Azurite(port, process, location)
    raise RuntimeError(f"could not start Azurite: {last_error}")


def stop(process: subprocess.Popen[bytes]) -> None:
    end_process(process)


def serve() -> Iterator[Azurite]:
    """Generator behind the fixture (``yield from serve()`` in a test module's own fixture)."""
    location = tempfile.mkdtemp(prefix="azurite-")
    server = start_azurite(location)
    try:
        yield server
    finally:
        stop(server.process)
        shutil.rmtree(location, ignore_errors=True)


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    """A real Azurite blob service for the whole session on a free loopback port."""
    yield from serve()
