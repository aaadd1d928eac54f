"""The GCS provider against a real fake-gcs-server on 127.0.0.1, with the counting proxy for
faults and request counts, and end to end through ``python -m storage_initializer pull``."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import google_crc32c
import pytest

from storage_initializer import checksums
from storage_initializer.errors import (
    AccessDeniedError,
    NotFoundError,
    SourceChangedError,
    SourceError,
    TransientError,
    UsageError,
)
from storage_initializer.paths import UnsafePathError
from storage_initializer.providers import gcs as gcsmod
from storage_initializer.providers import open_source
from storage_initializer.providers.base import RemoteFile
from storage_initializer.settings import Settings
from storage_initializer.uri import parse
from tests.helpers import listing, paths, payload, pull_command, read_all, tree
from tests.object_store import (
    SIBLINGS,
    MiB,
    child_env,
    clear_env,
    pull_concurrently,
    read_until_broken,
)
from tests.servers.gcs import (
    GcsServer,
    TokenServer,
    gcs_server,
    service_account_key,
)
from tests.servers.process import free_port
from tests.servers.proxy import CountingProxy, Fault

__all__ = ["gcs_server"]  # the fixture, imported so that pytest finds it

BLOCK = gcsmod.BLOCK

#: Variables that would leak from the developer's shell into the provider under test.
_CLEARED_PREFIXES = ("GOOGLE_", "GCLOUD_", "CLOUDSDK_", "STORAGE_", "CA_BUNDLE_", "GCE_")
_CLEARED = (
    "API_ENDPOINT_OVERRIDE",
    "REQUESTS_CA_BUNDLE",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "http_proxy",
    "https_proxy",
    "NO_PROXY",
    "no_proxy",
)


@pytest.fixture
def gcs_env(monkeypatch: pytest.MonkeyPatch, gcs_server: GcsServer) -> GcsServer:
    """A clean process environment pointing at the test server."""
    clear_env(monkeypatch, _CLEARED_PREFIXES, _CLEARED, gcs_server.env())
    return gcs_server


@pytest.fixture
def proxy(gcs_server: GcsServer) -> Iterator[CountingProxy]:
    with CountingProxy(gcs_server.endpoint) as running:
        yield running


@pytest.fixture
def via_proxy(gcs_env: GcsServer, proxy: CountingProxy, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The provider talks to the server through the counting proxy."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    return proxy


def source_for(uri: str, **settings: Any) -> gcsmod.GcsSource:
    source = open_source(parse(uri), Settings(**settings))
    assert isinstance(source, gcsmod.GcsSource)
    return source


def media_path(bucket: str, name: str) -> str:
    """How a media download of ``name`` appears in the proxy's log (the name percent-encoded)."""
    from urllib.parse import quote

    return f"/download/storage/v1/b/{bucket}/o/{quote(name, safe='')}"


def authorization(record: Any) -> str | None:
    """The Authorization header of a request the proxy saw (any case)."""
    found = {k.lower(): v for k, v in record.headers.items()}
    return found.get("authorization")


# --------------------------------------------------------------------------- layout


def test_path_is_a_directory_and_excludes_siblings(gcs_env: GcsServer) -> None:
    bucket = gcs_env.new_bucket(SIBLINGS)
    expected = {"config.json": 2, "shards/00001.bin": 10, "shards/deep/er/x": 3}
    assert paths(f"gs://{bucket}/model") == expected
    assert paths(f"gs://{bucket}/model/") == expected


def test_single_object_is_saved_under_its_basename(gcs_env: GcsServer) -> None:
    bucket = gcs_env.new_bucket({"models/iris/model.joblib": b"joblib", "models/iris/x": b"o"})
    source = source_for(f"gs://{bucket}/models/iris/model.joblib")
    files = source.list().files
    assert [(f.path, f.size) for f in files] == [("model.joblib", 6)]
    assert read_all(source, files[0]) == b"joblib"


def test_directory_wins_over_an_object_of_the_same_name(gcs_env: GcsServer) -> None:
    # The stock initializer lists path/ first and only falls back to the object: keep that.
    bucket = gcs_env.new_bucket({"m": b"object", "m/inner": b"dir"})
    assert paths(f"gs://{bucket}/m") == {"inner": 3}


@pytest.mark.parametrize("suffix", ["", "/"])
def test_bucket_root(gcs_env: GcsServer, suffix: str) -> None:
    bucket = gcs_env.new_bucket({"a": b"1", "d/b": b"22", "d/": b""})
    assert paths(f"gs://{bucket}{suffix}") == {"a": 1, "d/b": 2}


def test_unicode_and_spaces_in_names(gcs_env: GcsServer) -> None:
    files = {"m/ünï cödé/ファイル name.txt": b"unicode", "m/a+b%20c#d?.bin": b"odd"}
    bucket = gcs_env.new_bucket(files)
    source = source_for(f"gs://{bucket}/m")
    found = {f.path: f for f in source.list().files}
    assert set(found) == {"ünï cödé/ファイル name.txt", "a+b%20c#d?.bin"}
    assert read_all(source, found["ünï cödé/ファイル name.txt"]) == b"unicode"
    assert read_all(source, found["a+b%20c#d?.bin"]) == b"odd"


def test_zero_byte_objects_are_kept_and_placeholders_skipped(gcs_env: GcsServer) -> None:
    bucket = gcs_env.new_bucket(
        {"m/": b"", "m/sub/": b"", "m/__init__.py": b"", "m/sub/empty": b"", "m/w": b"w"}
    )
    source = source_for(f"gs://{bucket}/m")
    found = {f.path: f for f in source.list().files}
    assert {p: f.size for p, f in found.items()} == {"__init__.py": 0, "sub/empty": 0, "w": 1}
    assert read_all(source, found["__init__.py"]) == b""


def test_only_placeholders_is_not_found(gcs_env: GcsServer) -> None:
    bucket = gcs_env.new_bucket({"m/": b"", "m/sub/": b""})
    with pytest.raises(NotFoundError, match=f"gs://{bucket}/m"):
        listing(f"gs://{bucket}/m")


def test_listing_spans_several_pages(
    via_proxy: CountingProxy, gcs_env: GcsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gcsmod, "LIST_PAGE_SIZE", 3)
    files = {f"m/f{i:02d}": bytes([i]) for i in range(10)}
    bucket = gcs_env.new_bucket(files)
    assert sorted(paths(f"gs://{bucket}/m")) == sorted(k[2:] for k in files)
    # 10 objects, 3 per page: the provider followed nextPageToken, it did not get one big page.
    assert via_proxy.count(method="GET", path_contains=f"/storage/v1/b/{bucket}/o") >= 4


def test_names_that_climb_out_are_refused(gcs_env: GcsServer) -> None:
    bucket = gcs_env.new_bucket({"m/../../etc/passwd": b"x", "m/ok": b"y"})
    with pytest.raises(UnsafePathError):
        listing(f"gs://{bucket}/m")


def test_names_mapping_to_the_same_path_are_refused(gcs_env: GcsServer) -> None:
    bucket = gcs_env.new_bucket({"m/a//b": b"1", "m/a/b": b"2"})
    with pytest.raises(SourceError, match="both map to"):
        listing(f"gs://{bucket}/m")


def test_object_that_is_also_a_directory_is_refused(gcs_env: GcsServer) -> None:
    bucket = gcs_env.new_bucket({"m/a": b"1", "m/a/b": b"2"})
    with pytest.raises(SourceError, match="both an object and a directory"):
        listing(f"gs://{bucket}/m")


def test_version_is_the_generation_and_fingerprint_follows_content(gcs_env: GcsServer) -> None:
    bucket = gcs_env.new_bucket({"m/a": b"1", "m/b": b"2"})
    first = listing(f"gs://{bucket}/m")
    assert listing(f"gs://{bucket}/m").fingerprint == first.fingerprint
    versions = {f.path: f.version for f in first.files}
    assert versions["a"] == str(gcs_env.blob(bucket, "m/a").generation)
    gcs_env.upload(bucket, {"m/b": b"2"})  # same bytes, new generation
    second = listing(f"gs://{bucket}/m")
    assert second.fingerprint != first.fingerprint
    assert {f.path: f.version for f in second.files}["a"] == versions["a"]


# --------------------------------------------------------------------------- reading

SIZES = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 7]


@pytest.mark.parametrize("size", SIZES)
def test_ranged_reads_reassemble_exactly(gcs_env: GcsServer, size: int) -> None:
    data = payload(size, size)
    bucket = gcs_env.new_bucket({"m/blob.bin": data})
    source = source_for(f"gs://{bucket}/m")
    (file,) = source.list().files
    assert file.size == size
    assert read_all(source, file) == data
    assert read_all(source, file, 0, size) == data
    for chunk in (1, 7, size // 3 + 1, BLOCK - 1, BLOCK, BLOCK + 1):
        if size // chunk > 64:
            continue  # one request per piece: keep the test quick
        pieces = [read_all(source, file, s, min(s + chunk, size)) for s in range(0, size, chunk)]
        assert b"".join(pieces) == data, chunk
    if size:
        assert read_all(source, file, size - 1) == data[-1:]
        assert read_all(source, file, size // 2, None) == data[size // 2 :]
    assert read_all(source, file, size, size) == b""


def test_reads_from_many_threads_share_one_client(gcs_env: GcsServer) -> None:
    data = payload(3 * MiB + 123, 9)
    bucket = gcs_env.new_bucket({"m/big": data})
    source = source_for(f"gs://{bucket}/m")
    (file,) = source.list().files
    chunk = 256 * 1024
    starts = list(range(0, len(data), chunk))
    with ThreadPoolExecutor(16) as pool:
        parts = list(
            pool.map(lambda s: read_all(source, file, s, min(s + chunk, len(data))), starts)
        )
    assert b"".join(parts) == data


def test_blocks_are_bounded(gcs_env: GcsServer) -> None:
    data = payload(3 * BLOCK + 5, 2)
    bucket = gcs_env.new_bucket({"m/big": data})
    source = source_for(f"gs://{bucket}/m")
    (file,) = source.list().files
    sizes = [len(block) for block in source.read(file)]
    assert max(sizes) <= BLOCK
    assert sum(sizes) == len(data)


def test_read_sends_range_only_when_needed_and_pins_the_generation(
    gcs_env: GcsServer, via_proxy: CountingProxy
) -> None:
    data = payload(5000, 3)
    bucket = gcs_env.new_bucket({"m/f": data})
    source = source_for(f"gs://{bucket}/m")
    (file,) = source.list().files
    via_proxy.reset()
    assert read_all(source, file) == data
    assert read_all(source, file, 100, 200) == data[100:200]
    assert read_all(source, file, 4000) == data[4000:]
    gets = via_proxy.select(method="GET", path_contains=media_path(bucket, "m/f"))
    assert [g.range for g in gets] == [None, "bytes=100-199", "bytes=4000-"]
    assert all(f"generation={file.version}" in g.query for g in gets)
    assert all(authorization(g) is None for g in gets)  # anonymous with an emulator


def test_read_cuts_out_the_range_when_the_server_ignores_it(
    gcs_env: GcsServer, via_proxy: CountingProxy
) -> None:
    data = payload(3 * BLOCK + 11, 4)
    bucket = gcs_env.new_bucket({"m/f": data})
    source = source_for(f"gs://{bucket}/m")
    (file,) = source.list().files
    via_proxy.set_faults(Fault(kind="strip", strip_headers=("Range",), method="GET"))
    assert read_all(source, file, BLOCK + 3, 2 * BLOCK + 9) == data[BLOCK + 3 : 2 * BLOCK + 9]
    assert via_proxy.select(method="GET", path_contains="/download/")[-1].status == 200


def test_object_replaced_after_listing_is_a_source_change(gcs_env: GcsServer) -> None:
    """Reads are pinned to the listed generation: a replaced object is SourceChangedError (the
    pull lists again and fetches it whole), never the new generation's bytes."""
    bucket = gcs_env.new_bucket({"m/f": b"old"})
    source = source_for(f"gs://{bucket}/m")
    (file,) = source.list().files
    gcs_env.upload(bucket, {"m/f": b"new!"})
    with pytest.raises(SourceChangedError, match="replaced or deleted after it was listed"):
        read_all(source, file)


def test_read_without_a_handle_finds_the_object(gcs_env: GcsServer) -> None:
    bucket = gcs_env.new_bucket({"m/sub/f": b"dir file", "one.bin": b"single"})
    source = source_for(f"gs://{bucket}/m")
    (listed,) = source.list().files
    rebuilt = RemoteFile(path=listed.path, size=listed.size, checksums=listed.checksums)
    assert read_all(source, rebuilt) == b"dir file"
    single = source_for(f"gs://{bucket}/one.bin")
    (one,) = single.list().files
    assert read_all(single, RemoteFile(path=one.path, size=one.size), 2) == b"ngle"


def test_gzip_encoded_objects_arrive_decompressed(gcs_env: GcsServer) -> None:
    text = b"tokenizer line\n" * 5000
    bucket = gcs_env.new_bucket()
    gcs_env.upload(bucket, {"m/vocab.txt": gzip.compress(text)}, content_encoding="gzip")
    gcs_env.upload(bucket, {"m/plain": b"plain"})
    source = source_for(f"gs://{bucket}/m")
    found = {f.path: f for f in source.list().files}
    transcoded = found["vocab.txt"]
    # The listed size and checksums describe the compressed bytes: none are announced.
    assert transcoded.size is None
    assert transcoded.checksums == {}
    assert read_all(source, transcoded) == text
    assert read_all(source, transcoded, 1000) == text[1000:]  # a retry resuming mid-way
    assert found["plain"].size == 5


# --------------------------------------------------------------------------- checksums


def test_announced_checksums_are_hex_and_match_the_content(gcs_env: GcsServer) -> None:
    files = {"m/a": payload(123_457, 1), "m/empty": b"", "m/b": payload(BLOCK + 1, 2)}
    bucket = gcs_env.new_bucket(files)
    source = source_for(f"gs://{bucket}/m")
    for file in source.list().files:
        data = files["m/" + file.path]
        assert file.checksums["md5"] == hashlib.md5(data).hexdigest()
        assert file.checksums["crc32c"] == google_crc32c.Checksum(data).digest().hex()
        assert checksums.choose(file.checksums) == "crc32c"
        for algorithm, expected in file.checksums.items():
            hasher = checksums.new_hasher(algorithm)
            for block in source.read(file):
                hasher.update(block)
            assert hasher.hexdigest() == expected


def test_base64_checksum_conversion() -> None:
    md5 = hashlib.md5(b"x").digest()
    assert gcsmod._b64_hex(base64.b64encode(md5).decode(), 16) == md5.hex()
    assert gcsmod._b64_hex(base64.b64encode(b"\x00\x00\x00\x01").decode(), 4) == "00000001"
    assert gcsmod._b64_hex(base64.b64encode(b"12345").decode(), 4) is None  # wrong length
    assert gcsmod._b64_hex("not base64!", 4) is None
    assert gcsmod._b64_hex(None, 4) is None


# --------------------------------------------------------------------------- errors


def test_no_such_bucket(gcs_env: GcsServer) -> None:
    with pytest.raises(NotFoundError, match="gs://no-such-bucket-si/model") as caught:
        listing("gs://no-such-bucket-si/model")
    assert "does not exist" in str(caught.value)


def test_nothing_under_the_prefix_names_the_uri(gcs_env: GcsServer) -> None:
    bucket = gcs_env.new_bucket({"other/x": b"1", "model-v2/y": b"2"})
    with pytest.raises(NotFoundError) as caught:
        listing(f"gs://{bucket}/model")
    message = caught.value.describe()
    assert f"gs://{bucket}/model" in message
    assert f"gs://{bucket}/model/" in message  # what was looked at: the directory ...
    assert "no object" in message  # ... and the single object


def test_unreachable_endpoint_fails_fast_naming_it(
    gcs_env: GcsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint)
    began = time.monotonic()
    with pytest.raises(SourceError) as caught:
        listing("gs://bucket/model")
    assert not isinstance(caught.value, TransientError | NotFoundError)
    assert endpoint in str(caught.value)
    assert "gs://bucket/model" in str(caught.value)
    assert "Connection refused" in str(caught.value)
    assert time.monotonic() - began < 10  # a couple of quick retries, not the library's 120 s


def test_unknown_host_is_a_source_error(
    gcs_env: GcsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://no-such-host.invalid:4443")
    with pytest.raises(SourceError, match=r"no-such-host\.invalid") as caught:
        listing("gs://bucket/model")
    assert not isinstance(caught.value, TransientError)


def test_emulator_host_without_scheme(gcs_env: GcsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = gcs_env.new_bucket({"m/a": b"1"})
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_env.endpoint.removeprefix("http://"))
    assert paths(f"gs://{bucket}/m") == {"a": 1}


def test_forbidden_listing_is_access_denied(gcs_env: GcsServer, via_proxy: CountingProxy) -> None:
    bucket = gcs_env.new_bucket({"m/a": b"1"})
    body = json.dumps({"error": {"code": 403, "message": "anonymous caller lacks access"}})
    via_proxy.set_faults(Fault(status=403, body=body.encode(), method="GET"))
    with pytest.raises(AccessDeniedError) as caught:
        listing(f"gs://{bucket}/m")
    message = caught.value.describe()
    assert f"gs://{bucket}/m" in message
    assert "anonymous caller lacks access" in message
    assert "GOOGLE_APPLICATION_CREDENTIALS" in message  # the hint for an anonymous request


def test_forbidden_read_is_access_denied(gcs_env: GcsServer, via_proxy: CountingProxy) -> None:
    bucket = gcs_env.new_bucket({"m/a": b"1"})
    source = source_for(f"gs://{bucket}/m")
    (file,) = source.list().files
    via_proxy.set_faults(Fault(status=401, path_contains="/download/"))
    with pytest.raises(AccessDeniedError, match="HTTP 401"):
        read_all(source, file)


@pytest.mark.parametrize("status", [429, 500, 503])
def test_overloaded_read_is_transient_with_retry_after(
    gcs_env: GcsServer, via_proxy: CountingProxy, status: int
) -> None:
    bucket = gcs_env.new_bucket({"m/a": b"abc"})
    source = source_for(f"gs://{bucket}/m")
    (file,) = source.list().files
    via_proxy.set_faults(
        Fault(status=status, headers={"Retry-After": "7"}, path_contains="/download/", times=1)
    )
    with pytest.raises(TransientError) as caught:
        read_all(source, file)
    assert caught.value.retry_after == 7.0
    assert f"HTTP {status}" in str(caught.value)
    assert read_all(source, file) == b"abc"  # one fault only: the retry the engine makes works


def test_short_listing_outage_is_hidden_by_retries(
    gcs_env: GcsServer, via_proxy: CountingProxy
) -> None:
    bucket = gcs_env.new_bucket({"m/a": b"1"})
    via_proxy.set_faults(Fault(status=503, path_contains="/o", method="GET", times=2))
    assert paths(f"gs://{bucket}/m") == {"a": 1}
    assert via_proxy.count(status=503) == 2


def test_persistent_listing_outage_is_transient(
    gcs_env: GcsServer, via_proxy: CountingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gcsmod, "LIST_RETRY_DEADLINE", 1.0)
    bucket = gcs_env.new_bucket({"m/a": b"1"})
    via_proxy.set_faults(Fault(status=429, path_contains="/o", method="GET"))
    with pytest.raises(TransientError, match=f"gs://{bucket}/m.*429"):
        listing(f"gs://{bucket}/m")
    assert via_proxy.count(status=429) >= 2  # it did retry before giving up


def test_listing_whose_pages_link_back_is_refused(
    gcs_env: GcsServer, via_proxy: CountingProxy
) -> None:
    """A proxy that answers every listing with a page whose nextPageToken is the token it was
    asked for: google-api-core's iterator would follow it for ever, the list growing until the
    pod is killed."""
    bucket = gcs_env.new_bucket({"m/a": b"1"})
    page = {
        "kind": "storage#objects",
        "items": [{"name": "m/a", "size": "1", "generation": "1"}],
        "nextPageToken": "loop",
    }
    # 20 canned pages, then the real server answers the bogus token: old code failed otherwise.
    via_proxy.set_faults(
        Fault(
            status=200,
            body=json.dumps(page).encode(),
            headers={"Content-Type": "application/json"},
            method="GET",
            predicate=lambda record: record.path.endswith(f"/b/{bucket}/o"),
            times=20,
        )
    )
    with pytest.raises(SourceError, match="leads back to a page it sent already") as caught:
        listing(f"gs://{bucket}/m")
    assert "STORAGE_EMULATOR_HOST" in caught.value.describe()
    assert via_proxy.count(method="GET") == 2  # the first page and the one that leads back


def test_body_cut_off_mid_stream_is_transient(gcs_env: GcsServer, via_proxy: CountingProxy) -> None:
    data = payload(3 * BLOCK, 6)
    bucket = gcs_env.new_bucket({"m/big": data})
    source = source_for(f"gs://{bucket}/m")
    (file,) = source.list().files
    via_proxy.set_faults(Fault(kind="truncate", truncate_fraction=0.5, path_contains="/download/"))
    received = read_until_broken(source, file)
    assert len(received) < len(data)
    assert data.startswith(bytes(received))  # what did arrive is right: resumable from there


def test_dropped_connection_is_transient(gcs_env: GcsServer, via_proxy: CountingProxy) -> None:
    bucket = gcs_env.new_bucket({"m/a": b"abc"})
    source = source_for(f"gs://{bucket}/m")
    (file,) = source.list().files
    via_proxy.set_faults(Fault(kind="drop", path_contains="/download/"))
    with pytest.raises(TransientError):
        read_all(source, file)


def test_stalled_read_times_out_as_transient(
    gcs_env: GcsServer, via_proxy: CountingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gcsmod, "READ_TIMEOUT", 0.3)
    bucket = gcs_env.new_bucket({"m/a": b"abc"})
    source = source_for(f"gs://{bucket}/m")
    (file,) = source.list().files
    via_proxy.set_faults(Fault(kind="delay", delay=2.0, path_contains="/download/", times=1))
    with pytest.raises(TransientError):
        read_all(source, file)


# --------------------------------------------------------------------------- credentials


def test_missing_key_file_is_a_usage_error(
    gcs_env: GcsServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    missing = tmp_path / "nope" / "key.json"
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(missing))
    with pytest.raises(UsageError, match=str(missing)):
        source_for("gs://bucket/model")


def test_malformed_key_file_is_a_usage_error(
    gcs_env: GcsServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    keyfile = tmp_path / "key.json"
    keyfile.write_text("this is not json")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(keyfile))
    with pytest.raises(UsageError, match=str(keyfile)) as caught:
        source_for("gs://bucket/model")
    assert "GCS secret" in caught.value.describe()


def test_no_credentials_at_all_is_anonymous(
    gcs_env: GcsServer,
    via_proxy: CountingProxy,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Without a key file or an emulator, Application Default Credentials are looked for (none
    here: no gcloud config, no metadata server) and the client falls back to anonymous."""
    bucket = gcs_env.new_bucket({"m/a": b"1"})
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    monkeypatch.setenv("API_ENDPOINT_OVERRIDE", via_proxy.url)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))
    closed = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("GCE_METADATA_IP", closed)
    monkeypatch.setenv("GCE_METADATA_HOST", closed)
    source = source_for(f"gs://{bucket}/m")
    (file,) = source.list().files
    assert read_all(source, file) == b"1"
    assert via_proxy.requests
    assert all(authorization(r) is None for r in via_proxy.requests)


def _jwt_payload(grant: str) -> str:
    """The claims part of the JWT assertion in a token request body."""
    from urllib.parse import parse_qs

    return parse_qs(grant)["assertion"][0].split(".")[1]


def test_key_file_credentials_sign_every_request(
    gcs_env: GcsServer,
    via_proxy: CountingProxy,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    bucket = gcs_env.new_bucket({"m/a": b"1", "m/b": b"22"})
    tokens = TokenServer()
    try:
        keyfile = tmp_path / "key.json"
        service_account_key(keyfile, tokens.url)
        monkeypatch.delenv("STORAGE_EMULATOR_HOST")
        monkeypatch.setenv("API_ENDPOINT_OVERRIDE", via_proxy.url)
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(keyfile))
        source = source_for(f"gs://{bucket}/m")
        files = source.list().files
        assert [read_all(source, f) for f in sorted(files, key=lambda f: f.path)] == [b"1", b"22"]
    finally:
        tokens.close()
    assert len(tokens.grants) == 1  # one token, reused by every request
    claims = json.loads(base64.urlsafe_b64decode(_jwt_payload(tokens.grants[0]) + "=="))
    assert claims["scope"] == "https://www.googleapis.com/auth/devstorage.read_only"
    assert len(via_proxy.requests) == 3  # one listing, two media GETs: nothing else
    assert [authorization(r) for r in via_proxy.requests] == ["Bearer tok-local-1234"] * 3


def test_denied_with_credentials_names_the_identity(
    gcs_env: GcsServer,
    via_proxy: CountingProxy,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    tokens = TokenServer()
    try:
        keyfile = tmp_path / "key.json"
        service_account_key(keyfile, tokens.url)
        monkeypatch.delenv("STORAGE_EMULATOR_HOST")
        monkeypatch.setenv("API_ENDPOINT_OVERRIDE", via_proxy.url)
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(keyfile))
        via_proxy.set_faults(Fault(status=403, method="GET"))
        with pytest.raises(AccessDeniedError) as caught:
            listing("gs://some-bucket/m")
    finally:
        tokens.close()
    assert str(keyfile) in caught.value.describe()
    assert "objectViewer" in caught.value.describe()


# --------------------------------------------------------------------------- small pieces


def test_default_workers_suits_gcs() -> None:
    assert gcsmod.GcsSource.default_workers == 16
    assert gcsmod.GcsSource.supports_ranges


def test_uri_split_and_emulator_normalisation(monkeypatch: pytest.MonkeyPatch) -> None:
    assert gcsmod.split_gs_uri("gs://b/a/b c/#x?y") == ("b", "a/b c/#x?y")
    assert gcsmod.split_gs_uri("gs://b") == ("b", "")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "localhost:9023")
    assert gcsmod.emulator_endpoint() == "http://localhost:9023"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "https://gcs.local/")
    assert gcsmod.emulator_endpoint() == "https://gcs.local"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "")
    assert gcsmod.emulator_endpoint() is None


def test_a_uri_without_bucket_is_refused(gcs_env: GcsServer) -> None:
    with pytest.raises(UsageError):
        source_for("gs:///model")


# --------------------------------------------------------------------------- end to end


def cli_env(server: GcsServer, endpoint: str | None = None) -> dict[str, str]:
    return child_env(_CLEARED_PREFIXES, _CLEARED, server.env(endpoint))


def test_cli_pull_downloads_the_tree(gcs_server: GcsServer, tmp_path: Path) -> None:
    files = {
        "model/config.json": b'{"a": 1}',
        "model/weights/part-0.bin": payload(2 * MiB + 5, 1),
        "model/empty": b"",
        "model/ünï cödé.txt": b"u",
        "model/": b"",
        "model-v2/not-me": b"no",
    }
    bucket = gcs_server.new_bucket(files)
    dest = tmp_path / "out"
    result = subprocess.run(
        pull_command(f"gs://{bucket}/model", dest),
        env=cli_env(gcs_server),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    expected = {k[len("model/") :]: v for k, v in files.items() if k.startswith("model/")}
    del expected[""]
    assert tree(dest) == expected


def test_cli_pull_single_object(gcs_server: GcsServer, tmp_path: Path) -> None:
    bucket = gcs_server.new_bucket({"models/iris/model.joblib": payload(1000, 3)})
    dest = tmp_path / "out"
    result = subprocess.run(
        pull_command(f"gs://{bucket}/models/iris/model.joblib", dest),
        env=cli_env(gcs_server),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert tree(dest) == {"model.joblib": payload(1000, 3)}


def test_cli_pull_failure_names_the_uri(gcs_server: GcsServer, tmp_path: Path) -> None:
    bucket = gcs_server.new_bucket({"other/x": b"1"})
    result = subprocess.run(
        pull_command(f"gs://{bucket}/model", tmp_path / "out"),
        env=cli_env(gcs_server),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    output = (result.stdout + result.stderr).strip()
    assert f"gs://{bucket}/model" in output.splitlines()[-1]


def test_eight_replicas_download_each_object_once(gcs_server: GcsServer, tmp_path: Path) -> None:
    files = {f"model/shard-{i}.bin": payload(MiB + i * 1000, i) for i in range(6)}
    files["model/config.json"] = b"{}"
    bucket = gcs_server.new_bucket(files)
    dest = tmp_path / "shared"
    with CountingProxy(gcs_server.endpoint) as proxy:
        env = cli_env(gcs_server, proxy.url)
        codes, outputs = pull_concurrently(pull_command(f"gs://{bucket}/model", dest), env)
        assert codes == [0] * 8, "\n".join(outputs)
        for name, data in files.items():
            gets = proxy.select(method="GET", path_contains=media_path(bucket, name))
            # Every file is smaller than one chunk: one media GET for the whole fleet.
            assert len(gets) == 1, (name, gets)
            assert gets[0].bytes == len(data), name
        total = sum(len(v) for v in files.values())
        assert proxy.bytes_served(method="GET", path_contains="/download/") == total
    assert tree(dest) == {k[len("model/") :]: v for k, v in files.items()}


def test_cli_pull_survives_a_cut_body_and_throttling(gcs_server: GcsServer, tmp_path: Path) -> None:
    big = payload(3 * MiB + 11, 5)
    bucket = gcs_server.new_bucket({"model/big.bin": big, "model/small": b"s"})
    dest = tmp_path / "out"
    with CountingProxy(gcs_server.endpoint) as proxy:
        proxy.set_faults(
            Fault(
                kind="truncate",
                truncate_fraction=0.4,
                method="GET",
                path_contains=media_path(bucket, "model/big.bin"),
                times=1,
            ),
            Fault(status=429, path_contains=media_path(bucket, "model/small"), times=2),
        )
        result = subprocess.run(
            pull_command(f"gs://{bucket}/model", dest),
            env=cli_env(gcs_server, proxy.url),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        big_gets = proxy.select(method="GET", path_contains=media_path(bucket, "model/big.bin"))
        assert len(big_gets) == 2
        assert big_gets[0].fault == "truncate"
        # The retry resumes from the last whole block written (at most 1 MiB: the write size on
        # the lean GET; the part of a block in flight when the connection broke is read again)
        # instead of starting over.
        assert big_gets[0].range is None
        resumed_at = int((big_gets[1].range or "bytes=0-").split("=")[1].split("-")[0])
        assert 0 < resumed_at <= big_gets[0].bytes
        assert big_gets[0].bytes - resumed_at < gcsmod.BLOCK
        assert big_gets[1].bytes == len(big) - resumed_at
        assert proxy.count(path_contains=media_path(bucket, "model/small"), status=429) == 2
    assert tree(dest) == {"big.bin": big, "small": b"s"}


def test_entrypoint_with_a_gs_uri(gcs_server: GcsServer, tmp_path: Path) -> None:
    bucket = gcs_server.new_bucket({"m/a.txt": b"A", "m/sub/b.txt": b"B"})
    dest = tmp_path / "mnt" / "models"
    result = subprocess.run(
        [sys.executable, "-m", "storage_initializer.entrypoint", f"gs://{bucket}/m", str(dest)],
        env=cli_env(gcs_server),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert tree(dest) == {"a.txt": b"A", "sub/b.txt": b"B"}


def test_cli_pull_extracts_a_single_archive(gcs_server: GcsServer, tmp_path: Path) -> None:
    from tests.helpers import tar_bytes

    inner = {"model.pt": payload(5000, 8), "config/labels.txt": b"cat\ndog\n"}
    bucket = gcs_server.new_bucket({"models/model.tar.gz": tar_bytes(inner, "w:gz")})
    dest = tmp_path / "out"
    result = subprocess.run(
        pull_command(f"gs://{bucket}/models/model.tar.gz", dest),
        env=cli_env(gcs_server),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert tree(dest) == inner  # extracted, and the archive itself removed, as the stock one does
