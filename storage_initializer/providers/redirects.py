"""Following HTTP redirects without leaking credentials.

requests follows redirects by itself, but only drops ``Authorization`` when the host changes:
every other header a session carries — the ``<hostname>-headers`` of the stock initializer
(API keys, cookies, tokens in custom headers) — would reach whatever server a redirect names.
So we follow redirects ourselves: the configured headers go to the URI's own origin (scheme,
host and port) only; a hop to any other origin is made without them (and without the URI's
``user:password@``, which requests turns into ``Authorization``). A redirect to anything but
http(s) is refused, and at most :data:`MAX_HOPS` redirects are followed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urljoin, urlsplit

from storage_initializer.errors import SourceError

if TYPE_CHECKING:
    import requests

MAX_HOPS = 10
_SCHEMES = ("http", "https")


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port made explicit."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    return scheme, (parts.hostname or "").lower(), port or {"http": 80, "https": 443}.get(scheme)


def request(
    session: requests.Session,
    method: str,
    url: str,
    *,
    what: str,
    headers: Mapping[str, str] | None = None,
    private: Iterable[str] = (),
    **options: Any,
) -> requests.Response:
    """``session.request`` following redirects ourselves. ``private``: names of the session's
    headers that only ``url``'s origin may see. ``what`` names the (redacted) source in
    errors; a redirect's target is never printed (it may carry credentials)."""
    home = origin(url)
    hidden = {name: None for name in private}
    parts = urlsplit(url)
    # The URI's user:password@ is the origin's too: kept for a hop to the same origin (requests
    # takes it from the URL, which a redirect's Location does not repeat), dropped elsewhere.
    auth = (unquote(parts.username), unquote(parts.password or "")) if parts.username else None
    current, verb = url, method
    for _hop in range(MAX_HOPS + 1):
        extra: dict[str, Any] = dict(headers or {})
        home_hop = origin(current) == home
        if not home_hop:
            extra.update(hidden)  # a None value removes the session's header from the request
        response = session.request(
            verb,
            current,
            headers=extra,
            auth=auth if home_hop else None,
            allow_redirects=False,
            **options,
        )
        if not response.is_redirect:
            return response
        location = response.headers.get("Location", "")
        response.close()
        target = urljoin(current, location)
        scheme = urlsplit(target).scheme.lower()
        if scheme not in _SCHEMES:
            raise SourceError(
                f"{what}: the server redirected to a {scheme or 'relative'}: URL, which is refused",
                "Only http and https redirects are followed; point the URI at the final location",
            )
        if response.status_code == 303 and verb != "HEAD":
            verb = "GET"
        current = target
    raise SourceError(
        f"{what}: more than {MAX_HOPS} redirects",
        "The server redirects in a loop or too far; point the URI at the final location",
    )
