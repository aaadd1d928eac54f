"""Azure Blob and Azure File share providers against real servers on 127.0.0.1.

Blob tests run against real Azurite (tests/servers/azurite.py). Azurite has no File service, so
file-share tests run against tests/servers/azure_files.py, a small server that implements the
File REST calls the SDK makes when downloading (listing, Get File Properties, ranged Get File)
with Shared Key verification; it is protocol-faithful for those calls only.

What must hold: the stock initializer's layout (one blob under its basename, a directory prefix
with relative paths, and kserve#3776 fixed: ``model`` never pulls ``model-v2/…``), zero-byte
files kept, Content-MD5 announced as hex and matching, ranged reads reassembling exactly with
bounded pieces, the credential order (SAS in URI, service principal, account key, anonymous),
SAS tokens never in error text, and each failure mapped to the right error class.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from storage_initializer import uri as uri_module
from storage_initializer.errors import (
    AccessDeniedError,
    InitializerError,
    NotFoundError,
    SourceChangedError,
    SourceError,
    TransientError,
    UsageError,
)
from storage_initializer.providers import azure_common, azure_lean, open_source
from storage_initializer.providers.azure_blob import AzureBlobSource
from storage_initializer.providers.azure_file import AzureFileSource
from storage_initializer.providers.base import Listing, RemoteFile
from storage_initializer.settings import Settings
from tests.helpers import read_tree
from tests.servers import azurite as azurite_server
from tests.servers.azure_files import ACCOUNT_KEY, FileShareServer
from tests.servers.azurite import azurite
from tests.servers.proxy import CountingProxy, Fault

__all__ = ["azurite"]  # the session fixture: tests isolate themselves by container

REPO_ROOT = Path(__file__).resolve().parent.parent
FILE_HOST = "https://devstoreaccount1.file.core.windows.net"
AZURE_ENV = (
    "AZURE_STORAGE_BLOB_ENDPOINT",
    "AZURE_STORAGE_FILE_ENDPOINT",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_CLIENT_ID",
    "AZURE_TENANT_ID",
    "AZURE_CLIENT_SECRET",
    "AZURE_SUBSCRIPTION_ID",
    "AZ_CLIENT_ID",
    "AZ_TENANT_ID",
    "AZ_CLIENT_SECRET",
    "AZ_SUBSCRIPTION_ID",
)


def _blob(seed: str, size: int) -> bytes:
    """Deterministic incompressible bytes."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


BIG = _blob("big", 9 * 1024 * 1024 + 77)  # > 2 SDK pieces (4 MiB), odd length
MODEL = {
    "model/config.json": b'{"a": 1}\n',
    "model/weights.bin": BIG,
    "model/sub/dir/deep.txt": b"deep\n",
    "model/sub dir/ünï côdé.txt": "unicode ✓\n".encode(),
    "model/empty.txt": b"",
    "model-v2/config.json": b"must not be pulled\n",
    "modelx": b"not a directory entry either\n",
}
MODEL_PATHS = {
    "config.json",
    "weights.bin",
    "sub/dir/deep.txt",
    "sub dir/ünï côdé.txt",
    "empty.txt",
}


def clear_azure_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset the Azure variables so that undo removes them again: the provider copies AZ_* to
    AZURE_* in os.environ, and those copies must not leak into later tests."""
    for name in AZURE_ENV:
        monkeypatch.setenv(name, "")  # records the original state, present or not
        monkeypatch.delenv(name)


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(azurite: azurite_server.Azurite) -> str:
    """A container with the MODEL tree (with Content-MD5), shared by read-only tests."""
    container = azurite.new_container_name("models")
    azurite.upload(container, MODEL)
    return container


@pytest.fixture
def azure_env(
    azurite: azurite_server.Azurite, monkeypatch: pytest.MonkeyPatch
) -> azurite_server.Azurite:
    """A clean Azure environment pointing at Azurite with the account key."""
    clear_azure_env(monkeypatch)
    for name, value in azurite.env().items():
        monkeypatch.setenv(name, value)
    return azurite


@pytest.fixture
def files_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FileShareServer]:
    clear_azure_env(monkeypatch)
    with FileShareServer(page_size=2) as server:  # small pages: the listing must follow markers
        monkeypatch.setenv("AZURE_STORAGE_FILE_ENDPOINT", server.endpoint)
        monkeypatch.setenv("AZURE_STORAGE_ACCESS_KEY", ACCOUNT_KEY)
        yield server


def blob_source(uri: str) -> AzureBlobSource:
    source = open_source(uri_module.parse(uri), Settings())
    assert isinstance(source, AzureBlobSource)
    return source


def file_source(path: str) -> AzureFileSource:
    source = open_source(uri_module.parse(f"{FILE_HOST}/{path}"), Settings())
    assert isinstance(source, AzureFileSource)
    return source


def by_path(listing: Listing) -> dict[str, RemoteFile]:
    return {f.path: f for f in listing.files}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- blob layout ----------------------------------------------------------------------------------
def test_directory_prefix_keeps_relative_paths_and_excludes_siblings(
    azure_env: azurite_server.Azurite, models: str
) -> None:
    source = blob_source(azure_env.uri(models, "model"))
    listing = source.list()
    assert {f.path for f in listing.files} == MODEL_PATHS
    contents = read_tree(source, listing)
    assert contents == {
        k.removeprefix("model/"): v for k, v in MODEL.items() if k.startswith("model/")
    }
    assert by_path(listing)["empty.txt"].size == 0  # zero-byte blobs are files (stock drops them)


def test_trailing_slash_means_directory(azure_env: azurite_server.Azurite, models: str) -> None:
    assert {
        f.path for f in blob_source(azure_env.uri(models, "model/")).list().files
    } == MODEL_PATHS


def test_blob_name_downloads_under_its_basename(
    azure_env: azurite_server.Azurite, models: str
) -> None:
    source = blob_source(azure_env.uri(models, "model/sub/dir/deep.txt"))
    listing = source.list()
    assert [f.path for f in listing.files] == ["deep.txt"]
    assert read_tree(source, listing) == {"deep.txt": b"deep\n"}


def test_top_level_blob_is_not_confused_with_a_longer_name(
    azure_env: azurite_server.Azurite, models: str
) -> None:
    """``model`` is a directory here even though ``modelx`` and ``model-v2/…`` start with it."""
    listing = blob_source(azure_env.uri(models, "modelx")).list()
    assert [(f.path, f.size) for f in listing.files] == [("modelx", len(MODEL["modelx"]))]


def test_empty_prefix_takes_the_whole_container(
    azure_env: azurite_server.Azurite, models: str
) -> None:
    listing = blob_source(azure_env.uri(models)).list()
    assert {f.path for f in listing.files} == set(MODEL)


def test_percent_encoded_prefix_names_unicode_and_spaces(
    azure_env: azurite_server.Azurite, models: str
) -> None:
    source = blob_source(
        azure_env.uri(models, "model/sub%20dir/%C3%BCn%C3%AF%20c%C3%B4d%C3%A9.txt")
    )
    listing = source.list()
    assert read_tree(source, listing) == {"ünï côdé.txt": "unicode ✓\n".encode()}


def test_folder_placeholders_are_skipped(azure_env: azurite_server.Azurite) -> None:
    """ADLS Gen2 lists directories as zero-byte blobs with hdi_isfolder=true; tools write "a/"."""
    container = azure_env.new_container_name("hns")
    azure_env.upload(container, {"m/sub": b""}, metadata={"hdi_isfolder": "true"})
    azure_env.upload(container, {"m/sub/x.bin": b"x", "m/": b"", "m/sub/": b""})
    assert [f.path for f in blob_source(azure_env.uri(container, "m")).list().files] == [
        "sub/x.bin"
    ]
    # A HEAD that finds the folder entry must not make it a single (empty) file.
    assert [f.path for f in blob_source(azure_env.uri(container, "m/sub")).list().files] == [
        "x.bin"
    ]


def test_file_and_directory_with_one_name_is_refused(azure_env: azurite_server.Azurite) -> None:
    container = azure_env.new_container_name("clash")
    azure_env.upload(container, {"m/a": b"file", "m/a/b": b"below"})
    with pytest.raises(SourceError, match="both a file and a directory"):
        blob_source(azure_env.uri(container, "m")).list()


@pytest.mark.parametrize("name", ["../x", "a/../../x", "./", "a/./b", ""])
def test_paths_that_escape_the_model_directory_are_refused(name: str) -> None:
    with pytest.raises(SourceError):
        azure_common.safe_relative_path(name, "blob")


def test_redundant_slashes_are_collapsed() -> None:
    assert azure_common.safe_relative_path("/a//b/", "blob") == "a/b"


# -- checksums, versions, ranges ------------------------------------------------------------------
def test_md5_is_announced_as_hex_and_matches(
    azure_env: azurite_server.Azurite, models: str
) -> None:
    source = blob_source(azure_env.uri(models, "model"))
    listing = source.list()
    contents = read_tree(source, listing)
    for item in listing.files:
        assert item.checksums == {"md5": hashlib.md5(contents[item.path]).hexdigest()}
        assert item.version and not item.version.startswith('"')


def test_no_md5_when_the_blob_has_none(azure_env: azurite_server.Azurite) -> None:
    container = azure_env.new_container_name("nomd5")
    azure_env.upload(
        container, {"m/blocks.bin": b"staged blocks", "m/empty": b""}, content_md5=False
    )
    files = by_path(blob_source(azure_env.uri(container, "m")).list())
    assert files["blocks.bin"].checksums == {}
    assert files["empty"].checksums == {}
    assert files["blocks.bin"].size == len(b"staged blocks")


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "sdk"])
def test_ranged_reads_from_many_threads_reassemble_exactly(
    azure_env: azurite_server.Azurite, models: str, monkeypatch: pytest.MonkeyPatch, lean: bool
) -> None:
    monkeypatch.setenv(azure_lean.ENV, str(lean).lower())
    source = blob_source(azure_env.uri(models, "model/weights.bin"))
    assert (source._lean is not None) == lean
    (item,) = source.list().files
    assert item.size == len(BIG)
    step = 1_234_567
    ranges = [(start, min(start + step, len(BIG))) for start in range(0, len(BIG), step)]
    ranges[-1] = (ranges[-1][0], None)  # the last one reads "to the end"

    # The SDK path hands out the transport's blocks, the lean one the engine's read size.
    BLOCK = source.settings.read_size if lean else azure_common.BLOCK

    def span_length(span: tuple[int, int | None]) -> int:
        return (span[1] if span[1] is not None else len(BIG)) - span[0]

    def fetch(span: tuple[int, int | None]) -> bytes:
        pieces = list(source.read(item, *span))
        assert all(len(piece) <= BLOCK for piece in pieces)  # bounded memory
        # ... and not tiny: azure-core cuts bodies into 4 KiB unless the transport is told.
        assert max(len(piece) for piece in pieces) == min(span_length(span), BLOCK)
        return b"".join(pieces)

    with ThreadPoolExecutor(8) as pool:
        data = b"".join(pool.map(fetch, ranges))
    assert data == BIG
    assert hashlib.md5(data).hexdigest() == item.checksums["md5"]
    assert b"".join(source.read(item, 5, 5)) == b""
    assert b"".join(source.read(item, len(BIG) - 3)) == BIG[-3:]


def test_one_range_is_one_streamed_request(
    azurite: azurite_server.Azurite, models: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A range is one GET streamed block by block, not the SDK's 4 MiB pieces held in memory."""
    with CountingProxy(f"http://127.0.0.1:{azurite.port}") as proxy:
        for name, value in azurite.env(endpoint=f"{proxy.url}/{azurite.account}").items():
            monkeypatch.setenv(name, value)
        source = blob_source(azurite.uri(models, "model/weights.bin"))
        (item,) = source.list().files
        proxy.reset()
        assert b"".join(source.read(item, 1, len(BIG) - 1)) == BIG[1:-1]
        (request,) = proxy.select(method="GET", path_contains="weights.bin")
        assert request.status == 206 and request.bytes == len(BIG) - 2
        ranges = {v for k, v in request.headers.items() if k.lower() in ("range", "x-ms-range")}
        assert ranges == {f"bytes=1-{len(BIG) - 2}"}


def test_piecewise_fallback_reads_the_same_bytes_and_refuses_a_changed_blob(
    azure_env: azurite_server.Azurite,
) -> None:
    """The SDK's public download, used if its operation layer ever moves, keeps our guarantees."""
    container = azure_env.new_container_name("pieces")
    azure_env.upload(container, {"m/big.bin": BIG})
    source = blob_source(azure_env.uri(container, "m"))
    (item,) = source.list().files
    blob = source._client.get_blob_client(item.handle)
    match = {"If-Match": f'"{item.version}"'}
    pieces = list(source._read_in_pieces(blob, 3, len(BIG) - 5, match))
    assert b"".join(pieces) == BIG[3:-5]
    assert all(len(piece) <= azure_common.GET_PIECE for piece in pieces)
    azure_env.upload(container, {"m/big.bin": b"replaced"})
    from azure.core.exceptions import ResourceModifiedError

    with pytest.raises(ResourceModifiedError):
        b"".join(source._read_in_pieces(blob, 0, None, match))


def test_fingerprint_follows_content_and_reads_refuse_a_changed_blob(
    azure_env: azurite_server.Azurite,
) -> None:
    container = azure_env.new_container_name("change")
    azure_env.upload(container, {"m/a.bin": b"version one"})
    source = blob_source(azure_env.uri(container, "m"))
    before = source.list()
    assert before.fingerprint == source.list().fingerprint  # stable when nothing changes
    azure_env.upload(container, {"m/a.bin": b"version two!"})
    after = source.list()
    assert after.fingerprint != before.fingerprint
    # A range of the listed version must not silently return bytes of the new one.
    with pytest.raises(SourceChangedError, match="changed"):
        b"".join(source.read(before.files[0]))
    assert b"".join(source.read(after.files[0])) == b"version two!"


# -- credentials ----------------------------------------------------------------------------------
def test_account_key(azure_env: azurite_server.Azurite, models: str) -> None:
    source = blob_source(azure_env.uri(models, "model/config.json"))
    assert "AZURE_STORAGE_ACCESS_KEY" in source.credential_mode
    assert read_tree(source, source.list()) == {"config.json": MODEL["model/config.json"]}


def test_bad_account_key_is_access_denied(
    azure_env: azurite_server.Azurite, models: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AZURE_STORAGE_ACCESS_KEY", azure_env.key[:-8] + "AAAAAAA=")
    with pytest.raises(AccessDeniedError, match=r"AuthorizationFailure|AuthenticationFailed"):
        blob_source(azure_env.uri(models, "model")).list()


def test_sas_in_uri_wins_over_a_bad_key(
    azure_env: azurite_server.Azurite, models: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AZURE_STORAGE_ACCESS_KEY", azure_env.key[:-8] + "AAAAAAA=")
    uri = azure_env.uri(models, "model", sas=azure_env.sas(models))
    source = blob_source(uri)
    assert source.credential_mode.startswith("SAS")
    listing = source.list()
    assert read_tree(source, listing)["weights.bin"] == BIG


def test_sas_alone(
    azure_env: azurite_server.Azurite, models: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AZURE_STORAGE_ACCESS_KEY")
    source = blob_source(azure_env.uri(models, "model/config.json", sas=azure_env.sas(models)))
    assert read_tree(source, source.list()) == {"config.json": MODEL["model/config.json"]}


def test_anonymous_on_a_public_container(
    azure_env: azurite_server.Azurite, monkeypatch: pytest.MonkeyPatch
) -> None:
    container = azure_env.new_container_name("public")
    azure_env.upload(container, {"m/a.txt": b"public"}, public=True)
    monkeypatch.delenv("AZURE_STORAGE_ACCESS_KEY")
    source = blob_source(azure_env.uri(container, "m"))
    assert source.credential_mode.startswith("anonymous")
    assert read_tree(source, source.list()) == {"a.txt": b"public"}


def test_anonymous_on_a_private_container_says_so(
    azure_env: azurite_server.Azurite, models: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AZURE_STORAGE_ACCESS_KEY")
    with pytest.raises(AccessDeniedError, match="anonymous"):
        blob_source(azure_env.uri(models, "model")).list()


def test_service_principal_comes_before_the_key_and_legacy_names_are_copied(
    azure_env: azurite_server.Azurite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No token is requested here (that needs Entra ID); what is checked is the choice made."""
    monkeypatch.setenv("AZ_CLIENT_ID", "legacy-client")
    monkeypatch.setenv("AZ_TENANT_ID", "legacy-tenant")
    monkeypatch.setenv("AZ_CLIENT_SECRET", "legacy-secret-value")
    monkeypatch.setenv("AZURE_TENANT_ID", "explicit-tenant")
    location = azure_common.parse_location(
        uri_module.parse("https://acct.blob.core.windows.net/c/p"),
        "UNSET_ENDPOINT_VAR",
        "container",
    )
    credential, mode = azure_common.select_credential(location)
    assert "DefaultAzureCredential" in mode
    assert hasattr(credential, "get_token")
    assert os.environ["AZURE_CLIENT_ID"] == "legacy-client"
    assert os.environ["AZURE_CLIENT_SECRET"] == "legacy-secret-value"
    assert os.environ["AZURE_TENANT_ID"] == "explicit-tenant"  # never overwritten
    # With a SAS in the URI the SAS still wins.
    with_sas = azure_common.parse_location(
        uri_module.parse("https://acct.blob.core.windows.net/c/p?sv=1&sig=abcdef"), "X", "container"
    )
    assert azure_common.select_credential(with_sas) == ("sv=1&sig=abcdef", "SAS token from the URI")


def test_endpoint_override_and_regional_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AZURE_STORAGE_BLOB_ENDPOINT", raising=False)
    zonal = uri_module.parse("https://acct.z12.blob.storage.azure.net/cont/a/b/?sv=1&sig=x1y2z3")
    location = azure_common.parse_location(zonal, "AZURE_STORAGE_BLOB_ENDPOINT", "container")
    assert (location.account, location.container, location.prefix) == ("acct", "cont", "a/b")
    assert location.endpoint == "https://acct.z12.blob.storage.azure.net"
    assert location.directory_only and location.sas == "sv=1&sig=x1y2z3"
    monkeypatch.setenv("AZURE_STORAGE_BLOB_ENDPOINT", "https://{account}.privatelink.example/")
    location = azure_common.parse_location(zonal, "AZURE_STORAGE_BLOB_ENDPOINT", "container")
    assert location.endpoint == "https://acct.privatelink.example"
    assert location.endpoint_overridden


# -- secrets --------------------------------------------------------------------------------------
def _all_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + (
        exc.describe() if isinstance(exc, InitializerError) else ""
    )


def test_sas_never_appears_in_errors_or_the_redacted_uri(
    azure_env: azurite_server.Azurite, models: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AZURE_STORAGE_ACCESS_KEY")
    other = azure_env.new_container_name("other")
    azure_env.upload(other, {"m/a": b"a"})
    sas = azure_env.sas(other)  # valid, but for another container
    signature = dict(p.split("=", 1) for p in sas.split("&"))["sig"]
    uri = azure_env.uri(models, "model", sas=sas)
    parsed = uri_module.parse(uri)
    assert signature not in parsed.redacted and signature not in parsed.canonical
    with pytest.raises(AccessDeniedError) as denied:
        blob_source(uri).list()
    monkeypatch.setenv("AZURE_STORAGE_BLOB_ENDPOINT", f"http://127.0.0.1:{free_port()}/x")
    with pytest.raises(SourceError) as unreachable:
        blob_source(uri).list()
    for exc in (denied.value, unreachable.value):
        text = _all_text(exc)
        assert models in text  # the error still names the source
        for secret in (signature, signature.replace("%3D", "="), sas):
            assert secret not in text


# -- errors ---------------------------------------------------------------------------------------
def test_missing_container(azure_env: azurite_server.Azurite) -> None:
    with pytest.raises(NotFoundError, match="ContainerNotFound"):
        blob_source(azure_env.uri("no-such-container", "model")).list()


def test_nothing_under_the_prefix(azure_env: azurite_server.Azurite, models: str) -> None:
    with pytest.raises(NotFoundError, match="no blobs below 'mode'"):
        blob_source(azure_env.uri(models, "mode")).list()  # a prefix of names, not a directory


def test_unreachable_endpoint_is_a_prompt_permanent_error(
    azure_env: azurite_server.Azurite, models: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    monkeypatch.setenv("AZURE_STORAGE_BLOB_ENDPOINT", f"http://127.0.0.1:{port}/devstoreaccount1")
    started = time.monotonic()
    with pytest.raises(SourceError) as caught:
        blob_source(azure_env.uri(models, "model")).list()
    assert not isinstance(caught.value, TransientError)
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert "AZURE_STORAGE_BLOB_ENDPOINT" in caught.value.describe()
    assert time.monotonic() - started < 20


class _StatusServer:
    """Answers every request with one fixed Azure error: a stand-in for a failing front end."""

    def __init__(self, status: int, code: str, retry_after: str | None = None) -> None:
        outer = self
        self.hits = 0

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                return

            def _answer(self) -> None:
                outer.hits += 1
                body = f"<?xml version='1.0'?><Error><Code>{code}</Code></Error>".encode()
                self.send_response(status)
                self.send_header("x-ms-error-code", code)
                self.send_header("Content-Length", str(len(body)))
                if retry_after:
                    self.send_header("Retry-After", retry_after)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = _answer

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}/devstoreaccount1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize(
    ("status", "code"), [(503, "ServerBusy"), (429, "TooManyRequests"), (500, "InternalError")]
)
def test_busy_or_failing_service_is_transient(
    azure_env: azurite_server.Azurite, monkeypatch: pytest.MonkeyPatch, status: int, code: str
) -> None:
    server = _StatusServer(status, code, retry_after="2")
    try:
        monkeypatch.setenv("AZURE_STORAGE_BLOB_ENDPOINT", server.endpoint)
        source = blob_source(azure_env.uri("c", "m/a.bin"))
        item = RemoteFile("a.bin", 10, version="0x1", handle="m/a.bin")
        with pytest.raises(TransientError) as caught:
            b"".join(source.read(item, 0, 10))
        assert caught.value.retry_after == 2.0
        assert str(status) in str(caught.value)
        assert server.hits == 1  # reads are retried by the engine, not a second time by the SDK
    finally:
        server.close()


# -- Azure Files ----------------------------------------------------------------------------------
SHARE_TREE = {
    "models/m/config.json": b"{}\n",
    "models/m/weights.bin": BIG,
    "models/m/a/b/c/deep.txt": b"deep\n",
    "models/m/sub dir/ünï.txt": "ü\n".encode(),
    "models/m/empty": b"",
    "models/m-v2/config.json": b"sibling\n",
    "top.bin": b"top\n",
}
SHARE_PATHS = {"config.json", "weights.bin", "a/b/c/deep.txt", "sub dir/ünï.txt", "empty"}


def test_file_share_directory_layout_md5_and_ranges(files_server: FileShareServer) -> None:
    files_server.put("share", SHARE_TREE)
    files_server.put("share", {"models/m/no-md5.txt": b"none"}, content_md5=False)
    source = file_source("share/models/m")
    listing = source.list()
    assert {f.path for f in listing.files} == SHARE_PATHS | {"no-md5.txt"}
    files = by_path(listing)
    assert files["no-md5.txt"].checksums == {}
    assert files["empty"].size == 0
    contents = read_tree(source, listing)
    for path, data in contents.items():
        expected = SHARE_TREE.get(f"models/m/{path}", b"none")
        assert data == expected
        if path != "no-md5.txt":
            assert files[path].checksums == {"md5": hashlib.md5(data).hexdigest()}
    weights = files["weights.bin"]
    half = len(BIG) // 2 + 1
    assert b"".join(source.read(weights, 0, half)) + b"".join(source.read(weights, half)) == BIG
    assert files_server.count("GET", "models/m-v2") == 0


def test_file_share_single_file_whole_share_and_trailing_slash(
    files_server: FileShareServer,
) -> None:
    files_server.put("share", SHARE_TREE)
    assert [f.path for f in file_source("share/top.bin").list().files] == ["top.bin"]
    assert [f.path for f in file_source("share/models/m/a/b/c/deep.txt").list().files] == [
        "deep.txt"
    ]
    assert {f.path for f in file_source("share/models/m/").list().files} == SHARE_PATHS
    whole = {f.path for f in file_source("share").list().files}
    assert whole == set(SHARE_TREE)


def test_file_share_sas_and_credentials(
    files_server: FileShareServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    files_server.put("share", {"m/a.txt": b"a"})
    monkeypatch.setenv("AZURE_STORAGE_ACCESS_KEY", ACCOUNT_KEY[:-8] + "AAAAAAA=")
    with pytest.raises(AccessDeniedError):
        file_source("share/m").list()
    sas = files_server.issue_sas()
    source = open_source(uri_module.parse(f"{FILE_HOST}/share/m?{sas}"), Settings())
    assert read_tree(source, source.list()) == {"a.txt": b"a"}  # SAS wins over the bad key
    monkeypatch.delenv("AZURE_STORAGE_ACCESS_KEY")
    with pytest.raises(AccessDeniedError, match="anonymous"):
        file_source("share/m").list()
    bad = sas.rsplit("sig=", 1)[0] + "sig=forgedSignature123"
    with pytest.raises(AccessDeniedError) as caught:
        open_source(uri_module.parse(f"{FILE_HOST}/share/m?{bad}"), Settings()).list()
    assert "forgedSignature123" not in _all_text(caught.value)


def test_file_share_identity_uses_the_backup_token_intent(
    files_server: FileShareServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SDK refuses a token credential without token_intent; building the source proves we
    pass it (no token is requested until the first call)."""
    monkeypatch.setenv("AZURE_CLIENT_ID", "client")
    with pytest.raises(UsageError, match="https"):  # the SDK sends tokens over TLS only
        file_source("share/m")
    monkeypatch.setenv("AZURE_STORAGE_FILE_ENDPOINT", f"https://127.0.0.1:{free_port()}/acct")
    source = file_source("share/m")
    assert "DefaultAzureCredential" in source.credential_mode


def test_file_share_listing_whose_pages_link_back_is_refused(
    files_server: FileShareServer,
) -> None:
    """A last page whose NextMarker leads back to the first: followed, the walk would list the
    same entries for ever (the server here stops after 20 rounds; the old walk then failed on
    names listed twice, not on what was wrong)."""
    files_server.put("share", {f"m/{n}.txt": b"x" for n in "abcde"})
    files_server.cycle_pages = 20
    with pytest.raises(SourceError, match="leads back to a page it sent already") as caught:
        file_source("share/m").list()
    assert "AZURE_STORAGE_FILE_ENDPOINT" in caught.value.describe()


@pytest.mark.parametrize("name", [".", "..", "x/y", ""])
def test_file_share_entry_that_is_no_plain_name_is_refused_not_walked(
    files_server: FileShareServer, name: str
) -> None:
    """A directory entry named "." or ".." would, walked, list a directory again and again."""
    files_server.put("share", {"m/a.txt": b"a"})
    files_server.phantom_directories = [name]
    with pytest.raises(SourceError, match="lists an entry named"):
        file_source("share/m").list()


def test_blob_listing_whose_pages_link_back_is_refused(
    azurite: azurite_server.Azurite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy that answers every List Blobs with a page whose NextMarker is the marker it was
    asked for: the SDK would follow it for ever, the list growing until the pod is killed."""
    clear_azure_env(monkeypatch)
    container = azurite.new_container_name("cycle")
    azurite.upload(container, {"m/a.bin": b"a"})
    page = (
        '<?xml version="1.0" encoding="utf-8"?><EnumerationResults ServiceEndpoint="x" '
        f'ContainerName="{container}"><Prefix>m/</Prefix><Blobs><Blob><Name>m/a.bin</Name>'
        "<Properties><Last-Modified>Mon, 07 Dec 2026 10:00:00 GMT</Last-Modified>"
        "<Etag>0x8DD0000000000A1</Etag><Content-Length>1</Content-Length>"
        "<BlobType>BlockBlob</BlobType></Properties><Metadata /></Blob></Blobs>"
        "<NextMarker>loop</NextMarker></EnumerationResults>"
    ).encode()
    with CountingProxy(f"http://127.0.0.1:{azurite.port}") as proxy:
        for name, value in azurite.env(endpoint=f"{proxy.url}/{azurite.account}").items():
            monkeypatch.setenv(name, value)
        # 20 canned pages, then Azurite answers the bogus marker: old code failed otherwise.
        proxy.set_faults(
            Fault(
                status=200,
                body=page,
                headers={"Content-Type": "application/xml", "x-ms-version": "2025-01-05"},
                method="GET",
                predicate=lambda record: "comp=list" in record.query,
                times=20,
            )
        )
        with pytest.raises(SourceError, match="leads back to a page it sent already") as caught:
            blob_source(azurite.uri(container, "m")).list()
    assert "AZURE_STORAGE_BLOB_ENDPOINT" in caught.value.describe()
    assert proxy.count(method="GET") == 2  # the first page and the one that leads back


def test_file_share_errors(files_server: FileShareServer, monkeypatch: pytest.MonkeyPatch) -> None:
    files_server.put("share", {"m/a.txt": b"a"})
    with pytest.raises(NotFoundError, match="ShareNotFound"):
        file_source("nope/m").list()
    with pytest.raises(NotFoundError):
        file_source("share/missing/dir").list()
    monkeypatch.setenv("AZURE_STORAGE_FILE_ENDPOINT", f"http://127.0.0.1:{free_port()}/x")
    with pytest.raises(SourceError, match="cannot reach") as caught:
        file_source("share/m").list()
    assert not isinstance(caught.value, TransientError)


# -- end to end: python -m storage_initializer pull ----------------------------------------------
def _pull(uri: str, dest: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in AZURE_ENV}
    full_env.update(env)
    full_env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run(
        [sys.executable, "-m", "storage_initializer", "pull", uri, str(dest)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and not p.relative_to(root).as_posix().startswith(".")
    }


def test_pull_blob_directory_end_to_end(
    azurite: azurite_server.Azurite, models: str, tmp_path: Path
) -> None:
    sas = azurite.sas(models)
    result = _pull(azurite.uri(models, "model", sas=sas), tmp_path / "out", azurite.env(key=False))
    assert result.returncode == 0, result.stderr
    expected = {k.removeprefix("model/"): v for k, v in MODEL.items() if k.startswith("model/")}
    assert _tree(tmp_path / "out") == expected
    signature = dict(p.split("=", 1) for p in sas.split("&"))["sig"]
    assert signature not in result.stdout + result.stderr


def test_pull_failure_last_line_names_the_source_without_the_sas(
    azurite: azurite_server.Azurite, models: str, tmp_path: Path
) -> None:
    sas = azurite.sas(models)
    result = _pull(azurite.uri(models, "nothing-here", sas=sas), tmp_path / "o", azurite.env())
    assert result.returncode == 1
    output = (result.stdout + result.stderr).strip().splitlines()
    assert "nothing-here" in output[-1]
    signature = dict(p.split("=", 1) for p in sas.split("&"))["sig"]
    assert signature not in result.stdout + result.stderr


def test_pull_file_share_end_to_end_and_download_once(tmp_path: Path) -> None:
    """Eight processes at once into one directory: every file is fetched from the origin once."""
    with FileShareServer() as server:
        server.put("share", SHARE_TREE)
        env = {
            "AZURE_STORAGE_FILE_ENDPOINT": server.endpoint,
            "AZURE_STORAGE_ACCESS_KEY": ACCOUNT_KEY,
        }
        full_env = {k: v for k, v in os.environ.items() if k not in AZURE_ENV}
        full_env.update(env, PYTHONPATH=str(REPO_ROOT))
        dest = tmp_path / "shared"
        command = [
            sys.executable,
            "-m",
            "storage_initializer",
            "pull",
            f"{FILE_HOST}/share/models/m",
        ]
        processes = [
            subprocess.Popen(
                [*command, str(dest)],
                env=full_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for _ in range(8)
        ]
        outputs = [p.communicate(timeout=180)[0] for p in processes]
        assert [p.returncode for p in processes] == [0] * 8, outputs
        assert _tree(dest) == {k.removeprefix("models/m/"): v for k, v in SHARE_TREE.items()
                               if k.startswith("models/m/")}  # fmt: skip
        served = {p: n for p, n in server.bytes_served.items() if p.startswith("models/m/")}
        expected = {p: len(d) for p, d in SHARE_TREE.items() if p.startswith("models/m/") and d}
        assert served == expected  # each byte from the origin once, in all eight processes


# -- through the counting, fault-injecting proxy (tests/servers/proxy.py) -------------------------
def azure_fault(status: int, code: str, **match: object) -> Fault:
    """A fault answering as Azure Storage does: XML error body and x-ms-error-code."""
    body = f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code></Error>'.encode()
    headers = {"x-ms-error-code": code, "Content-Type": "application/xml", "Retry-After": "0"}
    return Fault(status=status, body=body, headers=headers, **match)  # type: ignore[arg-type]


def test_eight_processes_download_each_blob_once(
    azurite: azurite_server.Azurite, tmp_path: Path
) -> None:
    container = azurite.new_container_name("once")
    azurite.upload(container, MODEL)
    with CountingProxy(f"http://127.0.0.1:{azurite.port}") as proxy:
        env = azurite.env(endpoint=f"{proxy.url}/{azurite.account}")
        full_env = {k: v for k, v in os.environ.items() if k not in AZURE_ENV}
        full_env.update(env, PYTHONPATH=str(REPO_ROOT))
        dest = tmp_path / "shared"
        command = [sys.executable, "-m", "storage_initializer", "pull"]
        processes = [
            subprocess.Popen(
                [*command, azurite.uri(container, "model"), str(dest)],
                env=full_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for _ in range(8)
        ]
        outputs = [p.communicate(timeout=180)[0] for p in processes]
        assert [p.returncode for p in processes] == [0] * 8, outputs
        expected = {k.removeprefix("model/"): v for k, v in MODEL.items() if k.startswith("model/")}
        assert _tree(dest) == expected
        for name in ("config.json", "weights.bin", "sub/dir/deep.txt"):
            path = f"/{container}/model/{name}"
            served = proxy.bytes_served(method="GET", path_contains=path)
            assert served == len(MODEL[f"model/{name}"]), name
        assert proxy.count(method="GET", path_contains=f"/{container}/model/config.json") == 1
        assert proxy.count(method="GET", path_contains="model-v2") == 0


def test_pull_survives_busy_and_truncated_responses(
    azurite: azurite_server.Azurite, models: str, tmp_path: Path
) -> None:
    with CountingProxy(f"http://127.0.0.1:{azurite.port}") as proxy:
        proxy.set_faults(
            azure_fault(503, "ServerBusy", method="GET", path_contains="weights.bin", times=2),
            azure_fault(429, "TooManyRequests", method="GET", path_contains="config.json", times=1),
            Fault(kind="truncate", method="GET", path_contains="deep.txt", times=1),
        )
        env = azurite.env(endpoint=f"{proxy.url}/{azurite.account}")
        result = _pull(azurite.uri(models, "model"), tmp_path / "out", env)
        assert result.returncode == 0, result.stdout + result.stderr
        expected = {k.removeprefix("model/"): v for k, v in MODEL.items() if k.startswith("model/")}
        assert _tree(tmp_path / "out") == expected
        assert proxy.count(faulted=True) == 4  # every fault was hit, and recovered from
