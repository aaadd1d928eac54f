"""The HTTP layer shared by the providers that speak HTTP themselves (http, hf, oci, hdfs,
modelscope) and the Retry-After reading of the SDK-based ones (GCS, Azure).

Each of these once, in the shape of huggingface_hub's ``utils/_http.py`` (``http_backoff``,
``hf_raise_for_status``) and pip's ``network/session.py``:

- :func:`retry_after` (from :mod:`.retry_after`, which the SDK-based providers import without
  requests): a ``Retry-After`` header in either form, clamped to 0..:data:`MAX_RETRY_AFTER` s;
- :func:`status_error` / :func:`raise_for_status` (and :func:`answer_error`,
  :func:`unexpected_answer`): a table from HTTP status to the error a user
  can act on (401/403 denied, 404/410 not found, 408/429/5xx transient with the server's
  Retry-After, other 4xx refused); a provider words the message and may give a hint per status;
- :func:`transport_error`: a request that got no answer (TLS refused, host unreachable, timeout)
  as the error a user can act on, each provider naming its peer and its hints (:class:`Peer`);
- :func:`read_metadata` / :func:`error_body`: a metadata answer read whole but bounded
  (:data:`MAX_METADATA_BYTES`), an error answer read only as far as its message needs;
- :func:`secret_headers`: extra request headers from a JSON object, their values secrets;
- :class:`SessionPool`: one ``requests.Session`` per thread (requests does not promise that a
  shared session is thread-safe), sending our User-Agent, never retrying by itself, all closed by
  the provider's ``close()``;
- :func:`with_backoff`: a metadata request (which the engine does not retry: ``list()`` runs once)
  tried a few times, sleeping the server's Retry-After or an exponential delay.

Request retries live here, the resume of a broken chunk stays in the engine: as pip keeps
``urllib3.Retry`` apart from its download resume, a read is never retried under the engine's feet.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from storage_initializer import __version__
from storage_initializer.errors import (
    AccessDeniedError,
    InitializerError,
    NotFoundError,
    SourceError,
    TransientError,
    UsageError,
)
from storage_initializer.providers.retry_after import (  # noqa: F401  (providers use it from here)
    MAX_RETRY_AFTER,
    retry_after,
)
from storage_initializer.redact import register_secret

if TYPE_CHECKING:  # imported where used: a lean pull never loads requests (~60 ms of CPU)
    import requests

log = logging.getLogger(__name__)

USER_AGENT = f"storage-initializer/{__version__}"
#: The longest sleep between two metadata attempts, whatever the server asks.
MAX_METADATA_DELAY = 30.0

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


def answer_error(
    response: requests.Response, message: str, hints: Mapping[int, str] | None = None
) -> InitializerError:
    """:func:`status_error`, for an answer the provider does not accept whatever its status: one
    with no error status (an unexpected redirect or success) is a SourceError."""
    return status_error(response, message, hints) or SourceError(message)


def unexpected_answer(response: requests.Response, where: str, detail: str) -> InitializerError:
    """The error for an answer the provider has no words of its own for: a 429 or 5xx says what
    the server said (the table makes it worth retrying), anything else is "unexpected"."""
    status = response.status_code
    if status == 429 or status >= 500:
        return answer_error(response, f"{where}: {detail}")
    return answer_error(response, f"{where}: unexpected answer {detail}")


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


@dataclass(frozen=True)
class Peer:
    """Whom a provider's requests go to, as :func:`transport_error` words their failures."""

    #: Who did not answer in time: "the server", "the registry".
    name: str
    #: What could not be connected to: "host:port", "the registry ghcr.io".
    address: str
    #: The hint of a failed TLS verification, and of a refused connection or unknown host.
    tls_hint: str
    connect_hint: str
    #: The short reason an exception gives, and whether it means refused or unknown host.
    reason: Callable[[BaseException], str]
    unreachable: Callable[[BaseException], bool]


def transport_error(exc: requests.RequestException, what: str, peer: Peer) -> InitializerError:
    """The error for a request to ``peer`` that got no answer: an untrusted certificate or an
    unreachable host is a configuration error (asking again will not help), a broken connection
    or a timeout is worth retrying. ``what`` is the redacted URI (and what was being done)."""
    import requests  # loaded already: exc is one of its exceptions

    reason = peer.reason(exc)
    if isinstance(exc, requests.exceptions.SSLError):
        return SourceError(f"{what}: TLS verification failed ({reason})", peer.tls_hint)
    if isinstance(exc, requests.exceptions.ConnectionError):
        if peer.unreachable(exc):
            return SourceError(
                f"{what}: cannot connect to {peer.address} ({reason})", peer.connect_hint
            )
        return TransientError(f"{what}: connection failed ({reason})")
    if isinstance(exc, requests.exceptions.Timeout):
        return TransientError(f"{what}: {peer.name} did not answer in time")
    return SourceError(f"{what}: request failed ({reason})")


#: The most bytes (decoded) one metadata answer may hold: a listing page, a revision, an error
#: body. The largest real ones are a few MiB (a Hub page of 1,000 entries, a WebHDFS directory
#: of 100,000 files is ~30 MiB); an answer past this is not metadata, and read whole it would
#: take the pod's memory (an endless body, a gzip bomb), so it is refused.
MAX_METADATA_BYTES = 64 << 20


def read_metadata(response: requests.Response, what: str) -> None:
    """Read a metadata answer's body (sent with ``stream=True``) into the response, at most
    :data:`MAX_METADATA_BYTES` of it decoded, so ``.json()`` and ``.text`` work as usual.
    More is a :class:`SourceError` naming ``what``; a transfer that breaks raises the requests
    exception it is (the caller maps it as any transport failure)."""
    declared = response.headers.get("Content-Length", "")
    total = int(declared) if declared.isdigit() else 0
    parts: list[bytes] = []
    if total <= MAX_METADATA_BYTES:
        total = 0
        for block in response.iter_content(1 << 16):
            total += len(block)
            if total > MAX_METADATA_BYTES:
                break
            parts.append(block)
    if total > MAX_METADATA_BYTES:
        response.close()
        raise SourceError(
            f"{what}: the answer is larger than {MAX_METADATA_BYTES >> 20} MiB, which is no "
            "listing or metadata this tool reads (an endless or compressed-bomb body?)",
            "Check that the endpoint is the service it should be, not a file server or a "
            "proxy answering in its place",
        )
    response._content = b"".join(parts)  # what requests itself keeps after reading
    response._content_consumed = True


#: How much of an error answer's body is read for its message: enough for any service's error
#: document, and bounded, since an error answer is as much input as any other.
ERROR_BODY_BYTES = 64 << 10


def error_body(response: requests.Response) -> bytes:
    """The body of an error answer, at most :data:`ERROR_BODY_BYTES` of it decoded (all of it
    when it was read already, as :func:`read_metadata` does); the rest is never read. A body
    that breaks off gives what arrived: the status says what matters."""
    if response._content_consumed:
        return response.content or b""
    try:
        data = response.raw.read(ERROR_BODY_BYTES, decode_content=True) or b""
    except Exception:  # a broken or undecodable error body: the status still says enough
        data = b""
    response._content = data
    response._content_consumed = True
    response.close()
    return data


def error_json(response: requests.Response) -> Any:
    """The JSON document of an error answer (bounded by :func:`error_body`); None if it is
    not JSON."""
    try:
        return json.loads(error_body(response))
    except ValueError:
        return None


def secret_headers(raw: str, name: str) -> dict[str, str]:
    """Extra request headers given as a JSON object (an ``<host>-headers`` variable, the HDFS
    secret's HEADERS). Their values are secrets: each is registered for redaction, whole and word
    by word ("Bearer <token>"). ``name`` says where the text came from, for the error."""
    try:
        loaded = json.loads(raw)
    except ValueError:
        loaded = None
    if not isinstance(loaded, dict):
        raise UsageError(f"{name} is not a JSON object", 'Write it as {"Header-Name": "value"}')
    headers = {str(k): str(v) for k, v in loaded.items()}
    for value in headers.values():
        register_secret(value)
        for part in value.split():
            if len(part) >= 8:
                register_secret(part)
    return headers


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
            import requests

            from storage_initializer.providers.http_adapter import StreamAdapter

            session = requests.Session()
            adapter = StreamAdapter(
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
