"""The lean Azure GET (providers/azure_lean.py): blobs against real Azurite on 127.0.0.1, file
shares against tests/servers/azure_files.py (Shared Key and service SAS signatures verified).

What must hold: the lean path is the one taken by default (seen at the counting proxy: our
User-Agent, the credential's query, no Shared Key header), the environment switch and a proxy
turn it off, every credential mode it implements reads (account key as a generated read-only
SAS, SAS in the URI, anonymous; a token credential's bearer header fetched once), URLs are the
SDK's, reads are pinned to the listed ETag, error answers give the SDK path's very errors, and
a cut body is a TransientError that resumes where it broke off.
"""

from __future__ import annotations

import hashlib
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

from storage_initializer import uri as uri_module
from storage_initializer.errors import (
    AccessDeniedError,
    InitializerError,
    NotFoundError,
    SourceChangedError,
    TransientError,
)
from storage_initializer.providers import azure_lean, open_source
from storage_initializer.providers.azure_blob import AzureBlobSource
from storage_initializer.providers.azure_file import AzureFileSource
from storage_initializer.providers.base import RemoteFile
from storage_initializer.settings import Settings
from tests.helpers import read_tree
from tests.servers import azurite as azurite_server
from tests.servers.azure_files import ACCOUNT as FILE_ACCOUNT
from tests.servers.azure_files import ACCOUNT_KEY as FILE_KEY
from tests.servers.azure_files import FileShareServer
from tests.servers.proxy import CountingProxy, Fault
from tests.test_azure import (
    BIG,
    FILE_HOST,
    azure_fault,
    blob_source,
    clear_azure_env,
    file_source,
    free_port,
)

Azurite = azurite_server.Azurite


@pytest.fixture(scope="module")
def azurite() -> Iterator[Azurite]:
    yield from azurite_server.serve()


@pytest.fixture
def proxied(azurite: Azurite, monkeypatch: pytest.MonkeyPatch) -> Iterator[CountingProxy]:
    """Azurite behind the counting proxy, with the account key; the lean switch unset."""
    clear_azure_env(monkeypatch)
    monkeypatch.delenv(azure_lean.ENV, raising=False)
    with CountingProxy(f"http://127.0.0.1:{azurite.port}") as proxy:
        for name, value in azurite.env(endpoint=f"{proxy.url}/{azurite.account}").items():
            monkeypatch.setenv(name, value)
        yield proxy


def read_all(
    source: AzureBlobSource, file: RemoteFile, start: int = 0, end: int | None = None
) -> bytes:
    return b"".join(source.read(file, start, end))


def gets(proxy: CountingProxy, name: str) -> list[Any]:
    return proxy.select(method="GET", path_contains=name)


def query_of(record: Any) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(record.query))


def test_the_lean_path_is_taken_by_default_with_a_generated_read_only_sas(
    azurite: Azurite, proxied: CountingProxy
) -> None:
    container = azurite.new_container_name("lean")
    azurite.upload(container, {"m/a.bin": BIG})
    source = blob_source(azurite.uri(container, "m"))
    assert source._lean is not None
    (file,) = source.list().files
    assert read_all(source, file, 1000, 2_000_000) == BIG[1000:2_000_000]
    assert read_all(source, file) == BIG
    first, second = gets(proxied, "/m/a.bin")
    for record in (first, second):
        headers = {k.lower(): v for k, v in record.headers.items()}
        assert "storage-initializer/" in headers["user-agent"]  # ours: the lean path
        assert "authorization" not in headers  # no Shared Key: a SAS in the query
        query = query_of(record)
        assert query["sp"] == "r" and query["sr"] == "c" and "sig" in query, query
        assert headers["if-match"] == f'"{file.version}"'
        assert headers["x-ms-version"] == source._client.api_version
    assert {k.lower(): v for k, v in first.headers.items()}["x-ms-range"] == "bytes=1000-1999999"
    assert second.range is None and "x-ms-range" not in {k.lower() for k in second.headers}
    assert query_of(first)["sig"] == query_of(second)["sig"]  # one SAS, reused
    assert first.status == 206 and second.status == 200


def test_the_switch_turns_the_lean_path_off(
    azurite: Azurite, proxied: CountingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    container = azurite.new_container_name("sdk")
    azurite.upload(container, {"m/a.bin": b"through the sdk"})
    monkeypatch.setenv(azure_lean.ENV, "false")
    source = blob_source(azurite.uri(container, "m"))
    assert source._lean is None
    (file,) = source.list().files
    assert read_all(source, file) == b"through the sdk"
    (record,) = gets(proxied, "/m/a.bin")
    headers = {k.lower(): v for k, v in record.headers.items()}
    assert "storage-initializer/" not in headers["user-agent"]
    assert headers["authorization"].startswith("SharedKey ")


def test_the_lean_path_is_not_used_behind_a_proxy(
    azurite: Azurite, proxied: CountingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "")
    assert blob_source(azurite.uri("c", "m"))._lean is None
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert blob_source(azurite.uri("c", "m"))._lean is not None


def test_sas_in_the_uri_is_the_query_of_every_get(
    azurite: Azurite, proxied: CountingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    container = azurite.new_container_name("sas")
    azurite.upload(container, {"m/a.bin": b"sas", "m/b c/ü.bin": b"unicode"})
    monkeypatch.setenv("AZURE_STORAGE_ACCESS_KEY", azurite.key[:-8] + "AAAAAAA=")  # not used
    sas = azurite.sas(container)
    source = blob_source(azurite.uri(container, "m", sas=sas))
    listing = source.list()
    assert {f.path: read_all(source, f) for f in listing.files} == {
        "a.bin": b"sas",
        "b c/ü.bin": b"unicode",
    }
    records = gets(proxied, "/m/")
    assert len(records) == 2
    assert all(query_of(r)["sig"] == dict(urllib.parse.parse_qsl(sas))["sig"] for r in records)


def test_anonymous_reads_of_a_public_container(
    azurite: Azurite, proxied: CountingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    container = azurite.new_container_name("anon")
    azurite.upload(container, {"m/a.txt": b"public"}, public=True)
    monkeypatch.delenv("AZURE_STORAGE_ACCESS_KEY")
    source = blob_source(azurite.uri(container, "m"))
    assert source._lean is not None and source.credential_mode.startswith("anonymous")
    (file,) = source.list().files
    assert read_all(source, file) == b"public"
    (record,) = gets(proxied, "/m/a.txt")
    assert record.query == ""


class FakeTokenCredential:
    """A token credential as azure-identity's are (get_token of a scope); counts its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        from azure.core.credentials import AccessToken

        self.calls.append(scopes)
        return AccessToken(f"token-{len(self.calls)}", int(time.time()) + 3600)


def test_a_token_credential_sends_one_cached_bearer_token(
    azurite: Azurite, proxied: CountingProxy
) -> None:
    """Azurite takes bearer tokens over HTTPS only; what is checked here is what is sent: the
    storage scope asked once, the token in ``Authorization``, no query."""
    container = azurite.new_container_name("token")
    azurite.upload(container, {"m/a.bin": b"x"})
    source = blob_source(azurite.uri(container, "m"))
    assert source._lean is not None
    credential = FakeTokenCredential()
    source._lean.auth = azure_lean._Auth(credential, azurite.account, container)
    file = RemoteFile("a.bin", 1, version="", handle="m/a.bin")
    for _ in range(2):
        with pytest.raises(InitializerError):  # Azurite refuses bearer tokens over HTTP
            read_all(source, file)
    assert credential.calls == [(azure_lean.STORAGE_SCOPE,)]
    for record in gets(proxied, "/m/a.bin"):
        assert record.headers.get("Authorization") == "Bearer token-1"
        assert record.query == ""


@pytest.mark.parametrize("name", ["plain/key.bin", "a b/ü~+?#%x", "x//y", "sp ace/€.bin"])
def test_urls_are_the_sdks(azurite: Azurite, proxied: CountingProxy, name: str) -> None:
    source = blob_source(azurite.uri("c", "m", sas="sv=1&sig=abcd"))
    assert source._lean is not None
    assert source._lean.url(name) == source._client.get_blob_client(name).url


def test_a_blob_replaced_after_the_listing_is_a_source_change(
    azurite: Azurite, proxied: CountingProxy
) -> None:
    container = azurite.new_container_name("pin")
    azurite.upload(container, {"m/a.bin": b"version one"})
    source = blob_source(azurite.uri(container, "m"))
    (file,) = source.list().files
    azurite.upload(container, {"m/a.bin": b"version two!"})
    with pytest.raises(SourceChangedError, match="changed while it was being downloaded"):
        read_all(source, file)


def _both_paths(
    monkeypatch: pytest.MonkeyPatch, uri: str, action: Any
) -> tuple[BaseException, BaseException]:
    """The error ``action(source)`` raises on the lean path and on the SDK path."""
    raised = []
    for lean in ("true", "false"):
        monkeypatch.setenv(azure_lean.ENV, lean)
        source = blob_source(uri)
        assert (source._lean is not None) == (lean == "true")
        with pytest.raises(InitializerError) as caught:
            action(source)
        raised.append(caught.value)
    return raised[0], raised[1]


@pytest.mark.parametrize(
    ("status", "code", "kind"),
    [
        (403, "AuthorizationFailure", AccessDeniedError),
        (404, "BlobNotFound", NotFoundError),
        (503, "ServerBusy", TransientError),
        (500, "InternalError", TransientError),
        (412, "ConditionNotMet", SourceChangedError),
    ],
)
def test_error_answers_give_the_sdk_paths_errors(
    azurite: Azurite,
    proxied: CountingProxy,
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    code: str,
    kind: type[InitializerError],
) -> None:
    container = azurite.new_container_name("err")
    azurite.upload(container, {"m/a.bin": b"payload"})
    uri = azurite.uri(container, "m")
    file = blob_source(uri).list().files[0]
    fault = azure_fault(status, code, method="GET", path_contains="/m/a.bin")
    fault.headers["Retry-After"] = "7"
    proxied.set_faults(fault)
    lean, sdk = _both_paths(monkeypatch, uri, lambda source: read_all(source, file))
    assert fault.hits == 2  # one GET each: reads are retried by the engine, not the SDK
    assert type(lean) is type(sdk) and isinstance(lean, kind)
    assert str(lean) == str(sdk) and lean.describe() == sdk.describe()
    if kind is TransientError:
        assert isinstance(lean, TransientError) and isinstance(sdk, TransientError)
        assert lean.retry_after == sdk.retry_after == 7.0  # the engine's backoff honours it


def test_a_cut_body_is_transient_and_resumes_where_it_broke_off(
    azurite: Azurite, proxied: CountingProxy
) -> None:
    container = azurite.new_container_name("cut")
    azurite.upload(container, {"m/a.bin": BIG})
    source = blob_source(azurite.uri(container, "m"))
    (file,) = source.list().files
    proxied.set_faults(Fault(kind="truncate", truncate_fraction=0.5, method="GET", times=1))
    received = bytearray()
    with pytest.raises(TransientError, match="broke off"):
        for block in source.read(file):
            received += block
    assert 0 < len(received) < len(BIG)
    assert read_all(source, file, len(received)) == BIG[len(received) :]
    assert hashlib.md5(bytes(received) + BIG[len(received) :]).hexdigest() == file.checksums["md5"]


def test_an_unreachable_endpoint_while_reading_is_transient(
    azurite: Azurite, proxied: CountingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "AZURE_STORAGE_BLOB_ENDPOINT", f"http://127.0.0.1:{free_port()}/{azurite.account}"
    )
    file = RemoteFile("a.bin", 10, version="0x1", handle="m/a.bin")
    lean, sdk = _both_paths(monkeypatch, azurite.uri("c", "m"), lambda s: read_all(s, file))
    for error in (lean, sdk):
        assert isinstance(error, TransientError) and "cannot reach" in str(error), error


# -- Azure Files (tests/servers/azure_files.py: Shared Key and service SAS verified) -----------
@pytest.fixture
def share(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FileShareServer, CountingProxy]]:
    """The File REST server behind the counting proxy, with the account key."""
    clear_azure_env(monkeypatch)
    monkeypatch.delenv(azure_lean.ENV, raising=False)
    with FileShareServer() as server, CountingProxy(f"http://127.0.0.1:{server.port}") as proxy:
        monkeypatch.setenv("AZURE_STORAGE_FILE_ENDPOINT", f"{proxy.url}/{FILE_ACCOUNT}")
        monkeypatch.setenv("AZURE_STORAGE_ACCESS_KEY", FILE_KEY)
        server.put("share", {"m/a.bin": BIG, "m/b c/ü.txt": b"unicode"})
        yield server, proxy


def test_file_shares_take_the_lean_path_with_a_generated_read_only_share_sas(
    share: tuple[FileShareServer, CountingProxy],
) -> None:
    _, proxy = share
    source = file_source("share/m")
    assert source._lean is not None
    files = {f.path: f for f in source.list().files}
    assert b"".join(source.read(files["a.bin"], 5, 3_000_000)) == BIG[5:3_000_000]
    assert b"".join(source.read(files["b c/ü.txt"])) == b"unicode"
    records = proxy.select(method="GET", path_contains="/share/m/")
    assert len(records) == 2
    for record in records:
        headers = {k.lower(): v for k, v in record.headers.items()}
        assert "storage-initializer/" in headers["user-agent"]
        assert "authorization" not in headers and "if-match" not in headers
        query = query_of(record)
        assert query["sr"] == "s" and query["sp"] == "r" and "sig" in query, query
    assert {k.lower(): v for k, v in records[0].headers.items()}["x-ms-range"] == (
        "bytes=5-2999999"
    )


def test_file_shares_switched_off_go_through_the_sdk(
    share: tuple[FileShareServer, CountingProxy], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, proxy = share
    monkeypatch.setenv(azure_lean.ENV, "0")
    source = file_source("share/m")
    assert source._lean is None
    files = {f.path: f for f in source.list().files}
    assert b"".join(source.read(files["b c/ü.txt"])) == b"unicode"
    (record,) = proxy.select(method="GET", path_contains="/share/m/b")
    assert record.headers.get("Authorization", "").startswith("SharedKey ")


def test_file_shares_with_a_sas_in_the_uri(
    share: tuple[FileShareServer, CountingProxy], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, proxy = share
    monkeypatch.setenv("AZURE_STORAGE_ACCESS_KEY", FILE_KEY[:-8] + "AAAAAAA=")  # not used
    sas = server.issue_sas()
    source = open_source(uri_module.parse(f"{FILE_HOST}/share/m?{sas}"), Settings())
    assert isinstance(source, AzureFileSource) and source._lean is not None
    assert read_tree(source, source.list()) == {"a.bin": BIG, "b c/ü.txt": b"unicode"}
    gets = proxy.select(method="GET", path_contains="/share/m/")
    assert len(gets) == 2 and all(r.query == sas for r in gets)


@pytest.mark.parametrize("name", ["plain/key.bin", "a b/ü~+?#%x", "x//y"])
def test_file_urls_are_the_sdks(share: tuple[FileShareServer, CountingProxy], name: str) -> None:
    source = file_source("share/m")
    assert source._lean is not None
    url = source._lean.url(name)
    assert url.partition("?")[0] == source._client.get_file_client(name).url


@pytest.mark.parametrize(
    ("status", "code", "kind"),
    [
        (403, "AuthenticationFailed", AccessDeniedError),
        (404, "ResourceNotFound", NotFoundError),
        (503, "ServerBusy", TransientError),
    ],
)
def test_file_share_error_answers_give_the_sdk_paths_errors(
    share: tuple[FileShareServer, CountingProxy],
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    code: str,
    kind: type[InitializerError],
) -> None:
    _, proxy = share
    file = file_source("share/m").list().files[0]
    fault = azure_fault(status, code, method="GET", path_contains="/share/m/")
    fault.headers["Retry-After"] = "3"
    proxy.set_faults(fault)
    raised = []
    for lean in ("true", "false"):
        monkeypatch.setenv(azure_lean.ENV, lean)
        source = file_source("share/m")
        with pytest.raises(InitializerError) as caught:
            b"".join(source.read(file))
        raised.append(caught.value)
    lean_error, sdk_error = raised
    assert fault.hits == 2
    assert type(lean_error) is type(sdk_error) and isinstance(lean_error, kind)
    assert str(lean_error) == str(sdk_error) and lean_error.describe() == sdk_error.describe()
    if kind is TransientError:
        assert isinstance(lean_error, TransientError) and isinstance(sdk_error, TransientError)
        assert lean_error.retry_after == sdk_error.retry_after == 3.0
