"""A lean ranged GET for Azure Blob: the SDK authorises, one plain HTTP connection per worker reads.

A download through the Azure SDK's pipeline costs several hundred microseconds of Python per
request (a new blob client with its pipeline, a dozen policies, the requests/urllib3 stack) and
copies every block on its way out; on KServe's 1-CPU limit that made this tool spend more CPU
than the stock initializer (docs/performance.md). Here the SDK keeps what it is good at: the
container client's URL (endpoint, path-style Azurite or private endpoints, quoting), its API
version and User-Agent, the credential (SAS in the URI, account key, token credential) and the
error semantics; the request itself goes through :mod:`lean_http` (one keep-alive
``http.client`` connection per worker thread) and the body is read in ``read_size`` blocks.

Authorisation per credential mode (azure_credentials.select_credential):

- a SAS in the URI: its query on every URL;
- an account key: a read-only container SAS signed by the SDK's ``generate_container_sas``,
  valid for an hour and renewed every five minutes. One SAS per container, not one per blob:
  ``generate_blob_sas`` costs 0.1 ms a blob (measured), which is the per-file overhead this
  module exists to remove, and every SAS is registered for redaction (thousands would slow
  every log line). The SAS is read-only and scoped to the container the listing already reads;
- a token credential (service principal, workload identity): ``Authorization: Bearer`` from
  ``get_token`` of the storage scope, shared by all workers and renewed before it expires;
- anonymous: nothing.

Every GET carries ``If-Match`` with the listed ETag, as on the SDK path: a blob replaced during
the pull answers 412, a :class:`SourceChangedError`. Error answers become the azure-core
exceptions the SDK raises (with the ``x-ms-error-code``) and go through the provider's mapper
(azure_errors.translate), so messages, hints and Retry-After are the SDK path's; a broken or
short body is a :class:`TransientError` (the engine resumes the chunk).

Not used (the SDK path is) behind an HTTP(S) proxy, or with ``STORAGE_INITIALIZER_AZURE_LEAN``
false.
"""

from __future__ import annotations

import datetime
import email.utils
import http.client
import os
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

from storage_initializer.errors import InitializerError
from storage_initializer.providers import lean_http
from storage_initializer.providers.azure_common import (
    CONNECT_TIMEOUT,
    READ_TIMEOUT,
    AzureLocation,
)
from storage_initializer.providers.azure_credentials import register_sas
from storage_initializer.providers.httpcommon import USER_AGENT

ENV = "STORAGE_INITIALIZER_AZURE_LEAN"
#: Generated SAS tokens live this long; a new one is signed well before (URL_REUSE).
SAS_EXPIRES = 3600
SAS_REUSE = 300.0
#: A bearer token is renewed when it has less than this left (the SDK's policy uses 300 s too).
TOKEN_MARGIN = 300.0
STORAGE_SCOPE = "https://storage.azure.com/.default"

MapError = Callable[[BaseException, str], InitializerError]


def wanted() -> bool:
    """Whether the lean path is asked for (default yes)."""
    return lean_http.wanted(ENV)


def reader(
    client: Any, credential: Any, location: AzureLocation, map_error: MapError
) -> LeanReader | None:
    """The lean reader of a container client's blobs or a share client's files; None when the
    SDK path is to be used (switched off, or the environment routes the endpoint through a
    proxy)."""
    if not wanted() or lean_http.proxied(location.endpoint):
        return None
    share = hasattr(client, "share_name")
    timeouts = (float(CONNECT_TIMEOUT), float(READ_TIMEOUT))
    return LeanReader(client, credential, location.account, _verify(), timeouts, map_error, share)


def _verify() -> bool | str:
    """The trust the SDK's transport (requests) has: the global bundle when one is mounted,
    else ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE``, else the default store."""
    from storage_initializer.tls import combined_bundle

    bundle = combined_bundle()
    if bundle:
        return bundle
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return True


class _Auth:
    """The query or header that authorises a GET, per credential mode; thread-safe."""

    def __init__(self, credential: Any, account: str, container: str, share: bool = False) -> None:
        self.credential = credential
        self.account = account
        #: The container, or the share when ``share``.
        self.container = container
        self.share = share
        self._lock = threading.Lock()
        self._query = ""
        self._until = 0.0  # monotonic time when the cached query or token must be renewed
        self._token = ""
        if isinstance(credential, str):
            self._query = credential.lstrip("?")
            self._until = float("inf")
        elif credential is None:
            self._until = float("inf")
        self.token = hasattr(credential, "get_token")

    def query(self) -> str:
        """The query string to append ("" when none)."""
        if self._until > time.monotonic():
            return self._query
        if self.token:
            return ""
        with self._lock:
            if self._until <= time.monotonic():
                self._query = self._account_sas()
                self._until = time.monotonic() + SAS_REUSE
            return self._query

    def _account_sas(self) -> str:
        """A read-only SAS of the container (or share), signed with the account key."""
        key = self.credential["account_key"]
        account = self.credential.get("account_name") or self.account
        expiry = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=SAS_EXPIRES)
        sas: str
        if self.share:
            from azure.storage.fileshare import ShareSasPermissions, generate_share_sas

            permission: Any = ShareSasPermissions(read=True)
            sas = generate_share_sas(
                account, self.container, key, permission=permission, expiry=expiry
            )
        else:
            from azure.storage.blob import ContainerSasPermissions, generate_container_sas

            permission = ContainerSasPermissions(read=True)
            sas = generate_container_sas(
                account, self.container, account_key=key, permission=permission, expiry=expiry
            )
        register_sas(sas)
        return sas

    def bearer(self) -> str | None:
        """``Authorization`` for a token credential, None for the other modes."""
        if not self.token:
            return None
        if self._until > time.monotonic():
            return self._token
        with self._lock:
            if self._until <= time.monotonic():
                got = self.credential.get_token(STORAGE_SCOPE)
                left = float(got.expires_on) - time.time()
                self._token = f"Bearer {got.token}"
                self._until = time.monotonic() + max(0.0, left - TOKEN_MARGIN)
            return self._token


class LeanReader:
    """Ranged GETs of one container's blobs (pinned to the listed ETag), or of one share's
    files (``share``: Azure Files has no conditional reads; tokens carry the backup intent)."""

    def __init__(
        self,
        client: Any,
        credential: Any,
        account: str,
        verify: bool | str,
        timeouts: tuple[float, float],
        map_error: MapError,
        share: bool = False,
    ) -> None:
        #: ``<scheme>://<host>[/<account>]/<container>`` as the SDK quotes it, without a query.
        self.base = str(client.url).partition("?")[0]
        name = client.share_name if share else client.container_name
        self.auth = _Auth(credential, account, name, share)
        self.share = share
        self.api_version = str(client.api_version)
        policy = getattr(getattr(client, "_config", None), "user_agent_policy", None)
        sdk = str(getattr(policy, "user_agent", "") or "")
        #: The SDK's User-Agent and ours: server logs see the SDK, tests see the lean path.
        self.user_agent = f"{sdk} {USER_AGENT}".strip()
        self.connections = lean_http.Connections(verify, *timeouts)
        self.map_error = map_error

    def url(self, name: str) -> str:
        """The object's URL as the SDK's blob (file) client forms it, with the credential's
        query (the file client quotes each segment with ``safe="~"``: the same text)."""
        query = self.auth.query()
        url = f"{self.base}/{quote(name, safe='~/')}"
        return f"{url}?{query}" if query else url

    def read(
        self,
        name: str,
        etag: str,
        start: int,
        end: int | None,
        whole: bool,
        block: int,
        where: str,
    ) -> Iterator[bytes]:
        headers = {
            "Accept-Encoding": "identity",  # bytes as stored: sizes and Content-MD5 match
            "User-Agent": self.user_agent,
            "x-ms-version": self.api_version,
            "x-ms-date": email.utils.formatdate(usegmt=True),
        }
        if not whole:
            headers["x-ms-range"] = lean_http.range_header(start, end)
        if etag and not self.share:  # every range from the listed version, or a 412
            headers["If-Match"] = f'"{etag}"'
        try:
            url = self.url(name)
            bearer = self.auth.bearer()
        except Exception as exc:  # a token or SAS that cannot be had: the SDK's error mapping
            raise self.map_error(exc, where) from None
        if bearer is not None:
            headers["Authorization"] = bearer
            if self.share:
                headers["x-ms-file-request-intent"] = "backup"  # required for OAuth on files
        try:
            answer = self.connections.get(url, headers)
        except (OSError, http.client.HTTPException) as exc:
            raise self.map_error(_connection_error(exc), where) from None
        if answer.status not in (200, 206):
            raise self.map_error(_response_error(answer), where)
        yield from lean_http.ranged_body(answer, start, end, whole, block, where)

    def close(self) -> None:
        """Close the calling thread's connections (the others close with their threads)."""
        self.connections.close()


def _connection_error(exc: BaseException) -> BaseException:
    """The azure-core exception the SDK's transport raises for ``exc``: no connection made
    (ServiceRequestError: "cannot reach"), or one that failed mid-way (ServiceResponseError).
    A TLS failure stays itself: the mapper names its reason."""
    from azure.core.exceptions import ServiceRequestError, ServiceResponseError

    if isinstance(exc, ssl.SSLError):
        return exc
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ConnectionRefusedError | socket.gaierror):
        return ServiceRequestError(text, error=exc)
    return ServiceResponseError(text, error=exc)


class _ErrorResponse:
    """The parts of an error answer azure-core's exceptions and our mapper read."""

    def __init__(self, status: int, reason: str, headers: dict[str, str], body: bytes) -> None:
        from azure.core.utils import CaseInsensitiveDict

        self.status_code = status
        self.reason = reason
        self.headers = CaseInsensitiveDict(headers)
        self.body = body
        self.content_type = self.headers.get("Content-Type")

    def text(self, encoding: str | None = None) -> str:
        return self.body.decode(encoding or "utf-8", "replace")


def _response_error(answer: lean_http.Answer) -> BaseException:
    """The exception the SDK raises for an error answer: the class azure-core maps the status
    to, with the service's error code (header, else the XML body) as ``error_code``."""
    from azure.core import exceptions as core

    status = answer.status
    headers, body = lean_http.error_answer(answer)
    code = headers.get("x-ms-error-code", "") or _xml_code(body)
    kinds: dict[int, type[core.HttpResponseError]] = {
        401: core.ClientAuthenticationError,
        404: core.ResourceNotFoundError,
        409: core.ResourceExistsError,
        412: core.ResourceModifiedError,
    }
    response = _ErrorResponse(status, answer.response.reason, headers, body)
    error = kinds.get(status, core.HttpResponseError)(
        message=f"Operation returned an invalid status '{answer.response.reason}'",
        response=response,  # type: ignore[arg-type]
    )
    error.error_code = code  # type: ignore[attr-defined]  # as the storage SDK sets it
    return error


def _xml_code(body: bytes) -> str:
    try:
        return ElementTree.fromstring(body).findtext("Code") or ""
    except ElementTree.ParseError:
        return ""
