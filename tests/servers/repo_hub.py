"""What the two model-hub test servers (the Hugging Face Hub, ModelScope) share: request
counters, injected answers, ranged byte answers, and start/stop.

Why the hubs inject faults themselves instead of only through the counting proxy: large files
are redirected to a second host name of the same socket (the Hub's CDN, ModelScope's object
storage), so their downloads never pass a proxy put in front of the API; here every request,
API or content, is counted and can be faulted. Each hub module keeps its own routes and errors.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler

from tests.servers.base import LocalServer, QuietHandler

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


@dataclass
class HubFault:
    """Answer ``status`` to the next ``count`` requests whose key contains ``match`` (and, if
    set, whose method is ``method``)."""

    match: str
    status: int
    count: int
    headers: dict[str, str]
    method: str | None = None
    #: Instead of an error: send the headers of the full answer, then only this many bytes.
    truncate_after: int | None = None


class CountingHub(LocalServer):
    """Counters and faults keyed by (method, request key), and the ranges asked for."""

    def __init__(
        self, handler: type[BaseHTTPRequestHandler], host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str]] = Counter()
        self._faults: list[HubFault] = []
        #: (key, Range header) of every ranged download, in arrival order.
        self.ranges: list[tuple[str, str]] = []
        super().__init__(host, port, handler)
        self.url = self.base_url

    def inject(
        self,
        match: str,
        status: int,
        count: int = 1,
        headers: Mapping[str, str] | None = None,
        method: str | None = None,
    ) -> None:
        with self._lock:
            self._faults.append(HubFault(match, status, count, dict(headers or {}), method))

    def truncate(self, match: str, after: int, count: int = 1) -> None:
        """Cut the body of the next ``count`` matching downloads after ``after`` bytes."""
        with self._lock:
            self._faults.append(HubFault(match, 200, count, {}, "GET", truncate_after=after))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def count(self, method: str | None = None, contains: str = "") -> int:
        with self._lock:
            return sum(
                n
                for (m, p), n in self._counts.items()
                if (method is None or m == method) and contains in p
            )

    def requests(self) -> list[tuple[str, str, int]]:
        with self._lock:
            return [(m, p, n) for (m, p), n in sorted(self._counts.items())]

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()
            self.ranges.clear()

    def _record(self, method: str, key: str) -> HubFault | None:
        """Count a request; the fault it claims, if any."""
        with self._lock:
            self._counts[(method, key)] += 1
            for fault in self._faults:
                if fault.count > 0 and fault.match in key and fault.method in (None, method):
                    fault.count -= 1
                    return fault
        return None

    def wait_answering(self, path: str, what: str) -> None:
        """Return once a GET of ``path`` gets any HTTP answer (polled, 10 s at most)."""
        import http.client

        deadline = time.monotonic() + 10
        while True:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                connection.request("GET", path)
                connection.getresponse().read()  # any HTTP answer means the loop is serving
                connection.close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{what} did not answer within 10s") from None
                threading.Event().wait(0.02)  # poll interval, not synchronisation


class HubHandler(QuietHandler):
    """GET and HEAD go to ``_dispatch``; :meth:`_claim` counts a request and takes its fault."""

    #: Set by :meth:`_claim` from a truncation fault: the body is cut after this many bytes.
    truncate_after: int | None = None

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def _dispatch(self, head: bool) -> None:
        raise NotImplementedError

    def _claim(self, hub: CountingHub, key: str) -> HubFault | None:
        """Count this request under ``key`` and note its range; the error fault it claims (a
        truncation is kept in :attr:`truncate_after` instead)."""
        fault = hub._record(self.command, key)
        self.truncate_after = None
        if fault is not None and fault.truncate_after is not None:
            self.truncate_after, fault = fault.truncate_after, None
        if self.headers.get("Range") and self.command == "GET":
            with hub._lock:
                hub.ranges.append((key, self.headers["Range"]))
        return fault

    def _finish_json(self, body: bytes, head: bool) -> None:
        """The JSON headers and ``body`` (not for HEAD), after the status and other headers."""
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)


def requested_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The ``[start, end)`` a ``Range`` header asks of ``size`` bytes (None: no header), before
    any satisfiability check (each hub answers those its own way). ValueError: bad syntax."""
    if not header:
        return None
    match = _RANGE.fullmatch(header.strip())
    if not match or (not match.group(1) and not match.group(2)):
        raise ValueError(header)
    if not match.group(1):  # suffix range: the last N bytes
        return max(0, size - int(match.group(2))), size
    start = int(match.group(1))
    return start, min(size, int(match.group(2)) + 1) if match.group(2) else size
