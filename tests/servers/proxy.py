"""A counting, fault-injecting HTTP reverse proxy for tests of every backend.

Put it between a client and a real test server (moto, fake-gcs-server, azurite, the Hub
server) to

- **count** what reaches the origin: every request is recorded (method, path, query, Range,
  status, body bytes sent) as soon as its response starts, so "each object was fetched exactly
  once" is a plain assertion after the clients finish;
- **inject faults** into chosen requests: an HTTP error status (500/503/429 with
  ``Retry-After``, 403 with an S3-style XML body...), a body cut off mid-way (the connection is
  closed after part of the announced ``Content-Length``), a delay before forwarding, or a
  connection closed before any answer;
- **gate** chosen requests: hold them until the test opens the gate, so that "the origin is
  answering while the other replicas arrive" is a state the test waits for, not a race.

Everything is forwarded unchanged (method, path, query, headers including ``Host`` and
``Range``, body), so signed requests (SigV4, SAS) stay valid and path-style S3 works with the
proxy's URL as ``AWS_ENDPOINT_URL``. Responses are streamed in 64 KiB blocks.

Usage::

    with CountingProxy(server.endpoint) as proxy:
        env["AWS_ENDPOINT_URL"] = proxy.url
        proxy.set_faults(Fault(status=503, times=2, method="GET"))
        ...
        assert proxy.count(method="GET", path_contains="/model/") == 3
"""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from tests.servers.base import LocalServer, QuietHandler

CHUNK = 64 * 1024
#: Headers that describe one hop, not the message: never forwarded as they are.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)


@dataclass
class RequestRecord:
    """One request as the proxy saw it. ``bytes`` grows while the body streams."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    range: str | None
    status: int = 0
    bytes: int = 0
    fault: str | None = None
    #: time.monotonic() when the request arrived (for measurements, never for assertions).
    at: float = field(default_factory=time.monotonic)


@dataclass
class Fault:
    """What to do to matching requests.

    ``kind``: ``"status"`` (answer ``status`` with ``body``/``headers`` instead of forwarding),
    ``"truncate"`` (forward, then close after ``truncate_fraction`` of the body), ``"delay"``
    (sleep ``delay`` seconds, then forward), ``"drop"`` (close the connection without answering),
    ``"trickle"`` (forward ``truncate_fraction`` of the body at full speed, then one byte every
    ``delay`` seconds: the server whose every read arrives in time but never finishes),
    ``"strip"`` (forward without the request headers named in ``strip_headers``, e.g. ``Range``
    to emulate an origin that ignores ranges; ``strip_headers`` apply to ``"truncate"`` too, and
    ``hide_headers`` drops response headers, e.g. ``Accept-Ranges``: an origin that cannot
    resume and cuts every answer), ``"gate"`` (hold the request until ``gate`` is
    set, at most ``gate_timeout`` seconds, then forward it; ``hits`` says how many arrived),
    ``"hold"`` (forward, send the first ``hold_after`` bytes of the body, then hold the rest
    until ``gate`` is set, at most ``gate_timeout`` seconds; ``held`` says how many responses
    sent exactly that much and are holding: a client is then known to be mid-body; after
    :meth:`release` with ``cut=True`` the held responses close mid-body instead of finishing).
    ``"trickle"`` sends ``step`` bytes each ``delay`` (1 by default).
    A request matches when ``method`` (if set) equals its method, ``path_contains`` (if set) is in
    its path, and ``predicate`` (if set) returns true. ``times``: only the first N matches are
    faulted (None: all); ``probability``: fault that fraction of matches (seeded, reproducible).
    """

    kind: str = "status"
    status: int = 503
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    method: str | None = None
    path_contains: str | None = None
    predicate: Callable[[RequestRecord], bool] | None = None
    times: int | None = None
    probability: float = 1.0
    truncate_fraction: float = 0.5
    delay: float = 0.0
    strip_headers: tuple[str, ...] = ()
    hide_headers: tuple[str, ...] = ()
    gate: threading.Event | None = None
    gate_timeout: float = 60.0
    hold_after: int = 0
    step: int = 1
    seed: int = 0
    #: Set by :meth:`release` with ``cut=True``: held responses close instead of finishing.
    cut: bool = False
    #: How many responses of a ``"hold"`` fault sent their ``hold_after`` bytes and wait.
    held: int = 0
    #: How many requests this fault has hit so far.
    hits: int = 0
    _random: random.Random = field(default_factory=random.Random, repr=False)

    def __post_init__(self) -> None:
        self._random.seed(self.seed)

    def release(self, cut: bool = False) -> None:
        """Open the gate: held responses finish, or with ``cut`` close mid-body (a transfer
        that breaks after its first bytes)."""
        self.cut = cut
        if self.gate is not None:
            self.gate.set()

    def matches(self, record: RequestRecord) -> bool:
        if self.method and record.method != self.method.upper():
            return False
        if self.path_contains and self.path_contains not in record.path:
            return False
        return not (self.predicate and not self.predicate(record))

    def claim(self, record: RequestRecord) -> bool:
        """Decide (under the proxy's lock) whether this request is faulted."""
        if not self.matches(record):
            return False
        if self.times is not None and self.hits >= self.times:
            return False
        if self.probability < 1.0 and self._random.random() >= self.probability:
            return False
        self.hits += 1
        return True


def s3_error(
    code: str,
    message: str,
    status: int = 503,
    headers: dict[str, str] | None = None,
    **options: Any,
) -> Fault:
    """A fault answering like S3 does: an XML ``<Error>`` body botocore parses into a code.
    ``options`` are further :class:`Fault` fields (``method``, ``path_contains``, ``times``...)."""
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
        f"<Message>{message}</Message><RequestId>proxy</RequestId></Error>"
    ).encode()
    return Fault(
        status=status,
        body=body,
        headers={"Content-Type": "application/xml", **(headers or {})},
        **options,
    )


class _Handler(QuietHandler):
    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        proxy: CountingProxy = self.server.owner
        path, _, query = self.path.partition("?")
        record = RequestRecord(
            method=self.command,
            path=path,
            query=query,
            headers={k: v for k, v in self.headers.items()},
            range=self.headers.get("Range"),
        )
        body = self._body()
        fault = proxy._claim_fault(record)
        if fault is not None:
            record.fault = fault.kind
            if fault.kind == "delay":
                time.sleep(fault.delay)  # simulated latency of the origin
            elif fault.kind == "gate":
                if fault.gate is not None:
                    fault.gate.wait(fault.gate_timeout)  # until the test opens the gate
            elif fault.kind == "drop":
                proxy._record(record)
                self.close_connection = True  # the server closes the socket, unanswered
                return
            elif fault.kind == "status":
                self._answer_fault(record, fault)
                return
        self._forward(record, body, fault)

    def _answer_fault(self, record: RequestRecord, fault: Fault) -> None:
        record.status = fault.status
        proxy: CountingProxy = self.server.owner
        proxy._record(record)
        self.send_response(fault.status)
        for name, value in fault.headers.items():
            self.send_header(name, value)
        payload = b"" if self.command == "HEAD" else fault.body
        self.send_header("Content-Length", str(len(fault.body)))
        self.end_headers()
        if payload:
            proxy._add_bytes(record, len(payload))
            self.wfile.write(payload)

    def _forward(self, record: RequestRecord, body: bytes, fault: Fault | None) -> None:
        proxy: CountingProxy = self.server.owner
        truncate = fault if fault is not None and fault.kind in ("truncate", "trickle") else None
        hold = fault if fault is not None and fault.kind == "hold" else None
        stripped = (
            {h.lower() for h in fault.strip_headers}
            if fault and fault.kind in ("strip", "truncate")
            else set()
        )
        hidden = {h.lower() for h in fault.hide_headers} if fault else set()
        upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
        try:
            headers = {
                k: v
                for k, v in self.headers.items()
                if k.lower() not in HOP_BY_HOP
                and k.lower() != "expect"
                and k.lower() not in stripped
            }
            if (
                body
                or "Content-Length" in self.headers
                or "chunked" in self.headers.get("Transfer-Encoding", "")
            ):
                headers = {k: v for k, v in headers.items() if k.lower() != "content-length"}
                headers["Content-Length"] = str(len(body))
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in headers.items():
                upstream.putheader(name, value)
            upstream.endheaders(body or None)
            response = upstream.getresponse()
            record.status = response.status
            proxy._record(record)
            length = response.getheader("Content-Length")
            self.send_response_only(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in HOP_BY_HOP and name.lower() not in hidden:
                    self.send_header(name, value)
            framed = length is not None or self.command == "HEAD" or response.status in (204, 304)
            if not framed:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if self.command == "HEAD":
                return
            limit = None
            if truncate is not None:
                total = int(length) if length is not None else 0
                limit = int(total * truncate.truncate_fraction)
            sent = 0
            while True:
                want = CHUNK if limit is None else min(CHUNK, limit - sent)
                if want <= 0 and truncate is not None and truncate.kind == "trickle":
                    self._trickle(record, response, truncate.delay, truncate.step)
                    return
                if hold is not None and sent < hold.hold_after:
                    want = min(want, hold.hold_after - sent)
                elif hold is not None:
                    self.wfile.flush()
                    proxy._hold(hold)
                    if hold.cut:
                        self._cut()
                        return
                    hold = None
                    continue
                if want <= 0:
                    self._cut()
                    return
                block = response.read(want)
                if not block:
                    return
                proxy._add_bytes(record, len(block))
                self.wfile.write(block)
                sent += len(block)
        except (ConnectionError, TimeoutError, OSError) as exc:
            if record.status == 0:
                record.status = 502
                record.fault = record.fault or f"upstream: {exc}"
                proxy._record(record)
                self._bad_gateway(str(exc))
            else:
                self.close_connection = True
        finally:
            upstream.close()

    def _cut(self) -> None:
        """Close mid-body: the client's announced Content-Length will never be reached."""
        self.close_connection = True
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)

    def _trickle(
        self, record: RequestRecord, response: http.client.HTTPResponse, pace: float, step: int
    ) -> None:
        """The rest of the body ``step`` bytes every ``pace`` seconds, until the client gives
        up or the proxy stops."""
        proxy: CountingProxy = self.server.owner
        self.close_connection = True
        while not proxy._stopping.wait(pace):  # the trickle's pace, not a synchronisation
            block = response.read(step)
            if not block:
                return
            proxy._add_bytes(record, len(block))
            self.wfile.write(block)
            self.wfile.flush()

    def _bad_gateway(self, reason: str) -> None:
        payload = f"proxy: upstream failed: {reason}".encode()
        try:
            self.send_response(502)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except OSError:
            self.close_connection = True

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = _handle


class CountingProxy(LocalServer):
    """A reverse proxy in front of ``upstream`` (``http://host:port``), on 127.0.0.1."""

    handler = _Handler
    name = "counting-proxy"

    def __init__(self, upstream: str, host: str = "127.0.0.1", port: int = 0) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream = upstream.rstrip("/")
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port or 80
        self._lock = threading.Lock()
        self._requests: list[RequestRecord] = []
        self._faults: list[Fault] = []
        super().__init__(host, port)

    @property
    def url(self) -> str:
        return self.base_url

    # -- faults
    def set_faults(self, *faults: Fault | Iterable[Fault]) -> None:
        """Replace the active faults (the first matching fault with quota left applies)."""
        flat: list[Fault] = []
        for item in faults:
            if isinstance(item, Fault):
                flat.append(item)
            else:
                flat.extend(item)
        with self._lock:
            self._faults = flat

    def add_fault(self, fault: Fault) -> Fault:
        """Add ``fault`` after the active ones (they stay); returns it, for its counters."""
        with self._lock:
            self._faults = [*self._faults, fault]
        return fault

    def clear_faults(self) -> None:
        self.set_faults()

    def _claim_fault(self, record: RequestRecord) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.claim(record):
                    return fault
        return None

    # -- counting
    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self._requests.append(record)

    def _hold(self, fault: Fault) -> None:
        """A ``"hold"`` response sent its first bytes: say so, and wait for the test."""
        with self._lock:
            fault.held += 1
        if fault.gate is not None:
            fault.gate.wait(fault.gate_timeout)

    def _add_bytes(self, record: RequestRecord, size: int) -> None:
        with self._lock:
            record.bytes += size

    @property
    def requests(self) -> list[RequestRecord]:
        """A snapshot of the requests seen so far, in arrival order of their answers."""
        with self._lock:
            return list(self._requests)

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()

    def select(
        self,
        method: str | None = None,
        path_contains: str | None = None,
        status: int | None = None,
        faulted: bool | None = None,
    ) -> list[RequestRecord]:
        found = []
        for record in self.requests:
            if method and record.method != method.upper():
                continue
            if path_contains and path_contains not in record.path:
                continue
            if status is not None and record.status != status:
                continue
            if faulted is not None and (record.fault is not None) != faulted:
                continue
            found.append(record)
        return found

    def count(self, **criteria: object) -> int:
        """How many requests match (see :meth:`select` for the criteria)."""
        return len(self.select(**criteria))  # type: ignore[arg-type]

    def bytes_served(self, **criteria: object) -> int:
        """Body bytes sent to clients by the matching requests."""
        return sum(r.bytes for r in self.select(**criteria))  # type: ignore[arg-type]


class TcpCounter:
    """A TCP relay on 127.0.0.1 that counts connections and forwards bytes both ways unchanged.

    For what the HTTP proxy cannot see: TLS handshakes that fail (put it in front of a TLS
    server; each connection is one handshake attempt, so "the client did not retry a
    certificate failure" is ``counter.connections == 1``)."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.connections = 0
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port: int = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="tcp-counter", daemon=True)

    def __enter__(self) -> TcpCounter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sock.close()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=30)
        except OSError:
            client.close()
            return

        def pump(source: socket.socket, target: socket.socket) -> None:
            try:
                while data := source.recv(CHUNK):
                    target.sendall(data)
            except OSError:
                pass
            finally:
                for end in (source, target):
                    with contextlib.suppress(OSError):
                        end.shutdown(socket.SHUT_RDWR)

        back = threading.Thread(target=pump, args=(upstream, client), daemon=True)
        back.start()
        pump(client, upstream)
        back.join(timeout=30)
        client.close()
        upstream.close()
