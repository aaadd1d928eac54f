"""An HTTP origin that holds downloads in the middle until the test says so.

Why: the cache tests need a real pull process that is *downloading right now* — holding the
lease, heartbeating, with bytes in staging — while ``gc`` or ``status`` runs, and they must not
depend on timing (a throttled server finishes when it finishes). Here every GET of a gated file
sends its first ``hold_after`` bytes, flushes them, and then waits until the test opens the gate
(the rest follows: the pull completes) or cuts it (the connection closes mid-body: the pull
fails with a broken transfer, keeping its staging area for a resume). Files not gated are
served whole. HEAD, ``ETag`` (the content's hash, so changing a file is a new version) and
single ``Range`` requests behave as a plain static server's.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

#: How long a held request waits for the test at most (a failing test must not hang forever).
HOLD_LIMIT = 120.0


class _Gate:
    def __init__(self, hold_after: int) -> None:
        self.hold_after = hold_after
        self.state = "closed"  # closed (hold), open (send the rest), cut (close mid-body)
        self.held = 0


class GatedOrigin:
    """``files``: name → bytes; :meth:`gate` a name to hold its GETs after ``hold_after``."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = dict(files)
        self._gates: dict[str, _Gate] = {}
        self._changed = threading.Condition()
        self.gets: list[str] = []
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                """Quiet: the test reads :attr:`GatedOrigin.gets` instead."""

            def do_HEAD(self) -> None:
                origin._answer(self, body=False)

            def do_GET(self) -> None:
                origin._answer(self, body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # -- control -------------------------------------------------------------------------------

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/{name}"

    def gate(self, name: str, hold_after: int) -> None:
        with self._changed:
            self._gates[name] = _Gate(hold_after)

    def wait_held(self, name: str, count: int = 1, deadline: float = 60.0) -> None:
        """Block until ``count`` GETs of ``name`` are held at the gate."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._gates[name].held >= count, deadline):
                raise AssertionError(f"no download of {name} reached the gate in {deadline}s")

    def open(self, name: str) -> None:
        self._set(name, "open")

    def cut(self, name: str) -> None:
        self._set(name, "cut")

    def _set(self, name: str, state: str) -> None:
        with self._changed:
            self._gates[name].state = state
            self._changed.notify_all()

    # -- serving -------------------------------------------------------------------------------

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        name = handler.path.lstrip("/").split("?", 1)[0]
        data = self.files.get(name)
        if data is None:
            handler.send_response(404)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        start, end, status = 0, len(data), 200
        wanted = handler.headers.get("Range", "")
        if wanted.startswith("bytes="):
            first, _, last = wanted[6:].partition("-")
            start = int(first or 0)
            end = int(last) + 1 if last else len(data)
            status = 206
        handler.send_response(status)
        handler.send_header("Content-Type", "application/octet-stream")
        handler.send_header("Content-Length", str(end - start))
        handler.send_header("Accept-Ranges", "bytes")
        handler.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()[:16]}"')
        if status == 206:
            handler.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        handler.end_headers()
        if not body:
            return
        with self._changed:
            self.gets.append(name)
        payload = data[start:end]
        gate = self._gates.get(name)
        try:
            if gate is None:
                handler.wfile.write(payload)
                return
            handler.wfile.write(payload[: gate.hold_after])
            handler.wfile.flush()
            with self._changed:
                gate.held += 1
                self._changed.notify_all()
                self._changed.wait_for(lambda: gate.state != "closed", HOLD_LIMIT)
                state = gate.state
            if state == "open":
                handler.wfile.write(payload[gate.hold_after :])
                return
            handler.close_connection = True
            with contextlib.suppress(OSError):
                handler.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            handler.close_connection = True  # the client went away (a killed pull)

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> GatedOrigin:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        with self._changed:
            for gate in self._gates.values():
                gate.state = "cut"
            self._changed.notify_all()
        self._server.shutdown()
        self._server.server_close()
