"""Lean ranged GETs: one plain ``http.client`` connection per worker thread, no SDK pipeline.

Why: an SDK request (boto3, the Azure pipeline, ``requests`` under google-auth) costs a few
hundred microseconds of Python before the first byte (parameter validation, hooks, retry
handlers, urllib3's pool) and copies every block on its way out. For a model of many small
files that is most of what a file costs, and on KServe's 1-CPU limit it is throughput. The
providers keep what their SDK is good at (endpoints, credentials, signing, listings, error
messages) and hand a URL plus headers to this module, which only moves bytes:

- :class:`Connections`: this thread's keep-alive connection per (scheme, host), re-opened once
  when the server closed an idle one, dropped whenever a body is left half-read, and not
  reused when it is readable before we asked anything (bytes queued there would be taken for
  the next answer). Sockets keep TCP urgent data in the stream (``SO_OOBINLINE``): ``recv``
  would otherwise skip an urgent byte and shift the rest of the body.
- :func:`read_body`: the blocks of an answer, cut to the wanted window (a server that ignored
  ``Range`` sends the whole object: the head is dropped here), a cut body a
  :class:`TransientError` so the engine resumes the chunk; a ``Transfer-Encoding`` other than
  a plain ``chunked`` (which http.client would leave in the body) refused; a one-stream answer
  of another length than listed a :class:`SourceChangedError`.
- :func:`error_answer`: status, headers and (bounded) body of an error, for the provider's own
  status mapping.

Every read still goes through :class:`socket.SocketIO`, so the stall guard (``stall.py``)
counts these bytes as it counts the SDKs'. Behind an HTTP(S) proxy (:func:`proxied`) providers
use their SDK path: this module speaks to the origin directly.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import select
import socket
import ssl
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import cast

from storage_initializer import splice
from storage_initializer.errors import SourceChangedError, TransientError
from storage_initializer.providers.block_window import take_window
from storage_initializer.redact import redact

#: An error body larger than this is not read (error bodies are a few hundred bytes).
ERROR_BODY_LIMIT = 64 * 1024
_CONTENT_RANGE = re.compile(r"bytes (\d+)-")


def wanted(env: str) -> bool:
    """Whether the lean path is asked for by the environment variable ``env`` (default yes)."""
    return os.environ.get(env, "true").strip().lower() not in ("0", "false", "no")


def proxied(url: str) -> bool:
    """Whether the environment routes ``url`` through a proxy (then the SDK path is used)."""
    parts = urllib.parse.urlsplit(url)
    proxies = urllib.request.getproxies()
    if parts.scheme not in proxies:
        return False
    return not urllib.request.proxy_bypass(parts.hostname or "")


def ssl_context(verify: bool | str) -> ssl.SSLContext:
    """The TLS context for a ``verify=`` setting as SDKs take it (False, a CA file, True)."""
    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    if isinstance(verify, str):
        if os.path.isdir(verify):
            return ssl.create_default_context(capath=verify)
        return ssl.create_default_context(cafile=verify)
    return ssl.create_default_context()


@dataclass
class Answer:
    """An answer whose body is still to be read, and the connection it came on."""

    response: http.client.HTTPResponse
    address: tuple[str, str]
    connections: Connections
    #: The connection's socket (a plain one can be spliced from: splice.py).
    sock: socket.socket | None = None

    @property
    def status(self) -> int:
        return self.response.status

    def header(self, name: str, default: str = "") -> str:
        return self.response.getheader(name, default) or default

    def discard(self) -> None:
        """Drop the connection unless the answer was read to its end."""
        if not self.response.isclosed():
            self.connections.drop(self.address)


class Connections:
    """Each worker thread's keep-alive connections, one per (scheme, host:port)."""

    def __init__(self, verify: bool | str, connect_timeout: float, read_timeout: float) -> None:
        self.verify = verify
        self._context: ssl.SSLContext | None = None
        self._context_lock = threading.Lock()
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._local = threading.local()

    @property
    def context(self) -> ssl.SSLContext:
        """The TLS context, made on the first https connection (loading the CA store costs
        about 0.15 s of CPU, for nothing when the endpoint is plain http)."""
        with self._context_lock:
            if self._context is None:
                self._context = ssl_context(self.verify)
            return self._context

    def _mine(self) -> dict[tuple[str, str], http.client.HTTPConnection]:
        connections: dict[tuple[str, str], http.client.HTTPConnection] | None = getattr(
            self._local, "connections", None
        )
        if connections is None:
            connections = self._local.connections = {}
        return connections

    def _connection(self, address: tuple[str, str]) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection to ``address``, and whether it was used before."""
        mine = self._mine()
        found = mine.get(address)
        if found is not None:
            if not _holds_unasked(found.sock):
                return found, True
            self.drop(address)  # closed by the server, or bytes nobody asked for: not reused
        scheme, netloc = address
        connection: http.client.HTTPConnection
        if scheme == "https":
            connection = http.client.HTTPSConnection(
                netloc, timeout=self.connect_timeout, context=self.context
            )
        else:
            connection = http.client.HTTPConnection(netloc, timeout=self.connect_timeout)
        mine[address] = connection
        return connection, False

    def drop(self, address: tuple[str, str]) -> None:
        connection = self._mine().pop(address, None)
        if connection is not None:
            connection.close()

    def get(self, url: str, headers: dict[str, str], method: str = "GET") -> Answer:
        """Send a GET (or ``method``: HEAD) of ``url``; OSError/HTTPException when no answer
        came (the caller maps them: a refused connection is not the same advice as a reset
        one)."""
        parts = urllib.parse.urlsplit(url)
        address = (parts.scheme, parts.netloc)
        target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        for fresh_try in (False, True):
            connection, reused = self._connection(address)
            try:
                connection.request(method, target, headers=headers)
                if connection.sock is not None:
                    connection.sock.settimeout(self.read_timeout)
                    if not reused:
                        # TCP urgent data stays in the byte stream: without this, recv skips
                        # the urgent byte and every later byte of the body lands one too early.
                        connection.sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
                return Answer(connection.getresponse(), address, self, connection.sock)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.drop(address)
                if reused and not fresh_try:
                    continue  # the server closed an idle keep-alive connection: once more
                raise
            except BaseException:
                self.drop(address)
                raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close the calling thread's connections (the others close with their threads)."""
        for connection in self._mine().values():
            with contextlib.suppress(OSError):
                connection.close()
        self._mine().clear()


def _holds_unasked(sock: socket.socket | None) -> bool:
    """Whether an idle keep-alive connection is readable before we asked anything: the server
    closed it, or sent bytes no request of ours asked for (a stale or forged answer, which
    would be taken for the answer to the next request). Either way it is not reused."""
    if sock is None:
        return False  # http.client opens a new one itself
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def check_start(answer: Answer, start: int, where: str) -> None:
    """A 206 must start where we asked; anything else is a broken intermediary."""
    got = answer.header("Content-Range")
    match = _CONTENT_RANGE.match(got)
    if not match or int(match.group(1)) != start:
        answer.connections.drop(answer.address)
        raise TransientError(f"{where}: asked for bytes from {start}, got {got!r}")


def ranged_body(
    answer: Answer,
    start: int,
    end: int | None,
    whole: bool,
    block: int,
    where: str,
    eager: bool = False,
) -> Iterator[bytes]:
    """The bytes ``[start, end)`` of a 200 or 206 answer to a GET of that range (``whole``: a
    GET without ``Range``). A 200 to a ranged GET is the whole object from a server that
    ignored ``Range``: its head is dropped here; a 206 must start at ``start``."""
    skip = 0
    if not whole and answer.status == 200:
        skip = start
    elif answer.status == 206:
        check_start(answer, start, where)
    remaining = None if end is None else end - start
    sent = answer.response.length
    if whole and answer.status == 200 and None not in (sent, remaining) and sent != remaining:
        answer.connections.drop(answer.address)
        raise other_length(where, sent or 0, remaining or 0)
    yield from read_body(answer, skip, remaining, block, where, eager=eager)


def read_body(
    answer: Answer,
    skip: int,
    remaining: int | None,
    block: int,
    where: str,
    eager: bool = False,
) -> Iterator[bytes]:
    """The answer's body after its first ``skip`` bytes, at most ``remaining`` bytes (None: to
    its end), in blocks of at most ``block``. A body cut before its Content-Length is a
    :class:`TransientError`; a body without one that ends early simply ends (the engine checks
    the length and resumes what is missing).

    ``eager``: hand over what has arrived (one ``recv``, up to ``block``) instead of waiting
    for a whole block, so that a transfer the stall guard cuts resumes from its last byte
    rather than from its last whole block (the guard drops the block it cut short). On a fast
    link the socket holds a whole block at each read anyway."""
    response = answer.response
    coding = response.getheader("Transfer-Encoding")
    if coding is not None and not response.chunked:
        # http.client undoes only a plain "chunked"; any other coding (a list, gzip) would
        # leave its framing or compression in the file, whatever Content-Length says.
        answer.connections.drop(answer.address)
        raise framing_error(where, coding)
    read = response.read1 if eager else response.read
    budget = None if remaining is None else skip + remaining  # never read past the window
    landing = _landing(answer, skip, remaining)
    finished = False
    try:
        if landing is not None and remaining is not None and answer.sock is not None:
            # Landed blocks, typed as the bytes they stand for: only the engine offers a
            # landing, and it tells them apart (splice.py).
            yield from cast(
                Iterator[bytes], splice.land(response, answer.sock, landing, remaining, where)
            )
        else:
            yield from take_window(_received(response, read, budget, block, where), skip, remaining)
        if response.length == 0:
            response.close()  # read1 leaves a fully read answer open; read() closes it
        finished = response.isclosed()  # the whole answer read: the connection is reusable
    finally:
        if not finished:
            answer.connections.drop(answer.address)  # a half-read body cannot carry more


def other_length(where: str, sent: int, listed: int) -> SourceChangedError:
    """A one-stream answer of another length than the listing's: another version of the file
    (taking the listed length of it would publish a cut or mixed file)."""
    return SourceChangedError(
        f"{where}: the server now sends {sent} bytes where the listing said {listed}: the "
        "file changed during the pull"
    )


def framing_error(where: str, coding: str) -> TransientError:
    """A body sent with a Transfer-Encoding we do not undo (anything but a plain ``chunked``):
    its bytes are not the file's."""
    return TransientError(
        f"{where}: the server sent the body with Transfer-Encoding {coding!r}, which this "
        "tool does not decode (only 'chunked' is)"
    )


def _landing(answer: Answer, skip: int, remaining: int | None) -> splice.Landing | None:
    """The engine's landing for this body, when the body can be spliced into it: a plain
    socket, a Content-Length body of at least :data:`splice.MIN_BODY` in the window, nothing
    to drop at its head."""
    response = answer.response
    if (
        skip
        or remaining is None
        or response.chunked
        or response.length is None
        or min(remaining, response.length) < splice.MIN_BODY
    ):
        return None
    return splice.take(answer.sock)


def _received(
    response: http.client.HTTPResponse,
    read: Callable[[int], bytes],
    budget: int | None,
    block: int,
    where: str,
) -> Iterator[bytes]:
    """Blocks of the body as they are read, at most ``budget`` bytes in all."""
    while budget is None or budget > 0:
        want = block if budget is None else min(block, budget)
        try:
            data = read(want)
        except (OSError, http.client.HTTPException) as exc:
            raise TransientError(
                f"{where}: the transfer broke off: {type(exc).__name__}: {redact(str(exc))}"
            ) from None
        if not data:
            if response.length:  # Content-Length not reached: the body was cut
                raise TransientError(
                    f"{where}: the transfer broke off: the connection closed with "
                    f"{response.length} bytes of the answer missing"
                )
            return
        if budget is not None:
            budget -= len(data)
        yield data


def error_answer(answer: Answer) -> tuple[dict[str, str], bytes]:
    """Headers (lower-case names) and at most :data:`ERROR_BODY_LIMIT` bytes of an error's
    body; the connection is kept only when the body was read to its end."""
    response = answer.response
    headers = {name.lower(): value for name, value in response.getheaders()}
    try:
        body = response.read(ERROR_BODY_LIMIT)
    except (OSError, http.client.HTTPException):
        body = b""
    answer.discard()
    return headers, body


def range_header(start: int, end: int | None) -> str:
    """The ``Range`` value of bytes ``[start, end)``."""
    return f"bytes={start}-" + ("" if end is None else str(end - 1))
