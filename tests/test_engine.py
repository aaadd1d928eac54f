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
from typing import Any

import pytest

from storage_initializer.providers.base import Listing, RemoteFile, Source, fingerprint_of
from tests.helpers import clean_env, entrypoint, model_files, pattern, tree_digest
from tests.servers.proxy import CountingProxy, Fault, RequestRecord
from tests.servers.s3 import S3Server, proxy, s3_server

__all__ = ["proxy", "s3_server"]  # the session fixture, imported so that pytest finds it

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


@pytest.mark.parametrize("sent", [600, 1500], ids=["shorter", "longer"])
def test_server_lying_about_size_is_caught(
    s3_server: S3Server, proxy: CountingProxy, tmp: Path, sent: int
) -> None:
    """The listing says 1000 bytes; every GET sends another length (and other bytes)."""
    files = {"weights.bin": pattern(1000, 3)}
    uri = upload(s3_server, files)
    proxy.set_faults(
        Fault(status=200, body=pattern(sent, 4), method="GET", path_contains="/weights.bin")
    )
    dest = tmp / "dest"
    result = entrypoint(uri, dest, env=tool_env(s3_server, proxy, STORAGE_INITIALIZER_RETRIES="1"))
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


# -- chunked files verified by a CRC: chunks hashed in parallel, combined at the end ----------


class _MemorySource(Source):
    """Files held in memory, read in ranges (optionally with a wrong byte at ``corrupt``)."""

    default_workers = 4

    def __init__(self, files: dict[str, bytes], sums: dict[str, dict[str, str]]) -> None:
        self.files = files
        self.sums = sums
        self.corrupt: int | None = None
        self.reads: list[tuple[str, int, int | None]] = []

    def list(self) -> Listing:
        items = [RemoteFile(n, len(d), self.sums[n], "v1") for n, d in self.files.items()]
        return Listing(items, fingerprint_of(items))

    def read(self, file: RemoteFile, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        self.reads.append((file.path, start, end))
        data = bytearray(self.files[file.path][start:end])
        if self.corrupt is not None and start <= self.corrupt < start + len(data):
            data[self.corrupt - start] ^= 0xFF
        for offset in range(0, len(data), 1000):  # blocks that do not align with chunks
            yield bytes(data[offset : offset + 1000])


def _crc_sums(files: dict[str, bytes], algorithm: str) -> dict[str, dict[str, str]]:
    from storage_initializer import checksums

    sums = {}
    for name, data in files.items():
        hasher = checksums.new_hasher(algorithm)
        hasher.update(data)
        sums[name] = {algorithm: hasher.hexdigest()}
    return sums


def _run_engine(source: _MemorySource, root: Path, chunk: int = 4096) -> Any:
    import threading

    from storage_initializer.engine import Engine
    from storage_initializer.progress import Progress
    from storage_initializer.settings import Settings
    from storage_initializer.store import layout
    from storage_initializer.store.staging import Staging

    entry = layout.direct(root, "k" * 16)
    layout.ensure_state_dir(entry)
    staging = Staging.prepare(entry, "owner", entry.key, "fp")
    engine = Engine(source, Settings(chunk_size=chunk, retries=1), Progress(), threading.Event())
    return engine.run(source.list().files, staging), staging


@pytest.mark.parametrize("algorithm", ["crc32", "crc32c", "crc64nvme"])
def test_chunked_crc_is_combined_from_parallel_chunks(algorithm: str, tmp: Path) -> None:
    chunk = 4096
    files = {
        f"f{size}.bin": pattern(size, size)
        for size in (0, 1, chunk - 1, chunk, chunk + 1, 17 * chunk + 5)
    }
    source = _MemorySource(files, _crc_sums(files, algorithm))
    results, staging = _run_engine(source, tmp / "dest", chunk)
    for name, data in files.items():
        assert (staging.data / name).read_bytes() == data
        assert results[name] == source.sums[name]
    assert sum(1 for path, _s, _e in source.reads if path == f"f{17 * chunk + 5}.bin") == 18


def test_chunked_crc_catches_one_corrupted_byte(tmp: Path) -> None:
    from storage_initializer.errors import IntegrityError

    data = pattern(10 * 4096, 9)
    source = _MemorySource({"w.bin": data}, _crc_sums({"w.bin": data}, "crc32"))
    source.corrupt = 5 * 4096 + 17
    with pytest.raises(IntegrityError, match=r"w\.bin failed verification"):
        _run_engine(source, tmp / "dest")


class _FailingSource(_MemorySource):
    """Fails for good on the chunk holding ``fail_at`` (the download stops there)."""

    fail_at = 0

    def read(self, file: RemoteFile, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        if start <= self.fail_at < (end or len(self.files[file.path])):
            from storage_initializer.errors import SourceError

            raise SourceError("gone")
        yield from super().read(file, start, end)


@pytest.mark.parametrize("tamper", [False, True], ids=["intact", "kept-chunk-tampered"])
def test_chunked_crc_of_a_resumed_file_covers_the_kept_chunks(tmp: Path, tamper: bool) -> None:
    """A second run keeps the chunks on disk, hashes them once and fetches the rest; a kept
    chunk that changed on disk fails verification and the file is fetched again whole."""
    from storage_initializer.errors import SourceError

    chunk = 4096
    data = pattern(8 * chunk + 3, 11)
    sums = _crc_sums({"w.bin": data}, "crc32")
    first = _FailingSource({"w.bin": data}, sums)
    first.fail_at = 7 * chunk + 1
    with pytest.raises(SourceError):
        _run_engine(first, tmp / "dest", chunk)
    staged = next((tmp / "dest").rglob("w.bin"))
    if tamper:
        with open(staged, "r+b") as handle:
            handle.seek(2 * chunk + 5)
            handle.write(b"X")
    second = _MemorySource({"w.bin": data}, sums)
    results, staging = _run_engine(second, tmp / "dest", chunk)
    assert (staging.data / "w.bin").read_bytes() == data
    assert results["w.bin"] == sums["w.bin"]
    if tamper:
        assert len(second.reads) > 9  # the kept chunks were fetched again after the mismatch
    else:
        assert len(second.reads) < 9  # kept chunks were not fetched again


class _CorruptOnce(_MemorySource):
    """Flips the byte at ``corrupt`` of ``target`` the first time a read covers it (only the
    worker reading that range touches ``corrupt``: no other thread can disarm it)."""

    def __init__(self, files: dict[str, bytes], sums: dict[str, dict[str, str]], target: str):
        super().__init__(files, sums)
        self.target = target

    def read(self, file: RemoteFile, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        self.reads.append((file.path, start, end))
        data = bytearray(self.files[file.path][start:end])
        at = self.corrupt
        if file.path == self.target and at is not None and start <= at < start + len(data):
            data[at - start] ^= 0xFF
            self.corrupt = None  # once
        for offset in range(0, len(data), 1000):
            yield bytes(data[offset : offset + 1000])


def test_a_file_failing_verification_is_fetched_again_by_the_workers(tmp: Path) -> None:
    """Workers take their tasks themselves (engine_plan.Planner._work): a file that fails
    verification puts all its chunks back, and the workers that found nothing left to do
    wait for them instead of ending. The bad file is the last task, so the other workers are
    idle when its chunks come back; every file ends verified and byte-identical."""
    small = {f"small-{index:03d}.bin": pattern(100 + index, index) for index in range(40)}
    big = pattern(12 * 4096 + 5, 99)
    files = {**small, "zz-big.bin": big}
    source = _CorruptOnce(files, _crc_sums(files, "sha256"), "zz-big.bin")
    source.corrupt = 5 * 4096 + 17
    results, staging = _run_engine(source, tmp / "root")
    assert set(results) == set(files)
    for name, data in files.items():
        assert (staging.data / name).read_bytes() == data, name
        assert results[name]["sha256"] == hashlib.sha256(data).hexdigest()
    big_reads = [(start, end) for path, start, end in source.reads if path == "zz-big.bin"]
    assert sorted(set(big_reads)) == sorted(big_reads[:13]) and len(set(big_reads)) == 13
    assert len(big_reads) == 26  # every chunk twice: the whole file fetched again
    others = [path for path, _, _ in source.reads if path != "zz-big.bin"]
    assert sorted(others) == sorted(small)  # the small files once each
