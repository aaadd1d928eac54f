"""The lean GCS media GET (``providers/gcs_lean.py``) against a real fake-gcs-server, with the
counting proxy (faults, headers) and a TCP counter (connections) in front of it.

What is checked: the lean path is the one taken by default (our User-Agent, not requests'),
``STORAGE_INITIALIZER_GCS_LEAN=false`` and an HTTP(S) proxy turn it off, one connection per
worker carries many GETs, gzip objects stay on the requests path, errors read the same on both
paths, an expired token is refreshed once for many concurrent reads, a 401 refreshes and
retries once, and a cut body resumes.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from storage_initializer.errors import (
    AccessDeniedError,
    InitializerError,
    SourceChangedError,
    TransientError,
)
from storage_initializer.providers import gcs_lean
from storage_initializer.providers.httpcommon import USER_AGENT
from tests.helpers import payload, read_all
from tests.servers.gcs import GcsServer, TokenServer, gcs_server, service_account_key
from tests.servers.proxy import CountingProxy, Fault, TcpCounter
from tests.test_gcs import gcs_env, media_path, proxy, source_for, via_proxy

__all__ = ["gcs_env", "gcs_server", "proxy", "via_proxy"]  # fixtures, for pytest to find

MiB = 1 << 20


def user_agent(record: Any) -> str:
    return {k.lower(): v for k, v in record.headers.items()}.get("user-agent", "")


def authorization(record: Any) -> str | None:
    return {k.lower(): v for k, v in record.headers.items()}.get("authorization")


@pytest.fixture
def keyed(
    gcs_env: GcsServer, via_proxy: CountingProxy, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[TokenServer]:
    """Service account credentials whose token comes from a local token server, the requests
    going through the counting proxy (no emulator: the client is not anonymous)."""
    tokens = TokenServer()
    keyfile = tmp_path / "key.json"
    service_account_key(keyfile, tokens.url)
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    monkeypatch.setenv("API_ENDPOINT_OVERRIDE", via_proxy.url)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(keyfile))
    try:
        yield tokens
    finally:
        tokens.close()


# --------------------------------------------------------------------------- which path


def test_lean_get_is_the_default_and_pinned(gcs_env: GcsServer, via_proxy: CountingProxy) -> None:
    data = payload(300_000, 3)
    bucket = gcs_env.new_bucket({"m/a": data})
    source = source_for(f"gs://{bucket}/m")
    assert source._lean is not None
    (file,) = source.list().files
    assert read_all(source, file, 1000, 200_000) == data[1000:200_000]
    assert read_all(source, file) == data
    gets = via_proxy.select(method="GET", path_contains=media_path(bucket, "m/a"))
    assert [g.range for g in gets] == ["bytes=1000-199999", None]
    assert all(g.query == f"alt=media&generation={file.version}" for g in gets), gets
    assert [user_agent(g) for g in gets] == [USER_AGENT] * 2  # not python-requests
    assert all(authorization(g) is None for g in gets)  # the emulator: anonymous


def test_lean_blocks_are_the_read_size(gcs_env: GcsServer) -> None:
    data = payload(MiB + 5, 4)
    bucket = gcs_env.new_bucket({"m/a": data})
    source = source_for(f"gs://{bucket}/m", read_size=64 * 1024)
    (file,) = source.list().files
    sizes = [len(block) for block in source.read(file)]
    assert max(sizes) == 64 * 1024
    assert sum(sizes) == len(data)


def test_switched_off_by_the_environment(
    gcs_env: GcsServer, via_proxy: CountingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(gcs_lean.ENV, "false")
    bucket = gcs_env.new_bucket({"m/a": b"abc"})
    source = source_for(f"gs://{bucket}/m")
    assert source._lean is None
    (file,) = source.list().files
    assert read_all(source, file) == b"abc"
    (get,) = via_proxy.select(method="GET", path_contains=media_path(bucket, "m/a"))
    assert user_agent(get).startswith("python-requests/")
    assert f"generation={file.version}" in get.query


@pytest.mark.parametrize("no_proxy", ["", "127.0.0.1"])
def test_not_used_behind_an_http_proxy(
    gcs_env: GcsServer, monkeypatch: pytest.MonkeyPatch, no_proxy: str
) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", no_proxy)
    source = source_for("gs://bucket/m")
    # The lean path speaks to the origin directly: behind a proxy requests carries the GETs.
    assert (source._lean is None) == (no_proxy == "")


def test_one_connection_per_worker_carries_every_get(
    gcs_env: GcsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {f"m/f{i}": payload(1000 + i, i) for i in range(8)}
    bucket = gcs_env.new_bucket(files)
    port = int(gcs_env.endpoint.rpartition(":")[2])
    with TcpCounter(port) as counter:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{counter.port}")
        source = source_for(f"gs://{bucket}/m")
        listed = source.list().files
        for _ in range(2):
            for file in listed:
                assert read_all(source, file) == files["m/" + file.path]
        source.close()
    # One for the listing (requests' pool), one for the 16 GETs of this thread.
    assert counter.connections == 2


def test_gzip_objects_stay_on_the_requests_path(
    gcs_env: GcsServer, via_proxy: CountingProxy
) -> None:
    import gzip

    text = b"vocabulary\n" * 3000
    bucket = gcs_env.new_bucket({"m/plain": b"plain"})
    gcs_env.upload(bucket, {"m/vocab.txt": gzip.compress(text)}, content_encoding="gzip")
    source = source_for(f"gs://{bucket}/m")
    found = {f.path: f for f in source.list().files}
    assert read_all(source, found["vocab.txt"]) == text
    assert read_all(source, found["vocab.txt"], 100) == text[100:]
    assert read_all(source, found["plain"]) == b"plain"
    agents = {
        name: {user_agent(g) for g in via_proxy.select(path_contains=media_path(bucket, name))}
        for name in ("m/vocab.txt", "m/plain")
    }
    assert all(a.startswith("python-requests/") for a in agents["m/vocab.txt"]), agents
    assert agents["m/plain"] == {USER_AGENT}


# --------------------------------------------------------------------------- errors


def _failure(
    bucket: str, proxy: CountingProxy, monkeypatch: pytest.MonkeyPatch, lean: bool, fault: Fault
) -> InitializerError:
    monkeypatch.setenv(gcs_lean.ENV, "true" if lean else "false")
    source = source_for(f"gs://{bucket}/m")
    assert (source._lean is not None) == lean
    (file,) = source.list().files
    proxy.set_faults(fault)
    try:
        with pytest.raises(InitializerError) as caught:
            read_all(source, file)
    finally:
        proxy.clear_faults()
    return caught.value


@pytest.mark.parametrize(
    "status, error",
    [
        (503, TransientError),
        (429, TransientError),
        (403, AccessDeniedError),
        (404, SourceChangedError),
    ],
)
def test_error_answers_read_as_on_the_requests_path(
    gcs_env: GcsServer,
    via_proxy: CountingProxy,
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    error: type[InitializerError],
) -> None:
    bucket = gcs_env.new_bucket({"m/a": b"abc"})
    body = json.dumps({"error": {"code": status, "message": "said the server"}}).encode()
    fault = Fault(
        status=status,
        body=body,
        headers={"Content-Type": "application/json", "Retry-After": "7"},
        path_contains="/download/",
    )
    lean, sdk = (_failure(bucket, via_proxy, monkeypatch, on, fault) for on in (True, False))
    assert (type(lean), type(sdk)) == (error, error)
    # The same words, the same hint, the same Retry-After on both paths.
    assert lean.describe() == sdk.describe()
    assert "said the server" in lean.describe()
    if error is TransientError:
        assert lean.retry_after == sdk.retry_after == 7.0


def test_replaced_object_is_a_source_change(gcs_env: GcsServer) -> None:
    bucket = gcs_env.new_bucket({"m/a": b"old"})
    source = source_for(f"gs://{bucket}/m")
    assert source._lean is not None
    (file,) = source.list().files
    gcs_env.upload(bucket, {"m/a": b"new!"})
    with pytest.raises(SourceChangedError, match=f"generation {file.version}"):
        read_all(source, file)


def test_cut_body_is_transient_and_resumes(gcs_env: GcsServer, via_proxy: CountingProxy) -> None:
    data = payload(3 * MiB, 9)
    bucket = gcs_env.new_bucket({"m/a": data})
    source = source_for(f"gs://{bucket}/m")
    (file,) = source.list().files
    via_proxy.set_faults(Fault(kind="truncate", truncate_fraction=0.5, method="GET", times=1))
    received = bytearray()
    with pytest.raises(TransientError, match="broke off"):
        for block in source.read(file):
            received += block
    assert 0 < len(received) < len(data)
    assert read_all(source, file, len(received)) == data[len(received) :]
    resumed = via_proxy.select(method="GET", path_contains=media_path(bucket, "m/a"))[-1]
    assert resumed.range == f"bytes={len(received)}-"


def test_connection_refused_is_transient(gcs_env: GcsServer, via_proxy: CountingProxy) -> None:
    bucket = gcs_env.new_bucket({"m/a": b"abc"})
    source = source_for(f"gs://{bucket}/m")
    (file,) = source.list().files
    via_proxy.stop()  # the endpoint goes away between the listing and the read
    with pytest.raises(TransientError, match=r"connection to .* failed"):
        read_all(source, file)


# --------------------------------------------------------------------------- credentials


def test_token_is_applied_and_not_refreshed_per_request(
    keyed: TokenServer, gcs_env: GcsServer, via_proxy: CountingProxy
) -> None:
    files = {f"m/f{i}": payload(100 + i, i) for i in range(6)}
    bucket = gcs_env.new_bucket(files)
    source = source_for(f"gs://{bucket}/m")
    assert source._lean is not None
    listed = source.list().files
    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(lambda f: read_all(source, f), listed)) == [
            files["m/" + f.path] for f in listed
        ]
    assert len(keyed.grants) == 1  # the listing's token, reused by every lean GET
    gets = via_proxy.select(method="GET", path_contains="/download/")
    assert len(gets) == 6
    assert {authorization(g) for g in gets} == {"Bearer tok-local-1234"}
    assert {user_agent(g) for g in gets} == {USER_AGENT}


def test_an_expired_token_is_refreshed_once_for_many_concurrent_reads(
    keyed: TokenServer, gcs_env: GcsServer, via_proxy: CountingProxy
) -> None:
    files = {f"m/f{i}": payload(100 + i, i) for i in range(16)}
    bucket = gcs_env.new_bucket(files)
    source = source_for(f"gs://{bucket}/m")
    listed = source.list().files
    assert len(keyed.grants) == 1
    credentials = source.session.credentials
    credentials.expiry = datetime.datetime.now(datetime.UTC).replace(
        tzinfo=None
    ) - datetime.timedelta(minutes=1)
    assert not credentials.valid
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda f: read_all(source, f), listed))
    assert len(keyed.grants) == 2  # one refresh, under the lock, for 16 workers
    assert credentials.valid
    gets = via_proxy.select(method="GET", path_contains="/download/")
    assert {user_agent(g) for g in gets} == {USER_AGENT}


def test_a_401_refreshes_the_token_and_retries_once(
    keyed: TokenServer, gcs_env: GcsServer, via_proxy: CountingProxy
) -> None:
    bucket = gcs_env.new_bucket({"m/a": b"abc"})
    source = source_for(f"gs://{bucket}/m")
    (file,) = source.list().files
    via_proxy.set_faults(Fault(status=401, path_contains="/download/", times=1))
    assert read_all(source, file) == b"abc"
    assert len(keyed.grants) == 2  # the listing's token, then the refresh after the 401
    gets = via_proxy.select(method="GET", path_contains="/download/")
    assert [g.status for g in gets] == [401, 200]
    assert all(authorization(g) == "Bearer tok-local-1234" for g in gets)
    assert {user_agent(g) for g in gets} == {USER_AGENT}  # the lean path did this


def test_a_401_after_the_refresh_is_access_denied_naming_the_identity(
    keyed: TokenServer, gcs_env: GcsServer, via_proxy: CountingProxy
) -> None:
    bucket = gcs_env.new_bucket({"m/a": b"abc"})
    source = source_for(f"gs://{bucket}/m")
    (file,) = source.list().files
    via_proxy.set_faults(Fault(status=401, path_contains="/download/"))
    with pytest.raises(AccessDeniedError, match="HTTP 401") as caught:
        read_all(source, file)
    assert "GOOGLE_APPLICATION_CREDENTIALS" in caught.value.describe()
    assert "objectViewer" in caught.value.describe()
    assert len(keyed.grants) == 2  # refreshed once, not in a loop
    gets = via_proxy.select(method="GET", path_contains="/download/")
    assert [user_agent(g) for g in gets] == [USER_AGENT] * 2


def test_anonymous_401_is_not_retried(gcs_env: GcsServer, via_proxy: CountingProxy) -> None:
    bucket = gcs_env.new_bucket({"m/a": b"abc"})
    source = source_for(f"gs://{bucket}/m")
    (file,) = source.list().files
    via_proxy.set_faults(Fault(status=401, path_contains="/download/"))
    with pytest.raises(AccessDeniedError, match="HTTP 401"):
        read_all(source, file)
    assert via_proxy.count(method="GET", path_contains="/download/") == 1
