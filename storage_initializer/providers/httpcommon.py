"""The HTTP layer shared by the providers that speak HTTP themselves (http, hf, oci, hdfs,
modelscope) and the Retry-After reading of the SDK-based ones (GCS, Azure).

Four things, each once, in the shape of huggingface_hub's ``utils/_http.py`` (``http_backoff``,
``hf_raise_for_status``) and pip's ``network/session.py``:

- :func:`retry_after`: a ``Retry-After`` header in either form (seconds or HTTP-date, parsed by
  urllib3), clamped to 0..:data:`MAX_RETRY_AFTER` seconds;
- :func:`status_error` / :func:`raise_for_status`: a table from HTTP status to the error a user
  can act on (401/403 denied, 404/410 not found, 408/429/5xx transient with the server's
  Retry-After, other 4xx refused); a provider words the message and may give a hint per status;
- :class:`SessionPool`: one ``requests.Session`` per thread (requests does not promise that a
  shared session is thread-safe), sending our User-Agent, never retrying by itself, all closed by
  the provider's ``close()``;
- :func:`with_backoff`: a metadata request (which the engine does not retry: ``list()`` runs once)
  tried a few times, sleeping the server's Retry-After or an exponential delay.

Request retries live here, the resume of a broken chunk stays in the engine: as pip keeps
``urllib3.Retry`` apart from its download resume, a read is never retried under the engine's feet.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import InvalidHeader
from urllib3.util import Retry

from storage_initializer import __version__
from storage_initializer.errors import (
    AccessDeniedError,
    InitializerError,
    NotFoundError,
    SourceError,
    TransientError,
)

log = logging.getLogger(__name__)

USER_AGENT = f"storage-initializer/{__version__}"
#: A server asking for longer is not waited for longer (the engine caps its own wait lower).
MAX_RETRY_AFTER = 300.0
#: The longest sleep between two metadata attempts, whatever the server asks.
MAX_METADATA_DELAY = 30.0

_PARSER = Retry(0)
T = TypeVar("T")

#: Status → the kind of error it means. 5xx not listed are transient, other 4xx refusals.
STATUS_ERRORS: dict[int, type[InitializerError]] = {
    401: AccessDeniedError,
    403: AccessDeniedError,
    404: NotFoundError,
    410: NotFoundError,
    408: TransientError,
    429: TransientError,
}


def retry_after(headers: Any) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (``"7"``, ``"1.5"`` or an HTTP-date), in
    0..MAX_RETRY_AFTER; None when absent or unreadable. ``headers`` is any mapping with
    ``get`` (requests, urllib3, google-auth, azure-core headers)."""
    value = headers.get("Retry-After") if hasattr(headers, "get") else None
    if value is None:
        return None
    text = str(value).strip()
    if not text:
        return None
    try:
        seconds = float(text)  # urllib3 reads only whole seconds; a fraction is harmless
    except ValueError:
        try:
            seconds = _PARSER.parse_retry_after(text)  # an HTTP-date: seconds from now, >= 0
        except InvalidHeader:
            return None
    if seconds != seconds:  # NaN
        return None
    return max(0.0, min(seconds, MAX_RETRY_AFTER))


def error_class(status: int) -> type[InitializerError] | None:
    """The error an HTTP status means, None for a success or a redirect."""
    if status < 400:
        return None
    if status in STATUS_ERRORS:
        return STATUS_ERRORS[status]
    return TransientError if status >= 500 else SourceError


def status_error(
    response: requests.Response, message: str, hints: Mapping[int, str] | None = None
) -> InitializerError | None:
    """The error for ``response``'s status with ``message`` (already redacted, naming the URI),
    the provider's hint for that status if it gives one (else the error kind's own), and the
    server's Retry-After on a transient one; None when the status is not an error."""
    return error_for(response.status_code, response.headers, message, hints)


def error_for(
    status: int, headers: Any, message: str, hints: Mapping[int, str] | None = None
) -> InitializerError | None:
    """:func:`status_error` from a status and its headers (any mapping with ``get``), for
    answers that did not come through requests (the lean GETs, lean_http)."""
    kind = error_class(status)
    if kind is None:
        return None
    hint = (hints or {}).get(status)
    if kind is TransientError:
        return TransientError(message, hint, retry_after=retry_after(headers))
    return kind(message, hint)


def raise_for_status(
    response: requests.Response,
    where: str,
    what: str = "the server",
    detail: str = "",
    hints: Mapping[int, str] | None = None,
) -> None:
    """Raise the error for an error answer (closing it): "<where>: <what> answered 404 Not
    Found<detail>". ``where`` is the redacted URI (and what was being done)."""
    reason = f" {response.reason}" if response.reason else ""
    message = f"{where}: {what} answered {response.status_code}{reason}{detail}"
    error = status_error(response, message, hints)
    if error is not None:
        response.close()
        raise error


class SessionPool:
    """One ``requests.Session`` per thread, made by :meth:`get`, all closed by :meth:`close`.

    Every session sends our User-Agent and never retries on its own (``max_retries=0``): request
    retries are the caller's (:func:`with_backoff`) and chunk resume is the engine's.
    ``configure`` adds the provider's own settings (headers, auth, client certificate).
    """

    def __init__(
        self,
        configure: Callable[[requests.Session], None] | None = None,
        pool_size: int = 4,
    ) -> None:
        self._configure = configure
        self._pool_size = pool_size
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    def get(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            adapter = HTTPAdapter(
                pool_connections=self._pool_size, pool_maxsize=self._pool_size, max_retries=0
            )
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.headers["User-Agent"] = USER_AGENT
            if self._configure is not None:
                self._configure(session)
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()
        self._local = threading.local()


def backoff_delay(error: BaseException, attempt: int) -> float:
    """Seconds to wait before attempt ``attempt + 1``: the server's Retry-After carried by
    ``error``, else 1 s, 2 s, 4 s...; at most MAX_METADATA_DELAY."""
    asked = getattr(error, "retry_after", None)
    return min(asked if asked is not None else 0.5 * 2**attempt, MAX_METADATA_DELAY)


def with_backoff(
    call: Callable[[], T],
    attempts: int,
    give_up: Callable[[TransientError, int], InitializerError] | None = None,
) -> T:
    """``call()``, tried up to ``attempts`` times while it raises TransientError, sleeping the
    server's Retry-After (else 1 s, 2 s, 4 s...; at most MAX_METADATA_DELAY) in between. The last
    error is raised as it is, or as ``give_up(error, attempts)`` makes it."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except TransientError as error:
            if attempt == attempts:
                if give_up is None:
                    raise
                raise give_up(error, attempt) from None
            delay = backoff_delay(error, attempt)
            log.info("%s; retrying in %.1fs", error, delay)
            time.sleep(delay)  # backoff between real attempts, not test synchronisation
    raise AssertionError("unreachable")
