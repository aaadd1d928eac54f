"""The provider contract, run against every backend of ``conftest.BACKENDS``.

Provider-level tests open the provider in process (``open_source(parse(uri), Settings())``)
with the backend's environment; end-to-end tests run ``storage-initializer pull`` as a child
process. Faults come from the counting proxy in front of each server, aimed at content reads
(``Published.reads``) or at every request. Assertions are on error *types*, exit codes
and the last line naming the URI, not on message wording.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage_initializer.errors import (
    AccessDeniedError,
    NotFoundError,
    SourceChangedError,
    TransientError,
)
from storage_initializer.providers import open_source
from storage_initializer.providers.base import RemoteFile, Source
from storage_initializer.settings import Settings
from storage_initializer.uri import parse
from tests.conformance.backends import Backend, Published
from tests.helpers import clean_env, cli, digests, payload, read_all, tree_digest
from tests.servers.proxy import Fault, RequestRecord

#: Big enough for several proxy blocks (64 KiB) and a cut mid-body; small enough to be quick.
BIG = 300_000
#: Short retries for the end-to-end pulls: giving up, when it happens, is quick.
PULL_ENV = {"STORAGE_INITIALIZER_RETRIES": "2"}
#: Small chunks and one worker: a file's chunks are read in order, one at a time.
CHUNKED = {"STORAGE_INITIALIZER_CHUNK_SIZE": "64KiB", "STORAGE_INITIALIZER_WORKERS": "1"}


def model(backend: Backend) -> dict[str, bytes]:
    """The contract's file set: nested paths, an empty-ish and a big file (one file where a
    URI names one file)."""
    big = {"weights/model.bin": payload(BIG, 1)}
    if backend.one_file:
        return {"model.bin": big["weights/model.bin"]}
    return {"config.json": b'{"conformance": true}', **big, "weights/extra/tok.txt": b"abc"}


def big_path(published: Published) -> str:
    return max(published.files, key=lambda p: len(published.files[p]))


@pytest.fixture
def opened(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Published, Source]]:
    """The contract's file set published, and our provider for it, opened in process."""
    published = backend.publish(model(backend))
    backend.use(monkeypatch)
    source = open_source(parse(published.uri), Settings())
    try:
        yield published, source
    finally:
        source.close()


def by_path(source: Source) -> dict[str, RemoteFile]:
    return {f.path: f for f in source.list().files}


def pull(backend: Backend, uri: str, dest: Path):  # -> tests.helpers.Run
    return cli("pull", uri, dest, env=clean_env(backend.env, **PULL_ENV))


def known_bug(request: pytest.FixtureRequest, backend: Backend, clause: str) -> None:
    """Run the test as a strict xfail where ``backend`` is known to break ``clause``."""
    if clause in backend.known_bugs:
        reason = f"{backend.name}: {backend.known_bugs[clause]}"
        request.applymarker(pytest.mark.xfail(reason=reason, strict=True))


def skip_if_content_in_listing(backend: Backend) -> None:
    if backend.content_in_listing:
        pytest.skip(f"{backend.name}: {backend.content_in_listing}")


def skip_unless_answered(backend: Backend, status: int) -> None:
    if status in backend.never_answers:
        pytest.skip(f"{backend.name}: {backend.never_answers[status]}")


# -- listing and reads -----------------------------------------------------------------------


def test_listing_has_paths_sizes_and_a_version(
    backend: Backend, opened: tuple[Published, Source]
) -> None:
    published, source = opened
    listing = source.list()
    assert {f.path: f.size for f in listing.files} == {
        p: len(d) for p, d in published.files.items()
    }
    for file in listing.files:
        assert file.checksums or file.version, f"{file.path}: neither checksum nor version"
    assert listing.fingerprint


def test_ranged_reads_return_exactly_the_bytes(
    backend: Backend, opened: tuple[Published, Source]
) -> None:
    published, source = opened
    path = big_path(published)
    data = published.files[path]
    file = by_path(source)[path]  # listing decides ranges where the server must say (HTTP)
    if not source.supports_ranges:
        pytest.skip(f"{backend.name}: the provider does not read ranges")
    for start, end in [(0, 1), (1, 1000), (65_535, 131_073), (BIG - 1, None), (1000, None)]:
        assert read_all(source, file, start, end) == data[start:end], (start, end)
    assert read_all(source, file, chunk=100_003) == data
    assert read_all(source, file) == data


# -- broken transfers ------------------------------------------------------------------------


def test_truncated_body_is_a_transient_error(
    backend: Backend, opened: tuple[Published, Source]
) -> None:
    """Every content GET cut at half its body: whatever the client library retries itself, the
    provider ends with a TransientError (the engine's cue to resume), never short data."""
    skip_if_content_in_listing(backend)
    published, source = opened
    file = by_path(source)[big_path(published)]
    backend.proxy.set_faults(Fault(kind="truncate", method="GET", predicate=published.reads))
    with pytest.raises(TransientError):
        read_all(source, file)
    assert backend.proxy.count(faulted=True) >= 1


def test_truncated_body_is_resumed_by_the_pull(backend: Backend, tmp_path: Path) -> None:
    """One content GET cut at half its body: the pull succeeds with the right bytes; the proxy
    counts the cut request, the retry, and every byte served once (plus the cut part again
    where the provider restarts the file instead of resuming it)."""
    skip_if_content_in_listing(backend)
    published = backend.publish(model(backend))
    backend.proxy.set_faults(
        Fault(
            kind="truncate",
            method="GET",
            predicate=published.reads_file(big_path(published)),
            times=1,
        )
    )
    result = pull(backend, published.uri, tmp_path / "dest")
    assert result.returncode == 0, result.describe()
    assert tree_digest(tmp_path / "dest") == digests(published.files)
    cut = backend.proxy.select(method="GET", faulted=True)
    assert len(cut) == 1 and cut[0].bytes < BIG
    served = sum(r.bytes for r in backend.proxy.select(method="GET") if published.reads(r))
    total = sum(map(len, published.files.values()))
    # Resumed from the cut (total) or restarted (total + the cut part), never more.
    assert total <= served <= total + cut[0].bytes, (served, total)
    big = published.reads_file(big_path(published))
    assert len([r for r in backend.proxy.select(method="GET") if big(r)]) >= 2


# -- error mapping ---------------------------------------------------------------------------


def test_missing_source_is_not_found(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    published = backend.publish(model(backend))
    missing = backend.missing_uri(published)
    backend.use(monkeypatch)
    source = open_source(parse(missing), Settings())
    try:
        with pytest.raises(NotFoundError):
            source.list()
    finally:
        source.close()


def test_missing_source_fails_the_pull_naming_the_uri(backend: Backend, tmp_path: Path) -> None:
    missing = backend.missing_uri(backend.publish(model(backend)))
    result = pull(backend, missing, tmp_path / "dest")
    assert result.returncode == 1, result.describe()
    assert missing in result.last_line, result.last_line


@pytest.mark.parametrize("status", [401, 403])
def test_denied_is_access_denied(
    backend: Backend, monkeypatch: pytest.MonkeyPatch, status: int
) -> None:
    """Every request answered ``status`` in the service's own error format."""
    skip_unless_answered(backend, status)
    published = backend.publish(model(backend))
    backend.use(monkeypatch)
    backend.proxy.set_faults(backend.error(status))
    source = open_source(parse(published.uri), Settings())
    try:
        with pytest.raises(AccessDeniedError):
            source.list()
    finally:
        source.close()
    assert backend.proxy.count(faulted=True) >= 1


@pytest.mark.parametrize("status", [401, 403])
def test_denied_read_fails_the_pull_naming_the_uri(
    backend: Backend, tmp_path: Path, status: int
) -> None:
    """The listing is answered, content reads are denied: exit 1, nothing retried in vain
    (each file asked at most once per SDK attempt), the last line names the URI."""
    skip_unless_answered(backend, status)
    published = backend.publish(model(backend))
    backend.proxy.set_faults(backend.error(status, method="GET", predicate=published.reads))
    result = pull(backend, published.uri, tmp_path / "dest")
    assert result.returncode == 1, result.describe()
    assert published.uri in result.last_line, result.last_line
    per_path: dict[str, int] = {}
    for record in backend.proxy.select(faulted=True):
        asked = f"{record.path}?{record.query}"
        per_path[asked] = per_path.get(asked, 0) + 1
    assert per_path and max(per_path.values()) <= backend.sdk_attempts, per_path


def test_server_that_refuses_is_access_denied(
    backend: Backend, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The server itself refuses (a private location, a wrong key; no proxy fault): the
    provider raises AccessDeniedError, and the pull exits 1 naming the URI."""
    if backend.cannot_deny:
        pytest.skip(f"{backend.name}: {backend.cannot_deny}")
    uri, env = backend.denied(model(backend))
    result = cli("pull", uri, tmp_path / "dest", env=clean_env(env, **PULL_ENV))
    assert result.returncode == 1, result.describe()
    assert uri in result.last_line, result.last_line
    backend.use(monkeypatch)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    source = open_source(parse(uri), Settings())
    try:
        with pytest.raises(AccessDeniedError):
            source.list()
    finally:
        source.close()
    assert backend.proxy.select(status=401) or backend.proxy.select(status=403)


def test_throttled_read_is_transient_with_retry_after(
    backend: Backend, opened: tuple[Published, Source], request: pytest.FixtureRequest
) -> None:
    known_bug(request, backend, "retry-after")
    skip_if_content_in_listing(backend)
    published, source = opened
    file = by_path(source)[big_path(published)]
    backend.proxy.set_faults(
        backend.error(429, retry_after="3", method="GET", predicate=published.reads)
    )
    with pytest.raises(TransientError) as caught:
        read_all(source, file)
    assert caught.value.retry_after == 3.0


def test_throttled_read_is_retried_after_retry_after(
    backend: Backend, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The first content GET(s) answered 429 with ``Retry-After: 1``: the pull succeeds, the
    proxy saw the throttled request and the retry, and the engine's wait is the server's."""
    known_bug(request, backend, "retry-after")
    published = backend.publish(model(backend))
    backend.proxy.set_faults(
        backend.error(
            429,
            retry_after="1",
            method="GET",
            predicate=published.reads_file(big_path(published)),
            times=backend.sdk_attempts,
        )
    )
    result = pull(backend, published.uri, tmp_path / "dest")
    assert result.returncode == 0, result.describe()
    assert tree_digest(tmp_path / "dest") == digests(published.files)
    big = published.reads_file(big_path(published))
    again = [r for r in backend.proxy.select(method="GET") if big(r) and r.status in (200, 206)]
    assert len(backend.proxy.select(faulted=True)) == backend.sdk_attempts
    assert again, "the throttled read was not retried"
    waits = [float(w) for w in re.findall(r"retrying .* in (\d+\.\d)s", result.stderr)]
    assert waits and min(waits) >= 1.0, result.stderr


# -- version pinning -------------------------------------------------------------------------


def test_read_after_replacement_is_pinned_to_the_listed_version(
    backend: Backend, opened: tuple[Published, Source]
) -> None:
    """Listed, read once, replaced at the origin (same size), read again: the provider refuses
    with SourceChangedError, or (a commit-pinned repository) still returns the listed bytes;
    never the new version's."""
    published, source = opened
    path = big_path(published)
    old = published.files[path]
    file = by_path(source)[path]
    assert read_all(source, file, 0, 10) == old[:10]
    if backend.pins not in ("refuses", "commit"):
        pytest.skip(f"{backend.name}: {backend.pins}")
    published.replace(path, payload(len(old), 2))
    if backend.pins == "commit":
        assert read_all(source, file, 10, 20) == old[10:20]
        return
    with pytest.raises(SourceChangedError):
        read_all(source, file, 10, 20)


def test_file_replaced_between_chunks_ends_as_one_version(backend: Backend, tmp_path: Path) -> None:
    """The big file is read in 64 KiB chunks, one at a time, and replaced at the origin (same
    size) just before its second chunk's read reaches the server: the pull succeeds with one
    whole version of it: the new one (the read is refused, the pull lists again) or,
    commit-pinned, the listed one; never a stitch of the two, which no size check can see."""
    if backend.pins not in ("refuses", "commit"):
        pytest.skip(f"{backend.name}: {backend.pins}")
    skip_if_content_in_listing(backend)
    published = backend.publish(model(backend))
    path = big_path(published)
    new = payload(len(published.files[path]), 3)
    big = published.reads_file(path)
    reads: list[RequestRecord] = []

    def replace_at_second_read(record: RequestRecord) -> bool:
        if record.method == "GET" and big(record):
            reads.append(record)
            if len(reads) == 2:
                published.replace(path, new)
        return False  # never faulted: the request goes on to the changed origin

    backend.proxy.set_faults(Fault(predicate=replace_at_second_read))
    env = clean_env(backend.env, **PULL_ENV, **CHUNKED)
    result = cli("pull", published.uri, tmp_path / "dest", env=env)
    assert result.returncode == 0, result.describe()
    assert len(reads) >= 2, "the file was not read in chunks"
    expected = dict(published.files)
    if backend.pins == "refuses":
        expected[path] = new
    assert tree_digest(tmp_path / "dest") == digests(expected)
