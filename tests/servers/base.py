"""The boilerplate every in-process test HTTP server shares: a quiet HTTP/1.1 handler and a
threaded server on 127.0.0.1 run in a daemon thread, with start/stop and ``with``.

Why one base: the counting proxy and the few dedicated origins (behaviour no proxy in front of
nginx can produce) each need exactly this, and copies of it drift (one forgets
``daemon_threads`` and a held request blocks shutdown). Handlers reach their owner as
``self.server.owner``. :func:`closed_port` is the server that is not there.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self


class QuietHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 (keep-alive, like real servers) and no access log on stderr: tests read what
    the server records instead."""

    protocol_version = "HTTP/1.1"
    #: TCP_NODELAY, as real servers set it: headers and body go out as two writes, and with
    #: Nagle the body would wait for the client's delayed ACK (40 ms an answer on loopback).
    disable_nagle_algorithm = True
    server: OwnedServer

    def log_message(self, format: str, *args: object) -> None:
        """Silence the default stderr access log."""


class OwnedServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: Any


class LocalServer:
    """A threaded HTTP server on ``host`` (127.0.0.1) answering with ``handler`` (the argument,
    else the class attribute); subclasses keep their state on ``self``."""

    handler: type[BaseHTTPRequestHandler]
    name = "test-server"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        handler: type[BaseHTTPRequestHandler] | None = None,
    ) -> None:
        self._server = OwnedServer((host, port), handler or self.handler)
        self._server.owner = self
        self._thread: threading.Thread | None = None
        #: Set by :meth:`stop`: long answers (trickles) end when it is.
        self._stopping = threading.Event()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        host = self._server.server_address[0]
        return f"http://{host}:{self.port}"

    def start(self) -> Self:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},  # how fast stop() returns
            name=self.name,
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
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
