"""A lean ranged GET for GCS: google-auth makes the token, a plain HTTP connection per worker reads.

A media GET through google-auth's ``AuthorizedSession`` is a ``requests`` call: hooks, adapter,
urllib3's pool, the credentials' ``before_request`` (a metrics header, a refresh check) and
copies of every block on its way out of urllib3, a few hundred microseconds of Python before
the first byte. For a model of many small files that is most of the CPU a file costs. Here
google-auth still does what it is good at (finding credentials, exchanging them for an access
token, refreshing it) and :mod:`lean_http` sends the GET: the same media URL with
``alt=media&generation=<listed generation>`` (the read stays pinned), the same ``Range``, one
keep-alive ``http.client`` connection per worker thread, the body read in blocks of the
engine's write size.

The token: :class:`BearerHeaders` keeps the headers ``credentials.apply`` writes, and refreshes
the credentials under one lock when they are no longer valid (google-auth counts a token as
expired 3m45s early), never per request; a 401 answer makes it refresh once and the GET is
sent once more, as ``AuthorizedSession`` does. Anonymous credentials (an emulator, a public
bucket) send no ``Authorization`` header at all.

Error answers go through the provider's own status mapping
(:meth:`~.gcs_errors.GcsErrorMapping._status_answer`), so messages, hints and ``Retry-After``
are those of the requests path; a pinned generation that is gone (404, 412) is a
:class:`SourceChangedError`; a failed connection or a cut body a :class:`TransientError`.

Not used (the requests path is) behind an HTTP(S) proxy, with ``STORAGE_INITIALIZER_GCS_LEAN``
false, and for gzip objects served with decompressive transcoding (they travel compressed and
``requests`` inflates them; ranges do not apply to them).
"""

from __future__ import annotations

import http.client
import ssl
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from google.auth.credentials import AnonymousCredentials, Credentials
from google.auth.transport.requests import Request
from requests.structures import CaseInsensitiveDict

from storage_initializer.errors import InitializerError, SourceError, TransientError
from storage_initializer.providers import lean_http
from storage_initializer.providers.httpcommon import USER_AGENT
from storage_initializer.redact import redact

ENV = "STORAGE_INITIALIZER_GCS_LEAN"

#: (status, headers, start of the body, where, generation) -> the provider's error.
StatusMapper = Callable[[int, Mapping[str, str], bytes, str, "int | None"], InitializerError]


def wanted() -> bool:
    """Whether the lean path is asked for (default yes)."""
    return lean_http.wanted(ENV)


proxied = lean_http.proxied


class BearerHeaders:
    """The headers google-auth credentials put on a request, shared by every worker thread.

    ``generation`` counts the tokens handed out: a worker whose request was refused (401) says
    which one it used, and only the first such worker refreshes; the others take the new one.
    """

    def __init__(self, credentials: Credentials) -> None:
        self.credentials = credentials
        #: Anonymous credentials cannot be refreshed: a 401 is then simply the answer.
        self.refreshable = not isinstance(credentials, AnonymousCredentials)
        self._lock = threading.Lock()
        #: (token the headers carry, the headers, generation); read without the lock.
        self._state: tuple[Any, dict[str, str], int] = (None, {}, 0)
        self._request: Request | None = None

    def get(self, refused: int | None = None) -> tuple[dict[str, str], int]:
        """(headers, generation) for the next request; ``refused``: the generation a 401
        answered, so that it is refreshed even if google-auth still counts it as valid."""
        if not self.refreshable:
            return {}, 0
        token, headers, generation = self._state
        credentials = self.credentials
        # credentials.valid is google-auth's own test (a token is refreshed 3m45s early).
        if (
            refused is None
            and token is not None
            and credentials.token is token
            and credentials.valid
        ):
            return headers, generation
        with self._lock:
            token, headers, generation = self._state
            stale = refused is not None and refused == generation
            if stale or not credentials.valid:
                if self._request is None:
                    self._request = Request()  # its own session: no auth on the token request
                credentials.refresh(self._request)
            if stale or credentials.token is not token or not headers:
                fresh: dict[str, str] = {}
                credentials.apply(fresh)
                generation += 1
                self._state = (credentials.token, fresh, generation)
            return self._state[1], self._state[2]


class LeanGetter:
    """Ranged, generation-pinned media GETs of one bucket's objects."""

    def __init__(
        self,
        credentials: Credentials,
        endpoint: str,
        verify: bool | str,
        timeouts: tuple[float, float],
        status_error: StatusMapper,
        map_error: Callable[[BaseException, str], InitializerError],
    ) -> None:
        self.tokens = BearerHeaders(credentials)
        self.endpoint = endpoint
        self.connections = lean_http.Connections(verify, *timeouts)
        self.status_error = status_error
        self.map_error = map_error

    def read(
        self,
        url: str,
        generation: int | None,
        start: int,
        end: int | None,
        whole: bool,
        block: int,
        where: str,
    ) -> Iterator[bytes]:
        """Bytes ``[start, end)`` of the object at media ``url`` (without a query)."""
        url += "?alt=media" + (f"&generation={generation}" if generation else "")
        headers = {"Accept-Encoding": "identity", "User-Agent": USER_AGENT}
        if not whole:
            headers["Range"] = lean_http.range_header(start, end)
        answer = self._send(url, headers, where)
        if answer.status not in (200, 206):
            status = answer.status
            found, body = lean_http.error_answer(answer)
            raise self.status_error(status, CaseInsensitiveDict(found), body, where, generation)
        yield from lean_http.ranged_body(answer, start, end, whole, block, where)

    def _send(self, url: str, headers: dict[str, str], where: str) -> lean_http.Answer:
        """The answer to the GET; after a 401, the token refreshed and the GET sent again once."""
        refused: int | None = None
        while True:
            try:
                auth, generation = self.tokens.get(refused)
            except Exception as exc:  # RefreshError, TransportError: mapped as on the SDK path
                raise self.map_error(exc, where) from exc
            try:
                answer = self.connections.get(url, {**headers, **auth})
            except ssl.SSLCertVerificationError as exc:
                raise SourceError(
                    f"{where}: TLS handshake with {self.endpoint} failed: {redact(str(exc))}",
                    "Add the CA that signed the endpoint's certificate to the global CA bundle "
                    "(CA_BUNDLE_CONFIGMAP_NAME) or REQUESTS_CA_BUNDLE",
                ) from None
            except (OSError, http.client.HTTPException) as exc:
                raise TransientError(
                    f"{where}: connection to {self.endpoint} failed: {type(exc).__name__}: "
                    f"{redact(str(exc))}"
                ) from None
            if answer.status != 401 or refused is not None or not self.tokens.refreshable:
                return answer
            lean_http.error_answer(answer)  # read (and drop) the refusal: the connection stays
            refused = generation

    def close(self) -> None:
        """Close the calling thread's connections (the others close with their threads)."""
        self.connections.close()
