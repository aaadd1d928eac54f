"""Mapping google-api-core, google-auth and requests failures of GCS requests to our errors: what
is retried, what is a wrong endpoint, what is access denied (and with which identity), what means
"the object changed since it was listed"; never a token in a message.

Its own module because error mapping is one job, shared by the listing and the reads of
:class:`~.gcs.GcsSource`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from http.client import HTTPException

import requests
import urllib3.exceptions as u3
from google.api_core import exceptions as gexc
from google.auth import exceptions as auth_exc
from google.auth.credentials import AnonymousCredentials
from google.auth.transport.requests import AuthorizedSession

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
from storage_initializer.providers.gcs_auth import CREDENTIALS_ENV, EMULATOR_ENV
from storage_initializer.redact import redact

_CONNECT_ERRORS = (
    u3.NewConnectionError,
    u3.ConnectTimeoutError,
    requests.exceptions.ConnectTimeout,
)
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
#: Errors while a body streams or a request is sent: the read can be retried.
_STREAM_ERRORS: tuple[type[BaseException], ...] = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
    u3.HTTPError,
    HTTPException,
    ConnectionError,
    TimeoutError,
)

_RETRYABLE_ERRORS = (*_STREAM_ERRORS, auth_exc.TransportError)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and everything it wraps (requests and urllib3 nest their reasons in ``args``)."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        stack.extend(arg for arg in getattr(item, "args", ()) if isinstance(arg, BaseException))
        reason = getattr(item, "reason", None)
        if isinstance(reason, BaseException):
            stack.append(reason)
        for linked in (item.__cause__, item.__context__):
            if linked is not None:
                stack.append(linked)


def is_connect_failure(exc: BaseException) -> bool:
    """Whether no connection could be opened at all (refused, unknown host, connect timeout):
    the endpoint is wrong or down, not merely busy."""
    return any(isinstance(item, _CONNECT_ERRORS) for item in _causes(exc))


def _connect_reason(exc: BaseException) -> str:
    """The short reason of a connection failure ("[Errno 111] Connection refused"), not urllib3's
    paragraph with the whole request URL."""
    for item in _causes(exc):
        if isinstance(item, u3.NewConnectionError | u3.ConnectTimeoutError):
            return redact(str(item).rpartition("): ")[2] or str(item))
    return redact(str(exc))


def _status_of(exc: BaseException) -> int:
    code = getattr(exc, "code", None)
    return code if isinstance(code, int) else 0


def _error_message(body: bytes) -> str:
    """The ``error.message`` of a JSON API error body, else its first line."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
        message = data.get("error", {}).get("message") if isinstance(data, dict) else None
        if message:
            return str(message)
    except ValueError:
        pass
    return text.splitlines()[0][:200] if text else ""


class GcsErrorMapping:
    """The error mapping of :class:`~.gcs.GcsSource`, as a mixin: messages name its bucket,
    endpoint and credentials, and a listing's retry deadline."""

    bucket: str
    endpoint: str
    session: AuthorizedSession
    _credentials_desc: str

    @property
    def list_retry_deadline(self) -> float:
        """Seconds a listing request is retried (GcsSource reads gcs.LIST_RETRY_DEADLINE)."""
        raise NotImplementedError

    def _status_error(
        self, response: requests.Response, where: str, generation: int | None
    ) -> InitializerError:
        try:
            body = next(response.iter_content(4096), b"")
        except _STREAM_ERRORS:
            body = b""
        return self._status_answer(response.status_code, response.headers, body, where, generation)

    def _status_answer(
        self,
        status: int,
        headers: Mapping[str, str],
        body: bytes,
        where: str,
        generation: int | None,
    ) -> InitializerError:
        """The error of a media GET answered ``status`` (not 200/206), from its headers (a
        case-insensitive mapping: Retry-After) and the start of its body; shared by the
        requests path and the lean one (:mod:`gcs_lean`), so both say the same."""
        detail = f"HTTP {status}" + (f": {redact(_error_message(body))}" if body else "")
        if status in _TRANSIENT_STATUS:
            return TransientError(
                f"{where}: GCS is overloaded or failing: {detail}",
                retry_after=httpcommon.retry_after(headers),
            )
        if status in (401, 403):
            return self._denied(where, detail)
        if status in (404, 412, 416):
            # Read pinned to the listed generation: 404 once that generation is replaced or
            # deleted. The pull lists again and fetches the new version whole.
            pinned = f" (generation {generation})" if generation else ""
            return SourceChangedError(
                f"{where}: the object{pinned} was replaced or deleted after it was listed: {detail}"
            )
        return SourceError(f"{where}: GCS error {detail}")

    # ------------------------------------------------------------------ errors

    def _denied(self, where: str, detail: str) -> AccessDeniedError:
        if isinstance(self.session.credentials, AnonymousCredentials):
            hint = (
                "The request was anonymous and the bucket is not public: give the pod "
                f"{CREDENTIALS_ENV} (KServe's GCS secret) or a Workload Identity service account"
            )
        else:
            hint = (
                f"We used {self._credentials_desc}; grant that identity roles/storage.objectViewer "
                f"(storage.objects.list and storage.objects.get) on gs://{self.bucket}"
            )
        return AccessDeniedError(f"{where}: access denied by GCS: {detail}", hint)

    def _map_error(self, exc: BaseException, where: str, listing: bool = True) -> InitializerError:
        """Turn a google-api-core/google-auth/requests failure into one of ours."""
        if isinstance(exc, InitializerError):
            return exc
        retried = ""
        if isinstance(exc, gexc.RetryError):
            retried = f" (still failing after retrying for {self.list_retry_deadline:g}s)"
            exc = exc.cause or exc
        text = redact(str(exc))
        if isinstance(exc, gexc.GoogleAPICallError):
            return self._map_api_error(exc, where, text, retried)
        if isinstance(exc, auth_exc.RefreshError):
            if getattr(exc, "retryable", False):
                return TransientError(f"{where}: could not refresh the GCS access token: {text}")
            return AccessDeniedError(
                f"{where}: {self._credentials_desc} were refused by Google: {text}",
                f"Check the key in {CREDENTIALS_ENV} (revoked or deleted key?) or the Workload "
                "Identity binding of the pod's service account",
            )
        if isinstance(exc, requests.exceptions.SSLError):
            return SourceError(
                f"{where}: TLS handshake with {self.endpoint} failed: {text}",
                "Add the CA that signed the endpoint's certificate to the global CA bundle "
                "(CA_BUNDLE_CONFIGMAP_NAME) or REQUESTS_CA_BUNDLE",
            )
        if is_connect_failure(exc):
            text = _connect_reason(exc)
            if listing:
                return SourceError(
                    f"{where}: cannot connect to the GCS endpoint {self.endpoint}: {text}",
                    f"Check {EMULATOR_ENV} or API_ENDPOINT_OVERRIDE if set, DNS, egress network "
                    "policies and proxies",
                )
            return TransientError(f"{where}: cannot connect to {self.endpoint}: {text}")
        if isinstance(exc, _RETRYABLE_ERRORS):
            return TransientError(f"{where}: connection to {self.endpoint} failed{retried}: {text}")
        return SourceError(f"{where}: GCS request failed: {type(exc).__name__}: {text}")

    def _map_api_error(
        self, exc: gexc.GoogleAPICallError, where: str, text: str, retried: str
    ) -> InitializerError:
        status = _status_of(exc)
        response = getattr(exc, "response", None)
        message = _error_message(getattr(response, "content", b"") or b"") or exc.message
        detail = f"HTTP {status}: {message}" if status else text
        detail = redact(detail)
        if status in _TRANSIENT_STATUS:
            headers = getattr(getattr(exc, "response", None), "headers", None)
            return TransientError(
                f"{where}: GCS is overloaded or failing{retried}: {detail}",
                retry_after=httpcommon.retry_after(headers),
            )
        if status in (401, 403):
            return self._denied(where, detail)
        if status == 404:
            return NotFoundError(f"{where}: bucket {self.bucket!r} does not exist: {detail}")
        if status == 400:
            return UsageError(f"{where}: GCS rejected the request: {detail}", "Check the URI")
        return SourceError(f"{where}: GCS error {detail}")
