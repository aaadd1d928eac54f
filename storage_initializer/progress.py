"""Thread-safe transfer counters shared by the engine, the reporter and the lease heartbeat."""

from __future__ import annotations

import threading
import time
from typing import Any


class Progress:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.monotonic()
        self.phase = "starting"
        self.bytes_total = 0
        self.bytes_done = 0
        self.bytes_reused = 0
        self.bytes_from_origin = 0
        self.files_total = 0
        self.files_done = 0
        self.retries = 0
        self.verify_failures = 0
        #: Of ``bytes_from_origin``, those moved from socket to file by the kernel (splice.py).
        self.bytes_spliced = 0
        #: Seconds spent in each phase, closed when the next phase starts (see set_phase).
        self.phases: dict[str, float] = {}
        self._phase_started = self.started

    def set_phase(self, phase: str) -> None:
        """Enter ``phase``; the time since the previous phase began is booked to that one."""
        now = time.monotonic()
        with self._lock:
            if self.phase != "starting":
                self.phases[self.phase] = (
                    self.phases.get(self.phase, 0.0) + now - self._phase_started
                )
            self.phase = phase
            self._phase_started = now

    def verify_failed(self) -> None:
        with self._lock:
            self.verify_failures += 1

    def set_totals(self, files: int, size: int) -> None:
        with self._lock:
            self.files_total = files
            self.bytes_total = size

    def transferred(self, count: int) -> None:
        with self._lock:
            self.bytes_done += count
            self.bytes_from_origin += count

    def spliced(self, count: int) -> None:
        """``count`` transferred bytes went from the socket to the file without a copy."""
        with self._lock:
            self.bytes_spliced += count

    def rewound(self, count: int) -> None:
        """Bytes that must be fetched again (a source without ranges restarted a file)."""
        with self._lock:
            self.bytes_done -= count

    def reused(self, size: int) -> None:
        with self._lock:
            self.bytes_reused += size
            self.bytes_done += size
            self.files_done += 1

    def reused_bytes(self, size: int) -> None:
        """Part of a file kept from a previous owner's staging area."""
        with self._lock:
            self.bytes_reused += size
            self.bytes_done += size

    def file_done(self) -> None:
        with self._lock:
            self.files_done += 1

    def retried(self) -> None:
        with self._lock:
            self.retries += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "phase": self.phase,
                "bytes_done": self.bytes_done,
                "bytes_total": self.bytes_total,
                "bytes_reused": self.bytes_reused,
                "bytes_from_origin": self.bytes_from_origin,
                "files_done": self.files_done,
                "files_total": self.files_total,
                "retries": self.retries,
                "elapsed": time.monotonic() - self.started,
            }
