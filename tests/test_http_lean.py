"""The lean read path of http(s) sources (providers/http_lean.py) against real nginx, with the
counting proxy in front of it where a test needs to see or break requests: the lean path is the
one taken (and the environment switch and a proxy turn it off), it sends what the requests path
sends, answers are pinned and mapped as before, a redirect never carries the private headers
to another origin, and a cut or stalled body resumes from its last byte."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from storage_initializer.errors import (
    AccessDeniedError,
    RangesIgnoredError,
    SourceChangedError,
    SourceError,
    TransientError,
)
from storage_initializer.providers import http as httpmod
from storage_initializer.providers import http_lean, open_source
from storage_initializer.settings import Settings
from storage_initializer.uri import parse
from tests.helpers import clean_env, entrypoint, pattern, run, sha256, tree_digest
from tests.servers.base import closed_port
from tests.servers.nginx import Nginx
from tests.servers.proxy import CountingProxy, Fault
from tests.test_net_redirects import origin_a, origin_b

__all__ = ["origin_a", "origin_b"]  # fixtures shared with test_net_redirects

MiB = 1 << 20
PRIVATE = {"Authorization": "Bearer tok-lean-0123456789", "X-Api-Key": "key-lean-0123456789"}


@pytest.fixture
def front(nginx: Nginx) -> Iterator[CountingProxy]:
    """The counting proxy as a reverse proxy in front of nginx: it sees every request."""
    with CountingProxy(f"http://127.0.0.1:{nginx.http_port}") as proxy:
        yield proxy


def _publish(nginx: Nginx, front: CountingProxy, name: str, data: bytes) -> tuple[str, str]:
    """Put ``data`` in a fresh folder; (folder, its URL through the proxy)."""
    folder = nginx.new_dir()
    path = nginx.put(f"{folder}/{name}", data)
    return folder, f"{front.url}/{path.lstrip('/')}"


def source_for(uri: str, **settings: Any) -> httpmod.HttpSource:
    source = open_source(parse(uri), Settings(**settings))
    assert isinstance(source, httpmod.HttpSource)
    return source


def read_all(
    source: httpmod.HttpSource, file: Any, start: int = 0, end: int | None = None
) -> bytes:
    return b"".join(source.read(file, start, end))


def no_requests_path(source: httpmod.HttpSource, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every request through requests fail: what still works went the lean way."""

    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("a read went through requests")

    monkeypatch.setattr(source, "_request", refused)


def _lower(headers: dict[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


# -- the path taken -------------------------------------------------------------------------


def test_reads_take_the_lean_path_with_the_same_headers(
    nginx: Nginx, front: CountingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = pattern(3 * MiB + 17, 21)
    folder, url = _publish(nginx, front, "model.bin", data)
    monkeypatch.setenv("127.0.0.1-headers", json.dumps({"X-Api-Key": PRIVATE["X-Api-Key"]}))
    source = source_for(url.replace("http://", "http://user:p%40ss@"), read_size=64 * 1024)
    try:
        (file,) = source.list().files
        assert source._lean is not None, "the lean path is not in use"
        no_requests_path(source, monkeypatch)
        blocks = list(source.read(file, MiB, 2 * MiB))
        assert b"".join(blocks) == data[MiB : 2 * MiB]
        assert max(len(b) for b in blocks) <= 64 * 1024  # blocks of read_size
        (connection,) = source._lean.connections._mine().values()
        assert read_all(source, file) == data
        # Both answers read to their end: the second GET went on the same connection.
        assert list(source._lean.connections._mine().values()) == [connection]
        assert connection.sock is not None
    finally:
        source.close()
    gets = [r for r in front.select(method="GET", path_contains=folder)]
    assert len(gets) == 2, gets
    for record in gets:
        headers = _lower(record.headers)
        assert headers["x-api-key"] == PRIVATE["X-Api-Key"]
        assert headers["authorization"] == "Basic dXNlcjpwQHNz"  # user:p@ss, as requests sends
        assert headers["accept-encoding"] == "identity"
        assert headers["user-agent"].startswith("storage-initializer/")
    assert gets[0].range == f"bytes={MiB}-{2 * MiB - 1}"
    assert _lower(gets[0].headers)["if-range"] == file.version  # pinned to the listed ETag
    assert gets[1].range is None and gets[1].status == 200


def test_the_environment_switch_and_a_proxy_turn_the_lean_path_off(
    nginx: Nginx, front: CountingProxy, tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = pattern(2 * MiB + 5, 22)
    folder, url = _publish(nginx, front, "model.bin", data)
    # A whole pull each way: the server sees which client sent the GETs (requests always
    # sends "Accept: */*", http.client sends no Accept header).
    for switch, accept in (("true", False), ("false", True)):
        front.reset()
        env = clean_env(STORAGE_INITIALIZER_HTTP_LEAN=switch, STORAGE_INITIALIZER_CHUNK_SIZE="1MiB")
        result = entrypoint(url, tmp / switch, env=env)
        assert result.returncode == 0, result.describe()
        assert tree_digest(tmp / switch) == {"model.bin": sha256(data)}
        gets = front.select(method="GET", path_contains=folder)
        assert len(gets) == 3, gets
        assert all(("accept" in _lower(r.headers)) is accept for r in gets), (switch, gets)
    monkeypatch.setenv(http_lean.ENV, "false")
    assert source_for(url)._lean is None
    monkeypatch.delenv(http_lean.ENV)
    assert source_for(url)._lean is not None
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "")
    assert source_for(url)._lean is None
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert source_for(url)._lean is not None


_MODULES_AFTER_PULL = """
import sys
from storage_initializer.entrypoint import main
try:
    main(sys.argv[1:])
except SystemExit as exit:
    assert not exit.code, exit.code
heavy = ("requests", "urllib3", "awscrt")
print(" ".join(sorted(m for m in sys.modules if m.split(".")[0] in heavy)))
"""


@pytest.mark.parametrize("head_status", [None, 405])
def test_the_listing_is_lean_too_and_a_lean_pull_imports_no_client_library(
    head_status: int | None, nginx: Nginx, front: CountingProxy, tmp: Path
) -> None:
    """requests and urllib3 cost ~80 ms of CPU to import, awscrt ~40: a pull on the lean path
    lists with a lean HEAD (or, where HEAD is refused, a one-byte GET), hashes with zlib-ng's
    CRC-32 (the server announces no checksum) and never loads them."""
    data = pattern(3 * MiB + 7, 23)
    folder, url = _publish(nginx, front, "model.bin", data)
    if head_status is not None:
        front.add_fault(Fault(status=head_status, method="HEAD", path_contains=folder))
    env = clean_env(STORAGE_INITIALIZER_CHUNK_SIZE="1MiB")
    result = run([sys.executable, "-c", _MODULES_AFTER_PULL, url, str(tmp / "d")], env)
    assert result.returncode == 0, result.describe()
    assert result.stdout.strip() == "", f"imported: {result.stdout}"
    assert tree_digest(tmp / "d") == {"model.bin": sha256(data)}
    heads = front.select(method="HEAD", path_contains=folder)
    assert len(heads) == 1 and "accept" not in _lower(heads[0].headers)  # http.client's HEAD
    gets = front.select(method="GET", path_contains=folder)
    if head_status is not None:  # the one-byte GET told the size, the validator, the ranges
        assert gets[0].range == "bytes=0-0", gets[0]
        gets = gets[1:]
    assert sorted(r.range or "" for r in gets) == [
        f"bytes={n * MiB}-{min((n + 1) * MiB, len(data)) - 1}" for n in range(4)
    ]
    assert all(_lower(r.headers)["if-range"] for r in gets)  # pinned to the listed ETag


# -- pinning and errors ---------------------------------------------------------------------


def test_lean_reads_are_pinned_and_mapped_like_the_requests_path(
    nginx: Nginx, front: CountingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = pattern(300_000, 23)
    folder, url = _publish(nginx, front, "model.bin", data)
    source = source_for(url)
    try:
        (file,) = source.list().files
        no_requests_path(source, monkeypatch)
        front.set_faults(Fault(status=403, method="GET", times=1))
        with pytest.raises(AccessDeniedError, match="answered 403") as denied:
            read_all(source, file, 10, 20)
        assert "<hostname>-headers" in (denied.value.hint or "")
        front.set_faults(Fault(status=503, method="GET", times=1, headers={"Retry-After": "7"}))
        with pytest.raises(TransientError, match="answered 503") as busy:
            read_all(source, file, 10, 20)
        assert busy.value.retry_after == 7.0
        front.set_faults(Fault(status=412, method="GET", times=1))
        with pytest.raises(SourceChangedError, match="changed since it was listed"):
            read_all(source, file, 10, 20)
        front.set_faults()
        assert read_all(source, file, 10, 20) == data[10:20]  # the connection still serves
        # Replaced after the listing: If-Range no longer matches, nginx sends the new file
        # whole (200) with another ETag.
        nginx.put(f"{folder}/model.bin", pattern(300_001, 24))
        with pytest.raises(SourceChangedError, match="changed since it was listed"):
            read_all(source, file, 10, 20)
    finally:
        source.close()


def test_ranges_ignored_on_the_lean_path(
    nginx: Nginx, front: CountingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = pattern(200_000, 25)
    _folder, url = _publish(nginx, front, "model.bin", data)
    source = source_for(url)
    try:
        (file,) = source.list().files
        no_requests_path(source, monkeypatch)
        front.set_faults(Fault(kind="strip", strip_headers=("Range",), method="GET"))
        with pytest.raises(RangesIgnoredError, match="ignored a range request"):
            read_all(source, file, 100, 200)
        assert source.supports_ranges is False
        front.set_faults()
        assert read_all(source, file) == data  # one stream from now on
    finally:
        source.close()


def test_unreachable_and_untrusted_servers_are_source_errors(nginx: Nginx) -> None:
    with closed_port() as port:
        reader = http_lean.LeanReader(f"http://127.0.0.1:{port}/m.bin", {}, True, (5, 5))
        with pytest.raises(SourceError, match=rf"cannot connect to 127.0.0.1:{port}"):
            reader.get({}, "uri")
    reader = http_lean.LeanReader(nginx.url("/x.bin", https=True), {}, True, (5, 5))
    with pytest.raises(SourceError, match="TLS verification failed") as raised:
        reader.get({}, "uri")
    assert "CA_BUNDLE" in (raised.value.hint or "")


# -- redirects -----------------------------------------------------------------------------


def test_a_redirected_read_never_carries_private_headers_to_another_origin(
    nginx: Nginx, origin_a: CountingProxy, origin_b: CountingProxy, tmp: Path
) -> None:
    data = pattern(100_000, 26)
    root = nginx.new_dir()
    target = f"{origin_b.url}/{nginx.put(f'{root}/cdn/model.bin', data)}"
    path = f"/{root}/m/model.bin"
    origin_a.add_fault(
        Fault(status=302, headers={"Location": target}, predicate=lambda r: r.path == path)
    )
    uri = (origin_a.url + path).replace("http://", "http://user:secret-pw@")
    env = clean_env({"127.0.0.1-headers": json.dumps(PRIVATE)})
    result = entrypoint(uri, tmp / "dest", env=env)
    assert result.returncode == 0, result.describe()
    assert (tmp / "dest" / "model.bin").read_bytes() == data
    # The lean GET went to the URI's origin (with its headers), was redirected, and the read
    # was made again through requests, which followed the redirect without them.
    lean_gets = [r for r in origin_a.requests if r.method == "GET"]
    assert lean_gets, "no read reached the URI's own origin"
    assert all({n.lower() for n in r.headers} >= {"x-api-key"} for r in lean_gets)
    assert [r for r in origin_b.requests if r.method == "GET"], "the redirect was not followed"
    for seen in origin_b.requests:
        names = {name.lower() for name in seen.headers}
        assert not names & {"authorization", "x-api-key"}, (seen.method, seen.headers)
    assert "tok-lean" not in result.output and "secret-pw" not in result.output


# -- cut and stalled bodies ----------------------------------------------------------------


def test_a_cut_body_is_transient_and_the_pull_resumes_from_the_last_byte(
    nginx: Nginx, front: CountingProxy, tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = pattern(3 * MiB, 27)
    folder, url = _publish(nginx, front, "model.bin", data)
    source = source_for(url)
    try:
        (file,) = source.list().files
        no_requests_path(source, monkeypatch)
        front.set_faults(Fault(kind="truncate", truncate_fraction=0.5, method="GET", times=1))
        received = bytearray()
        with pytest.raises(TransientError, match="transfer broke"):
            for block in source.read(file):
                received += block
        assert 0 < len(received) < len(data)
        assert read_all(source, file, len(received)) == data[len(received) :]
    finally:
        source.close()
    front.reset()
    front.set_faults(Fault(kind="truncate", truncate_fraction=0.5, method="GET", times=1))
    env = clean_env(STORAGE_INITIALIZER_CHUNK_SIZE="1MiB", STORAGE_INITIALIZER_WORKERS="1")
    result = entrypoint(url, tmp / "dest", env=env)
    assert result.returncode == 0, result.describe()
    assert tree_digest(tmp / "dest") == {"model.bin": sha256(data)}
    gets = front.select(method="GET", path_contains=folder)
    starts = sorted(int(r.range.split("=")[1].split("-")[0]) for r in gets if r.range)
    assert len(gets) == 4, gets
    assert any(start % MiB for start in starts), starts  # resumed inside a chunk


def test_a_stalled_body_is_cut_and_resumed(nginx: Nginx, front: CountingProxy, tmp: Path) -> None:
    data = pattern(2 * MiB, 28)
    folder, url = _publish(nginx, front, "model.bin", data)
    front.set_faults(
        Fault(kind="trickle", truncate_fraction=0.25, delay=1.0, method="GET", times=1)
    )
    env = clean_env(
        STORAGE_INITIALIZER_CHUNK_SIZE="4MiB",
        STORAGE_INITIALIZER_STALL_TIMEOUT="2",
        STORAGE_INITIALIZER_WORKERS="1",
    )
    result = entrypoint(url, tmp / "dest", env=env)
    assert result.returncode == 0, result.describe()
    assert tree_digest(tmp / "dest") == {"model.bin": sha256(data)}
    gets = front.select(method="GET", path_contains=folder)
    assert len(gets) == 2, gets
    assert gets[0].fault == "trickle" and gets[1].range is not None
    assert int(gets[1].range.split("=")[1].split("-")[0]) > 0  # from its last byte
