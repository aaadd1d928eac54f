"""Translating Azure SDK (azure-core) exceptions of Blob and File share requests into our errors:
access denied (naming the credential mode tried), not found, changed since listed, untrusted TLS
certificate, unreachable endpoint, throttling; each message redacted, one line.

Its own module because error mapping is one job shared by azure_blob and azure_file. TLS failure
detection is :mod:`storage_initializer.tls`'s, which the retry policy in :mod:`azure_common`
asks too.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from storage_initializer.errors import (
    AccessDeniedError,
    InitializerError,
    NotFoundError,
    SourceChangedError,
    SourceError,
    TransientError,
)
from storage_initializer.providers import httpcommon
from storage_initializer.redact import redact
from storage_initializer.tls import is_tls_failure, tls_reason

if TYPE_CHECKING:
    from storage_initializer.providers.azure_common import AzureLocation

#: Error codes that mean "try again later" even when the status is not 5xx/429.
TRANSIENT_CODES = frozenset(
    {"ServerBusy", "OperationTimedOut", "InternalError", "ServiceUnavailable", "IncrementalCopy"}
)
_URL_IN_MESSAGE = re.compile(r"url: \S+")
#: Retries of each listing request by the SDK's own policy (reads: none, the engine retries).
SDK_RETRIES = 2


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


def _short(exc: BaseException) -> str:
    """The first line of an SDK message, redacted: the rest repeats headers and XML bodies."""
    text = str(exc).strip().splitlines()
    if not text:
        return type(exc).__name__
    # requests names the full request URL (query included) in connection errors: drop it.
    return redact(_URL_IN_MESSAGE.sub("url: …", text[0])[:300])
