"""Small threaded HTTP servers that misbehave on purpose, for the network-path tests.

- :class:`FileServer` serves named blobs with ``Range`` support and records every request
  (method, path, headers, range). Per path, a *trickle* makes the first ``trickle_times`` GETs
  send ``trickle_after`` bytes at full speed and then one byte every ``trickle_interval``
  seconds: the server that holds a pod in Init for hours. Redirects (any status, any
  ``Location``, to this server or another) are answered from a table.
- :func:`closed_port` gives a loopback port that refuses connections (bound, never listening).

Real sockets, real threads: what the client sees is exactly what a slow or hostile server
sends. The trickle stops as soon as the client goes away (a write fails) or the server stops.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    range: str | None
    #: time.monotonic() when the request arrived.
    at: float = field(default_factory=time.monotonic)


@dataclass
class Trickle:
    after: int = 0
    interval: float = 2.0
    times: int = 1
    #: Bytes sent each interval.
    step: int = 1
    hits: int = 0
    #: time.monotonic() when each trickle began (the fast part sent), for measurements.
    began: list[float] = field(default_factory=list)


@dataclass
class _State:
    blobs: dict[str, bytes] = field(default_factory=dict)
    redirects: dict[str, tuple[int, str]] = field(default_factory=dict)
    trickles: dict[str, Trickle] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def _handle(self) -> None:
        state = self.server.state
        path = self.path.split("?", 1)[0]
        with state.lock:
            state.seen.append(
                Seen(self.command, path, dict(self.headers.items()), self.headers.get("Range"))
            )
            redirect = state.redirects.get(path)
            blob = state.blobs.get(path)
            trickle = state.trickles.get(path)
            slow = trickle is not None and self.command == "GET" and trickle.hits < trickle.times
            if slow:
                assert trickle is not None
                trickle.hits += 1
        if redirect is not None:
            status, location = redirect
            self.send_response(status)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if blob is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, end = 0, len(blob)
        match = _RANGE.match(self.headers.get("Range", ""))
        if match:
            start = int(match.group(1))
            end = min(len(blob), int(match.group(2)) + 1) if match.group(2) else len(blob)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(blob)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("ETag", f'"{len(blob)}"')
        self.end_headers()
        if self.command == "HEAD":
            return
        body = blob[start:end]
        try:
            if not slow:
                self.wfile.write(body)
                return
            assert trickle is not None
            self.wfile.write(body[: trickle.after])
            self.wfile.flush()
            with state.lock:
                trickle.began.append(time.monotonic())
            for index in range(trickle.after, len(body), trickle.step):
                if state.stopping.wait(trickle.interval):  # the trickle's pace, not a sync
                    break
                self.wfile.write(body[index : index + trickle.step])
                self.wfile.flush()
            self.close_connection = True
        except OSError:
            self.close_connection = True  # the client gave up: what a stall guard does

    do_GET = do_HEAD = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    state: _State


class FileServer:
    """A threaded HTTP server on 127.0.0.1 serving ``blobs`` (path → bytes)."""

    def __init__(self) -> None:
        self.state = _State()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.state = self.state
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.origin}/{path.lstrip('/')}"

    def add(self, path: str, data: bytes) -> str:
        with self.state.lock:
            self.state.blobs["/" + path.lstrip("/")] = data
        return self.url(path)

    def redirect(self, path: str, location: str, status: int = 302) -> str:
        with self.state.lock:
            self.state.redirects["/" + path.lstrip("/")] = (status, location)
        return self.url(path)

    def trickle(
        self, path: str, after: int = 0, interval: float = 2.0, times: int = 1, step: int = 1
    ) -> None:
        """The first ``times`` GETs of ``path``: ``after`` bytes at once, then ``step`` bytes
        every ``interval`` seconds."""
        with self.state.lock:
            self.state.trickles["/" + path.lstrip("/")] = Trickle(after, interval, times, step)

    def trickle_starts(self, path: str) -> list[float]:
        with self.state.lock:
            trickle = self.state.trickles.get("/" + path.lstrip("/"))
            return list(trickle.began) if trickle else []

    def seen(self, method: str | None = None) -> list[Seen]:
        with self.state.lock:
            return [s for s in self.state.seen if method is None or s.method == method]

    def start(self) -> FileServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.state.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> FileServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port that refuses every connection for as long as the block runs: bound (so
    nobody else takes it) but never listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])
    finally:
        sock.close()
