"""Metadata answers that never end: a listing, revision or status body read whole would take the
pod's memory before any error could be said.

An endpoint that is not what it should be (a file server or a proxy answering for the Hub, a
namenode address pointing at the wrong port) can answer a metadata request with an endless body
or a small gzip body that inflates to gigabytes. Read whole (``response.json()``), either is an
OOM kill with no message. Each is served here byte for byte (tests/servers/raw_http.py, the
endless body stopping at 80 MiB so that the old code ends too) to the Hub, ModelScope and HDFS
providers, which must refuse it after at most 64 MiB with an error naming the URI; an error
answer's body is read only as far as its message needs.
"""

from __future__ import annotations

import gzip
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from storage_initializer.errors import InitializerError, SourceError, TransientError
from storage_initializer.providers import open_source
from storage_initializer.settings import Settings
from storage_initializer.uri import parse
from tests.helpers import clean_env, cli_argv, listing, read_all, run
from tests.servers.hub import client_env
from tests.servers.raw_http import RawHttp, Request

MiB = 1 << 20
#: What an endless body sends before it gives up (more than the 64 MiB limit).
ENDLESS = 80 * MiB
BLOCK = b" " * (1 << 16)


class Sent:
    """Body bytes a misbehaving answer got out before the client hung up."""

    def __init__(self) -> None:
        self.bytes = 0
        self.lock = threading.Lock()

    def add(self, count: int) -> None:
        with self.lock:
            self.bytes += count


def endless_json(
    sent: Sent, status: str = "200 OK", headers: tuple[tuple[str, str], ...] = ()
) -> Callable[..., bool]:
    """Every GET answered with a chunked JSON body of ENDLESS bytes of blanks after ``{``."""

    def answer(server: RawHttp, conn: socket.socket, request: Request) -> bool:
        framing = [("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")]
        head = server.head(status, [*framing, *headers])
        conn.sendall(head + b"1\r\n{\r\n")
        chunk = b"%x\r\n%s\r\n" % (len(BLOCK), BLOCK)
        for _ in range(ENDLESS // len(BLOCK)):
            conn.sendall(chunk)  # OSError once the client hung up ends the serving thread
            sent.add(len(BLOCK))
        conn.sendall(b"0\r\n\r\n")
        return True

    return answer


def gzip_bomb() -> Callable[..., bool]:
    """Every GET answered with ~80 KiB of gzip that inflates to 80 MiB of JSON blanks."""
    body = gzip.compress(b"{" + b" " * ENDLESS, compresslevel=9)

    def answer(server: RawHttp, conn: socket.socket, request: Request) -> bool:
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Encoding", "gzip"),
            ("Content-Length", str(len(body))),
        ]
        conn.sendall(server.head("200 OK", headers) + body)
        return True

    return answer


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[..., bool]], RawHttp]]:
    servers: list[RawHttp] = []

    def start(misbehave: Callable[..., bool]) -> RawHttp:
        servers.append(RawHttp(b"", misbehave))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def point_at(
    provider: str, server: RawHttp, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> str:
    """Point ``provider`` at ``server``; the URI to list."""
    url = f"http://127.0.0.1:{server.port}"
    for name in ("HF_TOKEN", "MODELSCOPE_API_TOKEN", "MODELSCOPE_DOMAIN", "STORAGE_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    if provider == "hf":
        for name, value in client_env(url, str(tmp_path / "hf-home")).items():
            monkeypatch.setenv(name, value)
        return "hf://acme/tiny"
    if provider == "modelscope":
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", url)
        return "modelscope://acme/tiny"
    secrets = tmp_path / "hdfs"
    secrets.mkdir()
    (secrets / "HDFS_NAMENODE").write_text(url)
    monkeypatch.setenv("HDFS_SECRET_DIR", str(secrets))
    return "hdfs://models/m"


@pytest.mark.parametrize("provider", ["hf", "modelscope", "hdfs"])
@pytest.mark.parametrize("body", ["endless", "gzip-bomb"])
def test_a_metadata_answer_past_the_limit_is_refused(
    serve: Callable[[Callable[..., bool]], RawHttp],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    provider: str,
    body: str,
) -> None:
    sent = Sent()
    server = serve(endless_json(sent) if body == "endless" else gzip_bomb())
    uri = point_at(provider, server, monkeypatch, tmp_path)
    with pytest.raises(SourceError, match="the answer is larger than 64 MiB") as caught:
        listing(uri)
    assert uri in caught.value.describe()
    if body == "endless":
        assert sent.bytes < ENDLESS  # the client hung up: it did not read it all


def test_a_hub_error_body_is_read_only_as_far_as_its_message(
    serve: Callable[[Callable[..., bool]], RawHttp],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """ModelScope reads an error answer's body for its message: a 503 with an endless body is
    the transient error it is, each attempt reading a bounded part of it."""
    sent = Sent()
    server = serve(endless_json(sent, "503 Service Unavailable", (("Retry-After", "0"),)))
    uri = point_at("modelscope", server, monkeypatch, tmp_path)
    with pytest.raises(TransientError, match="503"):
        listing(uri)
    assert server.gets >= 2  # retried: every attempt's body was cut, not read to its end
    assert sent.bytes < ENDLESS


def test_a_registry_token_answer_past_the_limit_is_refused(
    serve: Callable[[Callable[..., bool]], RawHttp],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A registry that asks for a Bearer token from a token service that never stops talking."""
    sent = Sent()
    token = endless_json(sent)

    def registry(server: RawHttp, conn: socket.socket, request: Request) -> bool:
        if request.path.startswith("/token"):
            return token(server, conn, request)
        realm = f'Bearer realm="http://127.0.0.1:{server.port}/token",service="raw"'
        headers = [("WWW-Authenticate", realm), ("Content-Length", "0")]
        conn.sendall(server.head("401 Unauthorized", headers))
        return True

    server = serve(registry)
    monkeypatch.setenv("KSERVE_OCI_INSECURE_REGISTRY", "true")
    monkeypatch.setenv("KSERVE_OCI_DOCKER_CONFIG", str(tmp_path / "no-such-config.json"))
    uri = f"oci://127.0.0.1:{server.port}/acme/model:v1"
    with pytest.raises(SourceError, match="the answer is larger than 64 MiB"):
        listing(uri)
    assert sent.bytes < ENDLESS


def test_a_datanode_error_body_is_read_only_as_far_as_its_message(
    serve: Callable[[Callable[..., bool]], RawHttp],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The namenode lists one file and sends the read to a "datanode" that answers 500 with an
    endless body: the read fails as the 500 it is, after a bounded part of the body."""
    sent = Sent()
    error = endless_json(sent, "500 Internal Server Error")
    status = (
        b'{"FileStatus": {"type": "FILE", "length": 3, "pathSuffix": "", '
        b'"modificationTime": 1, "fileId": 7}}'
    )

    def namenode_and_datanode(server: RawHttp, conn: socket.socket, request: Request) -> bool:
        if "op=GETFILESTATUS" in request.path:
            headers = [("Content-Type", "application/json"), ("Content-Length", str(len(status)))]
            conn.sendall(server.head("200 OK", headers) + status)
            return True
        if "op=OPEN" in request.path and "datanode" not in request.path:
            target = f"http://127.0.0.1:{server.port}/datanode/webhdfs/v1/models/m?op=OPEN"
            conn.sendall(
                server.head(
                    "307 Temporary Redirect", [("Location", target), ("Content-Length", "0")]
                )
            )
            return True
        return error(server, conn, request)

    server = serve(namenode_and_datanode)
    uri = point_at("hdfs", server, monkeypatch, tmp_path)
    source = open_source(parse(uri), Settings())
    try:
        (file,) = source.list().files
        with pytest.raises(InitializerError, match="500"):
            read_all(source, file)
    finally:
        source.close()
    assert sent.bytes < 32 * MiB  # 64 KiB read, the rest at most what socket buffers held


# -- answers that trickle ---------------------------------------------------------------------

#: How long a trickling answer goes on before it ends (the old code waited all of it).
TRICKLE_FOR = 40.0


def trickling_json(sent: Sent, done: threading.Event) -> Callable[..., bool]:
    """Every GET answered with ``{`` and then one blank every 0.2 s for TRICKLE_FOR seconds: each
    byte in time for any socket read timeout, the answer never. ``done`` is set when the
    client hung up before the end."""

    def answer(server: RawHttp, conn: socket.socket, request: Request) -> bool:
        head = server.head(
            "200 OK", [("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")]
        )
        conn.sendall(head + b"1\r\n{\r\n")
        end = time.monotonic() + TRICKLE_FOR
        try:
            while time.monotonic() < end:
                conn.sendall(b"1\r\n \r\n")
                sent.add(1)
                time.sleep(0.2)  # the trickle's pace, not synchronisation with the client
            conn.sendall(b"0\r\n\r\n")
        except OSError:
            done.set()  # the client cut the connection
            raise
        return True

    return answer


def hub_pull(server: RawHttp, tmp_path: Path, **env: str) -> Any:
    url = f"http://127.0.0.1:{server.port}"
    settings = {"STORAGE_INITIALIZER_STALL_TIMEOUT": "2", "STORAGE_INITIALIZER_RETRIES": "1"}
    environment = clean_env(client_env(url, str(tmp_path / "hf-home")), **settings, **env)
    return run(cli_argv("pull", "hf://acme/tiny", tmp_path / "dest"), environment)


def test_a_trickling_listing_is_cut_as_a_stall(
    serve: Callable[[Callable[..., bool]], RawHttp], tmp_path: Path
) -> None:
    """The Hub's revision answer trickles: a byte every 0.2 s passes every read timeout, and
    the listing ran outside the engine's stall guard, so a pull (and an init container) waited
    for as long as the server kept it up. The listing's own guard cuts it, and the pull fails
    with one line saying it stalled."""
    sent, done = Sent(), threading.Event()
    server = serve(trickling_json(sent, done))
    result = hub_pull(server, tmp_path)
    assert result.returncode != 0
    assert "hf://acme/tiny" in result.last_line
    assert "stalled (less than 1 KiB/s for 2s" in result.last_line, result.last_line
    assert done.is_set()  # the client hung up before the answer's end


def test_a_retry_after_wait_during_a_listing_is_not_a_stall(
    serve: Callable[[Callable[..., bool]], RawHttp], tmp_path: Path
) -> None:
    """Only time spent reading counts: the listing sleeps the server's Retry-After (3 s, longer
    than the 2 s stall window) between two requests, and its next answer is read as it is."""

    def busy_then_missing(server: RawHttp, conn: socket.socket, request: Request) -> bool:
        if request.get_number == 1:
            headers = [("Retry-After", "3"), ("Content-Length", "0")]
            conn.sendall(server.head("503 Service Unavailable", headers))
        else:
            body = b'{"error": "Repository not found"}'
            headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
            conn.sendall(server.head("404 Not Found", headers) + body)
        return True

    server = serve(busy_then_missing)
    result = hub_pull(server, tmp_path)
    assert result.returncode != 0
    assert server.gets == 2
    assert "stalled" not in result.stderr
    assert "not found" in result.last_line.lower(), result.last_line
