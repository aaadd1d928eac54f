"""The transfer engine's correctness, end to end against a real S3 server (moto) on 127.0.0.1.

Each test runs the KServe entrypoint as a child process with a small chunk size, so that files
around the chunk boundaries are fetched as concurrent ranged requests and reassembled with
``pwrite``; a counting, fault-injecting proxy between the tool and the server shows which
requests were made and breaks some of them (5xx, 429 with Retry-After, resets, cut and slow
bodies). A server that lies about a file's size or content must be caught: exit 1 and nothing
visible in the destination. Nothing here measures time (see ``scripts/bench``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import clean_env, entrypoint, model_files, pattern, tree_digest
from tests.servers.proxy import CountingProxy, Fault, RequestRecord
from tests.servers.s3 import S3Server, s3_server

__all__ = ["s3_server"]  # the session fixture, imported so that pytest finds it

CHUNK = 64 * 1024
#: Sizes around the chunk boundaries, and a file of many chunks with a short tail.
SIZES = {
    "empty.bin": 0,
    "one.bin": 1,
    "below.bin": CHUNK - 1,
    "exact.bin": CHUNK,
    "above.bin": CHUNK + 1,
    "many.bin": 10 * CHUNK + 7,
}


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[CountingProxy]:
    with CountingProxy(s3_server.endpoint) as running:
        yield running


def tool_env(server: S3Server, proxy: CountingProxy, **extra: str) -> dict[str, str]:
    """The child's environment: S3 through the proxy, small chunks, a few workers."""
    return clean_env(
        server.env(proxy.url),
        STORAGE_INITIALIZER_CHUNK_SIZE=str(CHUNK),
        STORAGE_INITIALIZER_WORKERS="4",
        AWS_EC2_METADATA_DISABLED="true",
        **extra,
    )


def upload(server: S3Server, files: dict[str, bytes]) -> str:
    bucket = server.new_bucket({f"model/{name}": data for name, data in files.items()})
    return f"s3://{bucket}/model"


def digests(files: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def gets(proxy: CountingProxy, name: str) -> list[RequestRecord]:
    return [r for r in proxy.requests if r.method == "GET" and r.path.endswith("/" + name)]


def test_ranged_chunks_reassemble_byte_identically(
    s3_server: S3Server, proxy: CountingProxy, tmp: Path
) -> None:
    files = {name: pattern(size, seed) for seed, (name, size) in enumerate(SIZES.items())}
    uri = upload(s3_server, files)
    dest = tmp / "dest"
    result = entrypoint(uri, dest, env=tool_env(s3_server, proxy))
    assert result.returncode == 0, result.describe()
    assert tree_digest(dest) == digests(files)
    # Files up to one chunk are one plain GET; larger ones one ranged GET per chunk.
    for name in ("one.bin", "below.bin", "exact.bin"):
        requests = gets(proxy, name)
        assert len(requests) == 1 and requests[0].range is None, requests
    ranges = sorted(r.range or "" for r in gets(proxy, "above.bin"))
    assert ranges == [f"bytes=0-{CHUNK - 1}", f"bytes={CHUNK}-{CHUNK}"]
    many = gets(proxy, "many.bin")
    assert len(many) == 11
    assert all(r.range for r in many)
    assert f"bytes={10 * CHUNK}-{10 * CHUNK + 6}" in {r.range for r in many}


def test_faulty_server_still_yields_identical_files(
    s3_server: S3Server, proxy: CountingProxy, tmp: Path
) -> None:
    """500s, connection resets, bodies cut short and slow answers on a fraction of the GETs."""
    files = {f"shard-{i}.bin": pattern(6 * CHUNK + 100 * i, 10 + i) for i in range(4)}
    files["config.json"] = b'{"hidden_size": 8}'
    uri = upload(s3_server, files)
    faults = [
        Fault(status=500, method="GET", path_contains="/model/", probability=0.15, seed=1),
        Fault(kind="drop", method="GET", path_contains="/model/", probability=0.1, seed=2),
        Fault(
            kind="truncate",
            method="GET",
            path_contains="/model/",
            probability=0.15,
            truncate_fraction=0.4,
            seed=3,
        ),
        Fault(kind="delay", delay=0.2, method="GET", path_contains="/model/", probability=0.1),
    ]
    proxy.set_faults(*faults)
    dest = tmp / "dest"
    result = entrypoint(uri, dest, env=tool_env(s3_server, proxy, STORAGE_INITIALIZER_RETRIES="12"))
    assert result.returncode == 0, result.describe()
    assert tree_digest(dest) == digests(files)
    assert sum(f.hits for f in faults) > 0, "no fault was injected: the test proves nothing"
    # Every broken request was followed by another one.
    assert proxy.count(method="GET", path_contains="/model/") > len(files)


def test_429_with_retry_after_is_retried(
    s3_server: S3Server, proxy: CountingProxy, tmp: Path
) -> None:
    files = {"weights.bin": pattern(3 * CHUNK + 5, 7)}
    uri = upload(s3_server, files)
    throttle = Fault(
        status=429,
        headers={"Retry-After": "1", "Content-Type": "application/xml"},
        body=b"<Error><Code>SlowDown</Code><Message>slow down</Message></Error>",
        method="GET",
        path_contains="/weights.bin",
        times=2,
    )
    proxy.set_faults(throttle)
    dest = tmp / "dest"
    result = entrypoint(uri, dest, env=tool_env(s3_server, proxy, S3_MAX_ATTEMPTS="1"))
    assert result.returncode == 0, result.describe()
    assert throttle.hits == 2
    assert tree_digest(dest) == digests(files)


def _assert_nothing_visible(dest: Path) -> None:
    """No model file in the destination (our hidden state directory does not count)."""
    if dest.exists():
        assert model_files(dest) == {}


def test_server_lying_about_content_is_caught(
    s3_server: S3Server, proxy: CountingProxy, tmp: Path
) -> None:
    """Same length, other bytes, on every GET of one file: the MD5 of the ETag catches it."""
    good = pattern(1000, 1)
    files = {"config.json": b"{}", "weights.bin": good}
    uri = upload(s3_server, files)
    liar = Fault(
        status=200,
        body=pattern(1000, 2),
        headers={"Content-Type": "application/octet-stream"},
        method="GET",
        path_contains="/weights.bin",
    )
    proxy.set_faults(liar)
    dest = tmp / "dest"
    result = entrypoint(uri, dest, env=tool_env(s3_server, proxy))
    assert result.returncode == 1, result.describe()
    assert "weights.bin" in result.last_line and "verification" in result.last_line
    assert liar.hits >= 2  # fetched once more before giving up
    _assert_nothing_visible(dest)


def test_server_lying_about_size_is_caught(
    s3_server: S3Server, proxy: CountingProxy, tmp: Path
) -> None:
    """The listing says 1000 bytes, the GET sends 1500."""
    files = {"weights.bin": pattern(1000, 3)}
    uri = upload(s3_server, files)
    proxy.set_faults(
        Fault(status=200, body=pattern(1500, 3), method="GET", path_contains="/weights.bin")
    )
    dest = tmp / "dest"
    result = entrypoint(uri, dest, env=tool_env(s3_server, proxy))
    assert result.returncode == 1, result.describe()
    assert "weights.bin" in result.last_line
    _assert_nothing_visible(dest)


def test_one_corrupted_chunk_of_a_ranged_file_is_caught(
    s3_server: S3Server, proxy: CountingProxy, tmp: Path
) -> None:
    """A 206 with the right Content-Range and length but wrong bytes for one chunk."""
    data = pattern(4 * CHUNK, 5)
    uri = upload(s3_server, {"weights.bin": data})
    wanted = f"bytes={CHUNK}-{2 * CHUNK - 1}"
    liar = Fault(
        status=206,
        body=bytes(CHUNK),
        headers={
            "Content-Range": f"bytes {CHUNK}-{2 * CHUNK - 1}/{len(data)}",
            "Content-Type": "application/octet-stream",
            "ETag": '"' + hashlib.md5(data).hexdigest() + '"',
        },
        method="GET",
        predicate=lambda record: record.range == wanted,
    )
    proxy.set_faults(liar)
    dest = tmp / "dest"
    result = entrypoint(uri, dest, env=tool_env(s3_server, proxy))
    assert result.returncode == 1, result.describe()
    assert "weights.bin" in result.last_line and "verification" in result.last_line
    assert liar.hits >= 2
    _assert_nothing_visible(dest)
