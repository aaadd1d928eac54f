"""A loopback HTTP/1.1 server that answers byte for byte as the test says.

Why: nginx and the fault proxy speak correct HTTP; the hostile answers a data path must survive
(urgent TCP data mid-body, bytes queued after a body on a kept-alive connection, framing
http.client does not undo, a body longer than its listing) need a server whose every byte the
test chooses. It serves one file (``data``) with an ETag, ``Accept-Ranges`` and correct 200/206
answers by default; a test passes ``misbehave(server, conn, request)``, which either answers
the request itself (sending on ``conn``) and returns True, or returns False for the default.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

ETAG = '"raw-v1"'


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    #: 1 for the first GET the server saw, 2 for the second... (HEADs are not counted).
    get_number: int

    def range(self, size: int) -> tuple[int, int] | None:
        """The asked ``[start, end)``, None without a Range header."""
        match = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("range", ""))
        if not match:
            return None
        end = int(match.group(2)) + 1 if match.group(2) else size
        return int(match.group(1)), min(end, size)


Misbehave = Callable[["RawHttp", socket.socket, Request], bool]


class RawHttp:
    def __init__(self, data: bytes, misbehave: Misbehave | None = None, ranges: bool = True):
        self.data = data
        self.misbehave = misbehave
        self.ranges = ranges
        self.gets = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, name: str = "model.bin") -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        for conn in list(self._conns):
            with contextlib.suppress(OSError):
                conn.close()

    # -- answers a misbehave hook can build on ----------------------------------------------

    def head(self, status: str, headers: list[tuple[str, str]]) -> bytes:
        lines = [f"HTTP/1.1 {status}"] + [f"{name}: {value}" for name, value in headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def answer(self, request: Request) -> tuple[bytes, bytes]:
        """The correct head and body for ``request`` (a GET), as the default serves them."""
        size = len(self.data)
        asked = request.range(size) if self.ranges else None
        headers = [("ETag", ETAG), ("Content-Type", "application/octet-stream")]
        if self.ranges:
            headers.append(("Accept-Ranges", "bytes"))
        if asked is None:
            start, end, status = 0, size, "200 OK"
        else:
            start, end = asked
            status = "206 Partial Content"
            headers.append(("Content-Range", f"bytes {start}-{end - 1}/{size}"))
        body = self.data[start:end]
        headers.append(("Content-Length", str(len(body))))
        return self.head(status, headers), body

    # -- serving ----------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pending = bytearray()
        with contextlib.suppress(OSError), conn:
            while True:
                request = self._read_request(conn, pending)
                if request is None:
                    return
                if self.misbehave is not None and self.misbehave(self, conn, request):
                    continue
                if request.method == "HEAD":
                    headers = [("ETag", ETAG), ("Content-Length", str(len(self.data)))]
                    if self.ranges:
                        headers.append(("Accept-Ranges", "bytes"))
                    conn.sendall(self.head("200 OK", headers))
                    continue
                head, body = self.answer(request)
                conn.sendall(head + body)

    def _read_request(self, conn: socket.socket, pending: bytearray) -> Request | None:
        while b"\r\n\r\n" not in pending:
            data = conn.recv(65536)
            if not data:
                return None
            pending += data
        raw, _, rest = bytes(pending).partition(b"\r\n\r\n")
        pending[:] = rest
        first, *lines = raw.decode("latin-1").split("\r\n")
        method, path, _ = first.split(" ", 2)
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        with self._lock:
            if method == "GET":
                self.gets += 1
            number = self.gets
        return Request(method, path, headers, number)
