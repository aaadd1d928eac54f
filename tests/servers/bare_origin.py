"""A static HTTP origin that gives no ETag, and a Last-Modified date only when told.

Why: nginx always sends both validators. A server without any (a small app, some object
gateways) is one where a file replaced during a ranged download cannot be detected, so the
product must read the file in one stream; one with only Last-Modified, and that ignores
conditional headers, must be caught by the date of its answers. It honours single ``Range``
requests (206, Accept-Ranges) like any static server and records every request; ``before_get``
runs as a GET arrives (before it is answered), so a test can replace a file at an exact point.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from tests.servers.base import LocalServer, QuietHandler


@dataclass
class Seen:
    method: str
    path: str
    range: str | None


class _Handler(QuietHandler):
    def do_HEAD(self) -> None:
        self.server.owner._answer(self, body=False)

    def do_GET(self) -> None:
        self.server.owner._answer(self, body=True)


class BareOrigin(LocalServer):
    """``files``: name → bytes, served without ETag; ``last_modified``: name → HTTP date."""

    handler = _Handler
    name = "bare-origin"

    def __init__(
        self,
        files: dict[str, bytes],
        last_modified: dict[str, str] | None = None,
        before_get: Callable[[Seen], None] | None = None,
    ) -> None:
        self.files = dict(files)
        self.last_modified = dict(last_modified or {})
        self.before_get = before_get
        self.requests: list[Seen] = []
        self._lock = threading.Lock()
        super().__init__()

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"

    def _answer(self, handler: QuietHandler, body: bool) -> None:
        name = handler.path.lstrip("/").split("?", 1)[0]
        wanted = handler.headers.get("Range")
        seen = Seen(handler.command, name, wanted)
        with self._lock:
            self.requests.append(seen)
            if self.before_get is not None and handler.command == "GET":
                self.before_get(seen)
            data = self.files.get(name)
            modified = self.last_modified.get(name)
        if data is None:
            handler.send_response(404)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        start, end, status = 0, len(data), 200
        if wanted and wanted.startswith("bytes="):
            first, _, last = wanted[6:].partition("-")
            start = int(first or 0)
            end = min(int(last) + 1, len(data)) if last else len(data)
            status = 206
        handler.send_response(status)
        handler.send_header("Content-Type", "application/octet-stream")
        handler.send_header("Content-Length", str(end - start))
        handler.send_header("Accept-Ranges", "bytes")
        if modified:
            handler.send_header("Last-Modified", modified)
        if status == 206:
            handler.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        handler.end_headers()
        if body:
            try:
                handler.wfile.write(data[start:end])
            except OSError:
                handler.close_connection = True
