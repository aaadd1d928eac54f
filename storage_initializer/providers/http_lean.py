"""The lean ranged GET of plain ``http(s)://`` files: lean_http's connections, not requests.

A read through requests costs Python per request (the session's hooks, merging of settings,
urllib3's pool) and copies every 1 MiB block out of urllib3 before the engine cuts it into
``write_size`` pieces. Here the GET goes over one keep-alive ``http.client`` connection per
worker thread (:mod:`lean_http`) and the body is read in blocks of ``read_size``, which the
engine writes in ``write_size`` pieces. What the requests path sends is sent here too: the
``<hostname>-headers`` of the stock initializer, ``Basic`` authorization from the URI's
``user:password@``, ``Accept-Encoding: identity`` and our User-Agent; the answer is pinned and
mapped by the same code (HttpSource._check, http_pin, httpcommon's status table).

Redirects are not followed here. A read answered with a redirect makes the source use the
requests path from then on (:class:`Redirected`), where redirects.py sends the private headers
and the credentials to the URI's own origin only. Nothing has been sent anywhere else: the lean
GET only ever goes to the URI itself.

Not used behind an HTTP(S) proxy (lean_http.proxied) or with ``STORAGE_INITIALIZER_HTTP_LEAN``
false.
"""

from __future__ import annotations

import base64
import errno
import http.client
import socket
import ssl
from collections.abc import Mapping
from urllib.parse import unquote, urlsplit, urlunsplit

from storage_initializer.errors import SourceError, TransientError
from storage_initializer.providers import lean_http
from storage_initializer.providers.httpcommon import USER_AGENT
from storage_initializer.redact import redact, register_secret

ENV = "STORAGE_INITIALIZER_HTTP_LEAN"
#: Answers that requests (and redirects.py) treat as redirects.
REDIRECTS = (301, 302, 303, 307, 308)
TLS_HINT = (
    "Trust the server's CA with the global CA bundle (CA_BUNDLE_CONFIGMAP_NAME) or "
    "REQUESTS_CA_BUNDLE"
)
CONNECT_HINT = "Check the host name, the port and the network policy of the namespace"
_UNREACHABLE = (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH)


def wanted(url: str) -> bool:
    """Whether reads of ``url`` take the lean path: asked for (default yes), and no proxy."""
    return lean_http.wanted(ENV) and not lean_http.proxied(url)


class Redirected(Exception):
    """The server answered a read with a redirect: the requests path follows it."""


def host_port(url: str) -> str:
    """``host:port`` of ``url``, never its ``user:password@``."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        return f"{host}:{parts.port}" if parts.port else host
    except ValueError:  # a port that is not a number: the host alone
        return host


def basic_authorization(user: str, password: str) -> str:
    """The ``Authorization`` value requests makes of ``(user, password)`` (latin-1, as
    requests encodes it; UTF-8 for what latin-1 cannot carry)."""
    raw = f"{user}:{password}"
    try:
        data = raw.encode("latin-1")
    except UnicodeEncodeError:
        data = raw.encode("utf-8")
    value = "Basic " + base64.b64encode(data).decode("ascii")
    register_secret(value)
    return value


def merged(base: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """``base`` updated by ``extra``, header names compared without case (as requests does)."""
    out = {name: value for name, value in base.items() if name.lower() not in _lower(extra)}
    out.update(extra)
    return out


def _lower(headers: Mapping[str, str]) -> set[str]:
    return {name.lower() for name in headers}


class LeanReader:
    """GETs of one URL (credentials taken out of it) over per-thread connections."""

    def __init__(
        self,
        url: str,
        headers: Mapping[str, str],
        verify: bool | str,
        timeouts: tuple[float, float],
    ) -> None:
        parts = urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]  # http.client takes host[:port] only
        self.url = urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
        self.host_port = host_port(url)
        # As on the requests path: the <hostname>-headers over our User-Agent (the session's
        # headers), the URI's user:password over both (requests' auth comes last).
        self.headers = merged({"User-Agent": USER_AGENT}, headers)
        if parts.username:
            self.headers = merged(
                self.headers,
                {
                    "Authorization": basic_authorization(
                        unquote(parts.username), unquote(parts.password or "")
                    )
                },
            )
        self.connections = lean_http.Connections(verify, *timeouts)

    def get(self, headers: Mapping[str, str], where: str, method: str = "GET") -> lean_http.Answer:
        """Send the GET (or ``method``: the listing's HEAD); a failure to get an answer is
        mapped as on the requests path (TLS and unreachable hosts are the user's to fix, the
        rest is transient). Raises :class:`Redirected` (the connection kept when it can be)
        for a redirect."""
        try:
            answer = self.connections.get(self.url, merged(self.headers, headers), method)
        except ssl.SSLError as exc:  # verification failures included (a subclass)
            raise SourceError(
                f"{where}: TLS verification failed ({_reason(exc)})", TLS_HINT
            ) from None
        except (socket.gaierror, ConnectionRefusedError) as exc:
            raise SourceError(
                f"{where}: cannot connect to {self.host_port} ({_reason(exc)})", CONNECT_HINT
            ) from None
        except TimeoutError:
            raise TransientError(f"{where}: the server did not answer in time") from None
        except OSError as exc:
            if exc.errno in _UNREACHABLE:
                raise SourceError(
                    f"{where}: cannot connect to {self.host_port} ({_reason(exc)})",
                    CONNECT_HINT,
                ) from None
            raise TransientError(f"{where}: connection failed ({_reason(exc)})") from None
        except http.client.HTTPException as exc:
            raise TransientError(f"{where}: connection failed ({_reason(exc)})") from None
        if answer.status in REDIRECTS and answer.header("Location"):
            lean_http.error_answer(answer)  # a short body is read: the connection stays
            raise Redirected()
        return answer

    def close(self) -> None:
        """Close the calling thread's connections (the others close with their threads)."""
        self.connections.close()


def _reason(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return redact(str(text))[:200]
