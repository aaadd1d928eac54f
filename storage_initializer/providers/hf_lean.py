"""The lean read of ``hf://`` files: lean_http's connections instead of a requests session.

The same shape as the lean S3 GET and the lean HTTP read (one keep-alive ``http.client``
connection per worker thread and origin, the body in ``read_size`` blocks as it arrives), for
``GET {endpoint}/{repo}/resolve/{sha}/{path}``. The Hub answers small files itself and
redirects LFS/Xet files to a CDN: redirects are followed here, and the bearer token goes to the
Hub's own origin (scheme, host, port) only, never to the CDN nor anywhere else a redirect
points (requests only drops it when the host name changes). Answers are mapped by the
provider's own code (HfErrors), so messages and hints are those of the requests path.

Where the Hub redirected a file (its CDN URL) is kept for :data:`LOCATION_TTL`, so the further
ranges of that file go there directly: one Hub request per file, not one per chunk, as
huggingface_hub resolves once and then reads the CDN URL. A 100 GB model of 32 MiB chunks would
otherwise send the Hub some 3 000 ``resolve`` requests, each a round trip to the Hub and each
counted against its rate limit. The CDN URL is signed and expires: any answer from it other than
the bytes (403 for an expired signature, 404, …) drops it and the range is resolved again.

Not used behind an HTTP(S) proxy (lean_http.proxied) or with ``STORAGE_INITIALIZER_HF_LEAN``
false.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from urllib.parse import urljoin, urlsplit

import requests
from requests.structures import CaseInsensitiveDict

from storage_initializer.errors import SourceError
from storage_initializer.providers import lean_http, redirects
from storage_initializer.providers.http_lean import REDIRECTS, merged
from storage_initializer.providers.httpcommon import USER_AGENT

ENV = "STORAGE_INITIALIZER_HF_LEAN"
#: Seconds a CDN location the Hub redirected to is reused for further ranges of the file (the
#: Hub's signed URLs last about an hour; one that is refused sooner is resolved again at once).
LOCATION_TTL = 300.0


def wanted(endpoint: str) -> bool:
    """Whether Hub file reads take the lean path: asked for (default yes), and no proxy."""
    return lean_http.wanted(ENV) and not lean_http.proxied(endpoint)


class HubReader:
    """GETs of Hub file URLs, following redirects with the token for the Hub's origin only."""

    def __init__(
        self, endpoint: str, token: str | None, verify: bool | str, timeouts: tuple[float, float]
    ) -> None:
        self.home = redirects.origin(endpoint)
        self.headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        self.token = {"Authorization": f"Bearer {token}"} if token else {}
        self.connections = lean_http.Connections(verify, *timeouts)
        #: Hub URL -> (the location it redirected to, when); shared by the worker threads.
        self._locations: dict[str, tuple[str, float]] = {}

    def get(self, url: str, headers: Mapping[str, str], where: str) -> lean_http.Answer:
        """The final answer to a GET of ``url`` (redirects followed, or the location the Hub
        gave for it lately). OSError and HTTPException when no answer came (the caller maps
        them); SourceError for a redirect to another scheme or a loop."""
        known = self._locations.get(url)
        if known is not None and time.monotonic() - known[1] < LOCATION_TTL:
            try:
                answer = self._send(known[0], headers)
            except BaseException:
                self._locations.pop(url, None)
                raise
            if answer.status in (200, 206):
                return answer
            lean_http.error_answer(answer)  # expired or gone: ask the Hub again
            self._locations.pop(url, None)
        current = url
        for _hop in range(redirects.MAX_HOPS + 1):
            answer = self._send(current, headers)
            location = answer.header("Location")
            if answer.status not in REDIRECTS or not location:
                if current != url and answer.status in (200, 206):
                    self._locations[url] = (current, time.monotonic())
                return answer
            lean_http.error_answer(answer)  # a short body: the connection stays
            target = urljoin(current, location)
            scheme = urlsplit(target).scheme.lower()
            if scheme not in ("http", "https"):
                raise SourceError(
                    f"{where}: the Hub redirected to a {scheme or 'relative'}: URL, which is "
                    "refused"
                )
            current = target
        raise SourceError(f"{where}: more than {redirects.MAX_HOPS} redirects")

    def _send(self, url: str, headers: Mapping[str, str]) -> lean_http.Answer:
        """One GET; the token goes only to the Hub's own origin."""
        send = merged(self.headers, headers)
        if redirects.origin(url) == self.home:
            send.update(self.token)
        return self.connections.get(url, send)

    def close(self) -> None:
        """Close the calling thread's connections (the others close with their threads)."""
        self.connections.close()


def as_response(answer: lean_http.Answer) -> requests.Response:
    """An error answer as the requests Response the provider's error mapping reads (status,
    reason, headers, a bounded body)."""
    headers, body = lean_http.error_answer(answer)
    response = requests.Response()
    response.status_code = answer.status
    response.reason = answer.response.reason
    response.headers = CaseInsensitiveDict(headers)
    response._content = body
    return response
