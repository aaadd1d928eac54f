"""What Azure Blob and Azure File share sources have in common: URI parts, credentials, the HTTP
pipeline, path rules and the translation of SDK exceptions into our errors.

The credential order and the environment variables are the stock KServe initializer's, so a pod
spec written for it keeps working: a SAS token in the URI, then a service principal or workload
identity (``AZURE_CLIENT_ID`` …, with the legacy ``AZ_*`` names copied over) through
``DefaultAzureCredential``, then the account key ``AZURE_STORAGE_ACCESS_KEY``, then anonymous.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from storage_initializer.blocks import BLOCK
from storage_initializer.errors import (
    AccessDeniedError,
    InitializerError,
    NotFoundError,
    SourceChangedError,
    SourceError,
    TransientError,
    UsageError,
)
from storage_initializer.providers import httpcommon
from storage_initializer.redact import redact, register_secret
from storage_initializer.uri import SourceUri

log = logging.getLogger(__name__)

#: Legacy names the stock initializer accepts; copied to the names azure-identity reads.
LEGACY_ENV = ("CLIENT_ID", "TENANT_ID", "CLIENT_SECRET", "SUBSCRIPTION_ID")
#: Size of one GET inside a range. The SDK buffers one such piece per request, so with N workers
#: the SDK holds at most N x this in memory, whatever the engine's chunk size.
GET_PIECE = 4 * 1024 * 1024
#: Blocks in which a streamed body is handed to the engine (see client_options).
#: Connection pool per client: enough for the engine's workers plus listing.
POOL_SIZE = 64
CONNECT_TIMEOUT = 20
READ_TIMEOUT = 120
#: Error codes that mean "try again later" even when the status is not 5xx/429.
TRANSIENT_CODES = frozenset(
    {"ServerBusy", "OperationTimedOut", "InternalError", "ServiceUnavailable", "IncrementalCopy"}
)


_URL_IN_MESSAGE = re.compile(r"url: \S+")
#: Retries of each listing request by the SDK's own policy (reads: none, the engine retries).
SDK_RETRIES = 2


@dataclass(frozen=True)
class AzureLocation:
    """The parts of an Azure storage URI."""

    account: str
    #: Container (blob) or share (file).
    container: str
    #: Blob-name prefix or directory path, without leading or trailing slashes, URL-decoded.
    prefix: str
    #: Whether the URI ended with "/": then the prefix can only be a directory.
    directory_only: bool
    #: The SAS query string (without "?"), or "" when the URI carries none.
    sas: str
    #: Where requests go: ``https://<host>`` or the override from the environment.
    endpoint: str
    #: Whether ``endpoint`` came from the environment (named in error messages).
    endpoint_overridden: bool


def parse_location(uri: SourceUri, endpoint_env: str, what: str) -> AzureLocation:
    """Split ``https://<acct>.<host>/<container>/<prefix>[?sas]`` and register the SAS as secret.

    The path is URL-decoded: ``my%20model`` names the blob ``my model``, as a browser would read
    it (the stock initializer passes the escaped text through, which never matches).
    """
    parts = urlsplit(uri.raw)
    host = parts.netloc.rpartition("@")[2]
    account = host.split(".", 1)[0]
    segments = parts.path.lstrip("/").split("/", 1)
    container = unquote(segments[0])
    if not container:
        raise UsageError(
            f"{uri.redacted} names no {what}",
            f"Write it as https://{host}/<{what}>/<path>",
        )
    raw_prefix = unquote(segments[1]) if len(segments) > 1 else ""
    prefix = raw_prefix.strip("/")
    sas = parts.query
    if sas:
        register_sas(sas)
    override = os.environ.get(endpoint_env, "").strip()
    endpoint = override.replace("{account}", account).rstrip("/") if override else f"https://{host}"
    return AzureLocation(
        account=account,
        container=container,
        prefix=prefix,
        directory_only=bool(prefix) and raw_prefix.endswith("/"),
        sas=sas,
        endpoint=endpoint,
        endpoint_overridden=bool(override),
    )


def register_sas(sas: str) -> None:
    """Mask a SAS token wherever it may show up: whole, and its signature in both encodings."""
    register_secret(sas)
    register_secret(unquote(sas))
    for key, value in parse_qsl(sas, keep_blank_values=True):
        if key == "sig":
            register_secret(value)
            register_secret(quote(value, safe=""))


def copy_legacy_env() -> None:
    """Copy ``AZ_CLIENT_ID`` & co. to ``AZURE_*`` where those are unset (azure-identity reads
    only the latter). Unlike the stock initializer we never overwrite a value the user set."""
    for name in LEGACY_ENV:
        legacy = os.environ.get(f"AZ_{name}")
        if legacy and not os.environ.get(f"AZURE_{name}"):
            os.environ[f"AZURE_{name}"] = legacy


def select_credential(location: AzureLocation) -> tuple[Any, str]:
    """The credential for a client and a name for the log: ``(credential, mode)``.

    Order: SAS in the URI; service principal / workload identity when ``AZURE_CLIENT_ID`` is set
    (after copying the legacy names); account key; anonymous.
    """
    if location.sas:
        return location.sas, "SAS token from the URI"
    copy_legacy_env()
    if os.environ.get("AZURE_CLIENT_ID"):
        register_secret(os.environ.get("AZURE_CLIENT_SECRET"))
        from azure.identity import DefaultAzureCredential

        return DefaultAzureCredential(), "DefaultAzureCredential (AZURE_CLIENT_ID)"
    key = os.environ.get("AZURE_STORAGE_ACCESS_KEY")
    if key:
        register_secret(key)
        return (
            {"account_name": location.account, "account_key": key},
            "account key (AZURE_STORAGE_ACCESS_KEY)",
        )
    return None, "anonymous (no SAS, AZURE_CLIENT_ID or AZURE_STORAGE_ACCESS_KEY)"


def client_options(retry_class: Any) -> dict[str, Any]:
    """Keyword arguments for every SDK client: our transport, timeouts, TLS trust, retries.

    The SDK's own retries are kept short (the engine retries byte ranges itself, and a pod that
    cannot reach its endpoint should say so in seconds, not after the SDK's minutes of backoff).
    """
    import requests
    from azure.core.pipeline.transport import RequestsTransport

    from storage_initializer.tls import combined_bundle

    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=POOL_SIZE)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    options: dict[str, Any] = {
        "transport": RequestsTransport(
            session=session,
            session_owner=True,
            connection_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            # The transport, not the client, decides how a streamed body is cut: azure-core's
            # default is 4 KiB, i.e. a Python round trip (and a pwrite) for every 4 KiB.
            connection_data_block_size=BLOCK,
        ),
        "retry_policy": _without_tls_retries(retry_class)(
            initial_backoff=0.5,
            increment_base=2,
            retry_total=SDK_RETRIES,
            random_jitter_range=1,
        ),
        "max_single_get_size": GET_PIECE,
        "max_chunk_get_size": GET_PIECE,
        "connection_timeout": CONNECT_TIMEOUT,
        "read_timeout": READ_TIMEOUT,
    }
    bundle = combined_bundle()
    if bundle:
        options["connection_verify"] = bundle
    return options


def _without_tls_retries(retry_class: Any) -> Any:
    """``retry_class`` (the SDK's storage retry policy) that gives up at once on a TLS failure:
    the SDK counts it as a connection error and backs off, but a certificate nobody trusts is
    not trusted by asking again."""

    class NoTlsRetry(retry_class):  # type: ignore[misc, valid-type]
        def increment(
            self, settings: Any, request: Any, response: Any = None, error: Any = None
        ) -> bool:
            if error is not None and is_tls_failure(error):
                return False
            return bool(super().increment(settings, request, response=response, error=error))

    return NoTlsRetry


def client_refused(exc: ValueError, where: str, location: AzureLocation, mode: str) -> UsageError:
    """The SDK refuses some combinations before any request, e.g. a token over plain HTTP."""
    return UsageError(
        redact(f"{where}: cannot use endpoint {location.endpoint} with {mode}: {exc}"),
        "Token credentials (AZURE_CLIENT_ID) need an https:// endpoint; check the endpoint "
        "override variables, or use a SAS token or AZURE_STORAGE_ACCESS_KEY",
    )


def safe_relative_path(name: str, what: str) -> str:
    """A path relative to the model directory, or SourceError if it could escape it.

    Empty segments are dropped ("a//b" is "a/b"); "." and ".." are refused rather than guessed at.
    """
    segments = [segment for segment in name.split("/") if segment]
    if not segments or any(segment in (".", "..") for segment in segments):
        raise SourceError(
            f"{what} {redact(name)!r} cannot be stored as a file below the model directory",
            "Rename the object: its name must not be empty or contain '.' or '..' segments",
        )
    return "/".join(segments)


def check_layout(paths: Iterable[str], where: str) -> None:
    """Refuse listings that no directory can hold: one path twice, or a file that is also a
    directory ("a" and "a/b", possible in flat blob namespaces)."""
    seen: set[str] = set()
    for path in paths:
        if path in seen:
            raise SourceError(f"{where}: two objects map to the same file {path!r}")
        seen.add(path)
    for path in seen:
        parent = path.rpartition("/")[0]
        while parent:
            if parent in seen:
                raise SourceError(
                    f"{where}: {parent!r} is both a file and a directory",
                    "Remove or rename one of them, or point the URI at a narrower prefix",
                )
            parent = parent.rpartition("/")[0]


def md5_hex(value: Any) -> str | None:
    """Content-MD5 as the SDK returns it (bytearray, bytes or base64 text) to lowercase hex."""
    if not value:
        return None
    if isinstance(value, bytes | bytearray):
        data = bytes(value)
    else:
        import base64

        try:
            data = base64.b64decode(str(value), validate=True)
        except ValueError:
            return None
    return data.hex() if len(data) == 16 else None


def _status(exc: Any) -> int | None:
    status = getattr(exc, "status_code", None)
    if status is None and getattr(exc, "response", None) is not None:
        status = getattr(exc.response, "status_code", None)
    return status


def _error_code(exc: Any) -> str:
    """The service's error code: the SDK's ``error_code``, else the ``x-ms-error-code`` header
    (the operation layer's streamed GET raises without parsing it)."""
    code = getattr(exc, "error_code", None) or ""
    code = str(getattr(code, "value", code))  # the SDK gives StorageErrorCode enums or text
    if not code:
        headers = getattr(getattr(exc, "response", None), "headers", None) or {}
        code = str(headers.get("x-ms-error-code", "") if hasattr(headers, "get") else "")
    return code


def _retry_after(exc: Any) -> float | None:
    return httpcommon.retry_after(getattr(getattr(exc, "response", None), "headers", None))


def translate(
    exc: BaseException,
    what: str,
    location: AzureLocation,
    *,
    reading: bool,
    credentials: str = "",
) -> InitializerError:
    """Our error for an SDK exception. ``what`` is already redacted and names the object.

    ``reading``: whether this happened while streaming data (after a successful listing). Then an
    unreachable endpoint is a blip worth retrying; during listing it is a configuration error.
    ``credentials`` names the credential mode, so an access error says what was tried.
    """
    from azure.core.exceptions import (
        AzureError,
        ClientAuthenticationError,
        HttpResponseError,
        IncompleteReadError,
        ResourceExistsError,
        ResourceModifiedError,
        ResourceNotFoundError,
        ServiceRequestError,
        ServiceResponseError,
    )

    if isinstance(exc, InitializerError):
        return exc
    # The SDK can fail while building its own error (a TypeError on an error body without
    # <Message>, for one): the service's answer is an exception being handled at the time.
    cause: BaseException | None = exc
    for _ in range(8):
        if cause is None or isinstance(cause, AzureError):
            break
        cause = cause.__context__
    if isinstance(cause, AzureError):
        exc = cause
    status = _status(exc)
    code = _error_code(exc)
    detail = f"HTTP {status} {code}".strip() if status else type(exc).__name__
    if isinstance(exc, ClientAuthenticationError) or status in (401, 403):
        using = f" with {credentials}" if credentials else ""
        return AccessDeniedError(
            redact(f"{what}: access denied ({detail}){using}"),
            "Check the SAS token (permissions r and l, expiry), AZURE_STORAGE_ACCESS_KEY, or the "
            "role assignment (Storage Blob Data Reader / Storage File Data Privileged Reader) of "
            "AZURE_CLIENT_ID",
        )
    if isinstance(exc, ResourceNotFoundError) or status == 404:
        return NotFoundError(redact(f"{what}: not found ({detail})"))
    if isinstance(exc, ResourceModifiedError) or status == 412:
        # Reads are pinned (If-Match the listed ETag): the pull lists again and fetches anew.
        return SourceChangedError(
            redact(f"{what}: the object changed while it was being downloaded ({detail})")
        )
    if isinstance(exc, ServiceRequestError | ServiceResponseError | OSError) and is_tls_failure(
        exc
    ):
        # An untrusted certificate is not a network problem, and asking again will not help.
        return SourceError(
            redact(f"{what}: TLS verification of {location.endpoint} failed ({tls_reason(exc)})"),
            "Add the CA that signed the endpoint's certificate to the global CA bundle "
            "(CA_BUNDLE_CONFIGMAP_NAME) or REQUESTS_CA_BUNDLE",
        )
    if isinstance(exc, ServiceRequestError):
        endpoint = location.endpoint + (
            " (from the endpoint override)" if location.endpoint_overridden else ""
        )
        message = redact(f"{what}: cannot reach {endpoint}: {_short(exc)}")
        if reading:
            return TransientError(message)
        return SourceError(
            message,
            "Check the network policy, DNS or private endpoint, and AZURE_STORAGE_BLOB_ENDPOINT / "
            "AZURE_STORAGE_FILE_ENDPOINT if set",
        )
    if isinstance(exc, ServiceResponseError | IncompleteReadError):
        return TransientError(redact(f"{what}: connection failed mid-response: {_short(exc)}"))
    if isinstance(exc, HttpResponseError):
        if status is None or status >= 500 or status in (408, 429) or code in TRANSIENT_CODES:
            if reading:  # the engine retries, and says when it gives up
                return TransientError(
                    redact(f"{what}: the service is busy or failing ({detail})"),
                    retry_after=_retry_after(exc),
                )
            return TransientError(
                redact(
                    f"{what}: the service is busy or failing ({detail}); gave up after "
                    f"{SDK_RETRIES + 1} attempts"
                ),
                "The storage account is throttling or failing: wait and run again (the pod "
                "retries the init container), and check the account's request rate and health",
                retry_after=_retry_after(exc),
            )
        if isinstance(exc, ResourceExistsError) or status in (400, 409, 416):
            return SourceError(redact(f"{what}: request refused ({detail})"))
        return SourceError(redact(f"{what}: request failed ({detail})"))
    if isinstance(exc, OSError | TimeoutError):
        return TransientError(redact(f"{what}: {_short(exc)}"))
    return SourceError(redact(f"{what}: {type(exc).__name__}: {_short(exc)}"))


_TLS_MARKERS = ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed", "SSLError", "[SSL")
_TLS_VERIFY_REASON = re.compile(r"certificate verify failed: ([^'\"()\]\[]+)")
_TLS_SSL_REASON = re.compile(r"\[SSL: ([A-Z_]+)\]")


def _chain(exc: BaseException) -> Iterable[BaseException]:
    """``exc`` and what it wraps: causes, contexts, azure-core's ``inner_exception``, urllib3's
    ``reason`` and exceptions held in ``args`` (requests wraps urllib3's MaxRetryError so)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo and len(seen) < 32:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        for linked in (
            current.__cause__,
            current.__context__,
            getattr(current, "inner_exception", None),
            getattr(current, "reason", None),
            *current.args,
        ):
            if isinstance(linked, BaseException):
                todo.append(linked)


def is_tls_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is (or wraps) a TLS handshake or certificate verification failure."""
    for item in _chain(exc):
        if isinstance(item, ssl.SSLError) or type(item).__name__ == "SSLError":
            return True
        if any(marker in str(item) for marker in _TLS_MARKERS):
            return True
    return False


def tls_reason(exc: BaseException) -> str:
    """The short reason of a TLS failure: "certificate verify failed: self-signed certificate"."""
    texts = [str(item) for item in _chain(exc)]
    for text in texts:
        verify = _TLS_VERIFY_REASON.search(text)
        if verify:
            return "certificate verify failed: " + verify.group(1).strip()
    for text in texts:
        other = _TLS_SSL_REASON.search(text)
        if other:
            return other.group(1)
    return "TLS handshake failed"


def _short(exc: BaseException) -> str:
    """The first line of an SDK message, redacted: the rest repeats headers and XML bodies."""
    text = str(exc).strip().splitlines()
    if not text:
        return type(exc).__name__
    # requests names the full request URL (query included) in connection errors: drop it.
    return redact(_URL_IN_MESSAGE.sub("url: …", text[0])[:300])
