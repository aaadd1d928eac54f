"""Plain-http bodies spliced from the socket into the file (storage_initializer/splice.py),
against real servers: nginx (http and https), SeaweedFS-compatible S3 (moto) behind the
fault-injecting proxy, and the proxy holding a body mid-way. The spliced pull is byte-identical,
the metrics say the kernel moved the bytes (and that ``--no-splice`` and TLS did not), cut and
failed bodies resume at their last byte, a body that goes silent mid-splice is cut by the stall
guard, and a file the kernel refuses to splice into is written the ordinary way.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage_initializer import splice, stall
from storage_initializer.providers import lean_http
from tests.helpers import clean_env, entrypoint, pattern, sha256
from tests.servers.nginx import Nginx
from tests.servers.proxy import CountingProxy, Fault
from tests.servers.s3 import S3Server, proxy, s3_server
from tests.test_cache_ops import read_metrics
from tests.test_data_plane import pull_through_faults

__all__ = ["proxy", "s3_server"]  # fixtures, imported so that pytest finds them

MiB = 1 << 20
METRIC = "storage_initializer_bytes_spliced_total"


def spliced(metrics: Path) -> float:
    (sample,) = read_metrics(metrics)[METRIC]
    return float(sample.value)


def _pull(url: str, dest: Path, metrics: Path, **env: str) -> None:
    result = entrypoint(
        url,
        dest,
        env=clean_env(
            STORAGE_INITIALIZER_METRICS_FILE=str(metrics),
            STORAGE_INITIALIZER_CHUNK_SIZE="2MiB",
            **env,
        ),
    )
    assert result.returncode == 0, result.describe()


def test_a_large_http_file_is_spliced_byte_identically_and_no_splice_turns_it_off(
    nginx: Nginx, tmp_path: Path
) -> None:
    data = pattern(5 * MiB + 123, 7)
    url = nginx.url(nginx.put(f"{nginx.new_dir()}/m/model.bin", data))
    on, off = tmp_path / "on.prom", tmp_path / "off.prom"
    _pull(url, tmp_path / "a", on)
    _pull(url, tmp_path / "b", off, STORAGE_INITIALIZER_SPLICE="false")
    assert sha256((tmp_path / "a" / "model.bin").read_bytes()) == sha256(data)
    assert sha256((tmp_path / "b" / "model.bin").read_bytes()) == sha256(data)
    # Four bodies of at least 1 MiB; only what http.client buffered past each header is not.
    assert len(data) - 4 * io.DEFAULT_BUFFER_SIZE <= spliced(on) <= len(data)
    assert spliced(off) == 0


def test_https_bodies_are_read_not_spliced(nginx: Nginx, tmp_path: Path) -> None:
    data = pattern(3 * MiB + 5, 8)
    url = nginx.url(nginx.put(f"{nginx.new_dir()}/m/model.bin", data), https=True)
    metrics = tmp_path / "m.prom"
    _pull(url, tmp_path / "d", metrics, REQUESTS_CA_BUNDLE=str(nginx.cert))
    assert sha256((tmp_path / "d" / "model.bin").read_bytes()) == sha256(data)
    assert spliced(metrics) == 0  # TLS is decrypted in user space


def test_spliced_chunks_cut_or_failed_by_the_proxy_resume_byte_identically(
    s3_server: S3Server, proxy: CountingProxy, tmp_path: Path
) -> None:
    files = {
        "model/a.bin": pattern(7 * MiB + 11, 1),
        "model/b.bin": pattern(3 * MiB, 2),
        "model/small.json": pattern(5000, 3),
    }
    metrics = tmp_path / "m.prom"
    env = {
        "STORAGE_INITIALIZER_CHUNK_SIZE": "2MiB",
        "STORAGE_INITIALIZER_WORKERS": "3",
        "STORAGE_INITIALIZER_METRICS_FILE": str(metrics),
    }
    pull_through_faults(s3_server, proxy, tmp_path / "out", files, env)
    assert spliced(metrics) > 5 * MiB


@pytest.fixture
def front(nginx: Nginx) -> Iterator[CountingProxy]:
    with CountingProxy(f"http://127.0.0.1:{nginx.http_port}") as counting:
        yield counting


def test_a_body_that_goes_silent_mid_splice_is_cut_and_resumed(
    nginx: Nginx, front: CountingProxy, tmp_path: Path
) -> None:
    """The proxy sends 1.5 MiB of a 4 MiB body, then nothing (for two minutes). Only the stall
    guard cutting the socket the splice waits on ends that wait before the run's deadline (the
    read timeout is 60 s): the range resumes at its last byte."""
    data = pattern(4 * MiB, 9)
    path = nginx.put(f"{nginx.new_dir()}/m/model.bin", data)
    hold = Fault(
        kind="hold",
        method="GET",
        path_contains="/m/model.bin",
        hold_after=3 * MiB // 2,
        gate=threading.Event(),
        gate_timeout=120,
        times=1,
    )
    front.set_faults(hold)
    dest = tmp_path / "dest"
    env = clean_env(
        STORAGE_INITIALIZER_STALL_TIMEOUT="2",
        STORAGE_INITIALIZER_TIMEOUT="25",
        STORAGE_INITIALIZER_METRICS_FILE=str(tmp_path / "m.prom"),
    )
    result = entrypoint(f"{front.url}/{path.lstrip('/')}", dest, env=env)
    hold.release(cut=True)
    assert result.returncode == 0, result.describe()
    assert sha256((dest / "model.bin").read_bytes()) == sha256(data)
    assert "stalled" in result.stderr, result.stderr
    gets = front.select(method="GET")
    assert len(gets) == 2, gets
    assert gets[1].range is not None
    resumed_at = int(gets[1].range.removeprefix("bytes=").split("-")[0])
    assert 1 * MiB <= resumed_at <= 3 * MiB // 2, gets[1].range
    assert spliced(tmp_path / "m.prom") > 0


def _read_into(
    nginx: Nginx, url: str, fd: int, size: int
) -> tuple[list[splice.Landed | bytes], lean_http.Connections]:
    connections = lean_http.Connections(True, 5, 5)
    answer = connections.get(url, {"Range": lean_http.range_header(0, size)})
    assert answer.status == 206
    with splice.offered(splice.Landing(fd, 0, 4096)):
        blocks = list(lean_http.ranged_body(answer, 0, size, False, 256 * 1024, url))
    return blocks, connections


def test_landed_blocks_keep_the_connection_for_the_next_request(
    nginx: Nginx, tmp_path: Path
) -> None:
    data = pattern(2 * MiB + 77, 10)
    url = nginx.url(nginx.put(f"{nginx.new_dir()}/m.bin", data))
    target = tmp_path / "f"
    fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        blocks, connections = _read_into(nginx, url, fd, len(data))
        assert all(isinstance(b, splice.Landed) for b in blocks)
        assert any(b.spliced for b in blocks if isinstance(b, splice.Landed))
        assert sum(len(b) for b in blocks) == len(data)
        assert target.read_bytes() == data
        (kept,) = connections._mine().values()
        again = connections.get(url, {"Range": "bytes=0-9"})  # the same keep-alive connection
        assert again.response.read() == data[:10]
        assert connections._mine()[("http", f"127.0.0.1:{nginx.http_port}")] is kept
    finally:
        os.close(fd)


@pytest.mark.parametrize("https", [False, True], ids=["http", "https"])
def test_a_keep_alive_connection_is_reused_after_whole_answers(nginx: Nginx, https: bool) -> None:
    """An idle connection readable before we ask is dropped (lean_http._holds_unasked): one
    that read its answers to the end is not, over TLS too (no handshake per request)."""
    data = pattern(64 * 1024 + 3, 13)
    url = nginx.url(nginx.put(f"{nginx.new_dir()}/small.bin", data), https=https)
    connections = lean_http.Connections(str(nginx.cert) if https else True, 5, 5)
    try:
        kept = None
        for _ in range(5):
            answer = connections.get(url, {})
            assert answer.response.read() == data
            (connection,) = connections._mine().values()
            assert kept is None or connection is kept
            kept = connection
    finally:
        connections.close()


def test_spliced_bytes_count_as_received_for_the_stall_guard(nginx: Nginx, tmp_path: Path) -> None:
    """The guard judges a transfer by the bytes its socket delivered. Spliced bytes never pass
    through socket.SocketIO, so they are counted where splice takes them from the socket;
    otherwise a body whose segments take long to write out would look stalled."""
    data = pattern(3 * MiB + 5, 12)
    url = nginx.url(nginx.put(f"{nginx.new_dir()}/m.bin", data))
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)
    guard = stall.Guard(3600, 1, threading.Event())  # registers the watch; never started
    try:
        with guard.watch() as watch:
            blocks, _ = _read_into(nginx, url, fd, len(data))
    finally:
        os.close(fd)
    landed = sum(len(b) for b in blocks if isinstance(b, splice.Landed) and b.spliced)
    assert landed > 0
    assert watch.socket_bytes >= landed


def test_a_file_the_kernel_will_not_splice_into_is_written_the_ordinary_way(
    nginx: Nginx, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``splice`` into a file opened for appending is refused (EINVAL) by the kernel, as on a
    filesystem without splice support: the bytes already in the pipe and the rest of the body
    are written with ``pwrite``, and splicing is off for the rest of the process."""
    monkeypatch.setattr(splice, "_available", True)
    data = pattern(3 * MiB + 1, 11)
    url = nginx.url(nginx.put(f"{nginx.new_dir()}/m.bin", data))
    target = tmp_path / "f"
    fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        blocks, _ = _read_into(nginx, url, fd, len(data))
    finally:
        os.close(fd)
    assert target.read_bytes() == data  # appended in order: the offsets were the right ones
    assert sum(len(b) for b in blocks) == len(data)
    assert not splice.enabled()
