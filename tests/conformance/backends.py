"""The backends of the conformance suite: each a real local server behind the counting,
fault-injecting proxy (tests/servers/proxy.py), and what the contract tests need to know about
it:

- :meth:`Backend.publish` uploads a file set and returns its URI for our provider, how to tell
  its content reads at the proxy, and a way to replace one file at the origin (for the
  version-pinning tests);
- :attr:`Backend.env`: the environment (endpoint through the proxy, credentials) for a child
  process, and :meth:`Backend.use` puts it into this process for provider-level tests;
- :meth:`Backend.error` builds the answer the *service* gives for a status (S3's XML
  ``<Error>``, GCS's JSON, Azure's ``x-ms-error-code``, the Hub's ``X-Error-Code``, Hadoop's
  ``RemoteException``), so the proxy injects what each client really parses;
  :meth:`Backend.denied` is a URI the server itself refuses;
- capabilities the contract depends on (``one_file``, ``pins``, ``never_answers``,
  ``cannot_deny``, ``content_in_listing``, ``known_bugs``) with the reason when a backend lacks
  one: its tests are skipped (or run as strict xfail) with that reason, never passed silently.

The fixture rows that build them are in ``conftest.py`` (see
docs/providers/adding-a-backend.md).
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import unquote

import pytest

from tests.helpers import clean_env
from tests.servers.azurite import Azurite
from tests.servers.gcs import GcsServer
from tests.servers.nginx import Nginx
from tests.servers.proxy import CountingProxy, Fault, RequestRecord, s3_error
from tests.servers.s3 import S3Server
from tests.servers.webhdfs import PREFIX, WebHdfs


@dataclass
class Published:
    """A file set at the origin, as our provider names it."""

    uri: str
    files: dict[str, bytes]
    #: In the path of every GET of this set's content (and of no listing request).
    content_path: str
    #: Replace one file (by its relative path) at the origin, bypassing the proxy.
    replace: Callable[[str, bytes], None]
    #: Where the path alone cannot tell a content read (ModelScope: ``.../repo?FilePath=``).
    content_query: str = ""

    def reads(self, record: RequestRecord) -> bool:
        """A proxy predicate: ``record`` reads content of this set (not a listing)."""
        if self.content_query:
            return self.content_path in record.path and self.content_query in record.query
        return self.content_path in record.path

    def reads_file(self, path: str) -> Callable[[RequestRecord], bool]:
        """A proxy predicate: reads of the file ``path`` only."""
        name = path.rsplit("/", 1)[-1]
        return lambda record: self.reads(record) and name in unquote(record.path + record.query)


class Backend:
    """A backend behind the proxy. Subclasses fill in the service-specific parts."""

    name = ""
    #: The URI names one file (plain HTTP): the contract's file set is one file.
    one_file = False
    #: What a read pinned to the listed version does once the file is replaced:
    #: ``"refuses"`` (SourceChangedError) or ``"commit"`` (the listed commit is immutable, so
    #: the read still returns the listed bytes), or the reason it cannot pin (skipped).
    pins = "refuses"
    #: Requests per read attempt of ours (the SDK's own retries of an error status).
    sdk_attempts = 1
    #: Contract clauses this provider is known to break (test id word -> why): those tests run
    #: as strict xfail, so a fix shows up as XPASS and the entry must go.
    known_bugs: ClassVar[Mapping[str, str]] = {}
    #: Error statuses the service never answers, with the reason (their tests are skipped).
    never_answers: ClassVar[Mapping[int, str]] = {}

    def __init__(self, proxy: CountingProxy, env: dict[str, str]) -> None:
        self.proxy = proxy
        self.env = env

    def publish(self, files: Mapping[str, bytes]) -> Published:
        raise NotImplementedError

    def missing_uri(self, published: Published) -> str:
        """A URI of this backend's form that names nothing (next to ``published``)."""
        raise NotImplementedError

    def error(self, status: int, retry_after: str | None = None, **match: object) -> Fault:
        """A proxy fault answering ``status`` the way the service does."""
        raise NotImplementedError

    #: Why the local server cannot be made to refuse a client (its real-denial test is skipped).
    cannot_deny = ""
    #: Why content is fetched whole by the listing (OCI layers): the tests that fault or count
    #: the reads after a listing, or count content bytes as file bytes, are skipped.
    content_in_listing = ""

    def denied(self, files: Mapping[str, bytes]) -> tuple[str, dict[str, str]]:
        """A URI and environment the *server itself* refuses (no proxy fault): a private
        location without the credential, or a wrong key."""
        raise NotImplementedError

    def use(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Make this process's environment exactly the child's (``clean_env(self.env)``), for
        providers opened in process."""
        wanted = clean_env(self.env)
        for name in list(os.environ):
            if name not in wanted:
                monkeypatch.delenv(name)
        for name, value in wanted.items():
            monkeypatch.setenv(name, value)


def error_headers(retry_after: str | None, **more: str) -> dict[str, str]:
    return {**more, **({"Retry-After": retry_after} if retry_after is not None else {})}


# -- S3 (moto) -----------------------------------------------------------------------------


class S3(Backend):
    name = "s3"
    sdk_attempts = 2  # botocore retries once with S3_MAX_ATTEMPTS=1, as the stock initializer
    never_answers: ClassVar[Mapping[int, str]] = {
        401: "S3 answers bad keys and signatures with 403, never 401"
    }
    CODES: ClassVar[dict[int, str]] = {
        401: "AccessDenied",
        403: "AccessDenied",
        404: "NoSuchKey",
        429: "SlowDown",
    }

    def __init__(self, server: S3Server, proxy: CountingProxy) -> None:
        env = {
            **server.env(endpoint=proxy.url),
            "S3_MAX_ATTEMPTS": "1",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        super().__init__(proxy, env)
        self.server = server

    def publish(self, files: Mapping[str, bytes]) -> Published:
        bucket = self.server.new_bucket({f"m/{k}": v for k, v in files.items()})
        return Published(
            f"s3://{bucket}/m",
            dict(files),
            f"/{bucket}/m/",
            lambda path, data: self.server.upload(bucket, {f"m/{path}": data}),
        )

    cannot_deny = "moto accepts any credentials and has no bucket policies enforced"

    def missing_uri(self, published: Published) -> str:
        return published.uri.rsplit("/", 1)[0] + "/no-such-model"

    def error(self, status: int, retry_after: str | None = None, **match: object) -> Fault:
        code = self.CODES.get(status, "InternalError")
        headers = error_headers(retry_after)
        return s3_error(code, f"injected {status}", status=status, headers=headers, **match)


# -- GCS (fake-gcs-server) ----------------------------------------------------------------


class Gcs(Backend):
    name = "gcs"
    cannot_deny = "fake-gcs-server checks no credentials"
    REASONS: ClassVar[dict[int, str]] = {
        401: "required",
        403: "forbidden",
        404: "notFound",
        429: "rateLimitExceeded",
    }

    def __init__(self, server: GcsServer, proxy: CountingProxy) -> None:
        super().__init__(proxy, server.env(endpoint=proxy.url))
        self.server = server

    def publish(self, files: Mapping[str, bytes]) -> Published:
        bucket = self.server.new_bucket({f"m/{k}": v for k, v in files.items()})
        return Published(
            f"gs://{bucket}/m",
            dict(files),
            f"/download/storage/v1/b/{bucket}/o/",
            lambda path, data: self.server.upload(bucket, {f"m/{path}": data}),
        )

    def missing_uri(self, published: Published) -> str:
        return published.uri.rsplit("/", 1)[0] + "/no-such-model"

    def error(self, status: int, retry_after: str | None = None, **match: object) -> Fault:
        reason = self.REASONS.get(status, "backendError")
        body = {"error": {"code": status, "message": f"injected {status}", "errors": [{}]}}
        body["error"]["errors"][0]["reason"] = reason  # type: ignore[index]
        headers = error_headers(retry_after, **{"Content-Type": "application/json"})
        return Fault(status=status, body=json.dumps(body).encode(), headers=headers, **match)  # type: ignore[arg-type]


# -- Azure Blob (Azurite) -------------------------------------------------------------------


class AzureBlob(Backend):
    name = "azure-blob"
    CODES: ClassVar[dict[int, str]] = {
        401: "NoAuthenticationInformation",
        403: "AuthorizationFailure",
        404: "BlobNotFound",
        429: "TooManyRequests",
    }

    def __init__(self, server: Azurite, proxy: CountingProxy) -> None:
        super().__init__(proxy, server.env(endpoint=f"{proxy.url}/{server.account}"))
        self.server = server

    def publish(self, files: Mapping[str, bytes]) -> Published:
        container = self.server.new_container_name("conform")
        self.server.upload(container, {f"m/{k}": v for k, v in files.items()})
        return Published(
            self.server.uri(container, "m"),
            dict(files),
            f"/{container}/m/",
            lambda path, data: self.server.upload(container, {f"m/{path}": data}),
        )

    def missing_uri(self, published: Published) -> str:
        return published.uri.rsplit("/", 1)[0] + "/no-such-model"

    def denied(self, files: Mapping[str, bytes]) -> tuple[str, dict[str, str]]:
        """Azurite refuses a request signed with another account key (403)."""
        wrong = base64.b64encode(b"not-the-account-key-" * 3).decode()
        return self.publish(files).uri, {**self.env, "AZURE_STORAGE_ACCESS_KEY": wrong}

    def error(self, status: int, retry_after: str | None = None, **match: object) -> Fault:
        code = self.CODES.get(status, "InternalError")
        body = f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code></Error>'
        headers = error_headers(
            retry_after, **{"x-ms-error-code": code, "Content-Type": "application/xml"}
        )
        return Fault(status=status, body=body.encode(), headers=headers, **match)  # type: ignore[arg-type]


# -- plain HTTP (nginx) ---------------------------------------------------------------------


class Http(Backend):
    name = "http"
    one_file = True

    def __init__(self, server: Nginx, proxy: CountingProxy) -> None:
        super().__init__(proxy, {})
        self.server = server

    def publish(self, files: Mapping[str, bytes]) -> Published:
        (name, data), *rest = files.items()
        assert not rest, "an HTTP URI names one file"
        folder = self.server.new_dir()
        self.server.put(f"{folder}/{name}", data)
        return Published(
            f"{self.proxy.url}/{folder}/{name}", dict(files), f"/{folder}/", self._replacer(folder)
        )

    def _replacer(self, folder: str) -> Callable[[str, bytes], None]:
        def replace(path: str, data: bytes) -> None:
            """As an upload does: a new file renamed over the old one, with a later mtime
            (nginx's ETag and Last-Modified are mtime and size)."""
            target = self.server.docroot / folder / path
            before = target.stat().st_mtime
            fresh = target.with_name(target.name + ".upload")
            fresh.write_bytes(data)
            os.utime(fresh, (before + 10, before + 10))
            os.replace(fresh, target)

        return replace

    def missing_uri(self, published: Published) -> str:
        return published.uri.rsplit("/", 1)[0] + "/no-such-model.bin"

    def denied(self, files: Mapping[str, bytes]) -> tuple[str, dict[str, str]]:
        """nginx's ``/private/`` location answers 401 without its bearer token."""
        published = self.publish(files)
        folder = published.content_path.strip("/")
        name = next(iter(files))
        return f"{self.proxy.url}/private/{folder}/{name}", self.env

    def error(self, status: int, retry_after: str | None = None, **match: object) -> Fault:
        more = {"Content-Type": "text/html"}
        if status == 401:
            more["WWW-Authenticate"] = 'Bearer realm="models"'
        body = f"<html><body><h1>{status}</h1></body></html>".encode()
        return Fault(status=status, body=body, headers=error_headers(retry_after, **more), **match)  # type: ignore[arg-type]


# -- WebHDFS ----------------------------------------------------------------------------------


class ProxyPair:
    """Two counting proxies seen as one: WebHDFS's namenode answers metadata and redirects each
    read to a datanode (another port), so each gets a proxy; faults apply to both, counts merge."""

    def __init__(self, namenode: CountingProxy, datanode: CountingProxy) -> None:
        self.pair = (namenode, datanode)
        self.url = namenode.url

    def set_faults(self, *faults: Fault) -> None:
        for proxy in self.pair:
            proxy.set_faults(*faults)

    def select(self, **criteria: Any) -> list[RequestRecord]:
        return [r for proxy in self.pair for r in proxy.select(**criteria)]

    def count(self, **criteria: Any) -> int:
        return len(self.select(**criteria))


class WebHdfsBackend(Backend):
    name = "webhdfs"
    pins = "refuses"
    EXCEPTIONS: ClassVar[dict[int, str]] = {
        401: "SecurityException",
        403: "AccessControlException",
        404: "FileNotFoundException",
    }

    def __init__(self, server: WebHdfs, proxy: ProxyPair, home: Path) -> None:
        secrets = home / "hdfscreds"
        secrets.mkdir(parents=True, exist_ok=True)
        (secrets / "HDFS_NAMENODE").write_text(proxy.url)
        env = {"HDFS_SECRET_DIR": str(secrets), "NO_PROXY": "127.0.0.1,localhost"}
        super().__init__(proxy, env)  # type: ignore[arg-type]
        self.server = server

    def publish(self, files: Mapping[str, bytes]) -> Published:
        root = f"conform-{uuid.uuid4().hex[:10]}"
        self.server.put_tree(f"/{root}", files)
        return Published(
            f"hdfs://{root}",
            dict(files),
            f"{PREFIX}/{root}/",
            lambda path, data: self.server.put(f"/{root}/{path}", data),
            content_query="namenoderpcaddress=",  # the datanode's read, not the redirect
        )

    def missing_uri(self, published: Published) -> str:
        return published.uri + "-no-such-model"

    def denied(self, files: Mapping[str, bytes]) -> tuple[str, dict[str, str]]:
        """Hadoop's permission check: the directory readable by another user only (403)."""
        published = self.publish(files)
        self.server.restrict(published.uri.removeprefix("hdfs://"), ("someone-else",))
        return published.uri, self.env

    def error(self, status: int, retry_after: str | None = None, **match: object) -> Fault:
        exception = self.EXCEPTIONS.get(status, "IOException")
        body = {"RemoteException": {"exception": exception, "message": f"injected {status}"}}
        more = {"Content-Type": "application/json"}
        return Fault(
            status=status,
            body=json.dumps(body).encode(),
            headers=error_headers(retry_after, **more),
            **match,  # type: ignore[arg-type]
        )
