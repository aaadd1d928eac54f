"""What the user sees: log lines, progress lines, and the final summary.

Logs go to stderr with timestamps (the stock initializer's shape), or one JSON object a line
with ``--log-format json``. Every record passes through :func:`redact` on the way out. Progress
is a line every ``--progress-interval`` seconds when stderr is not a terminal (kubectl logs), a
live bar when it is.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from storage_initializer import signals
from storage_initializer.redact import escape_controls, redact

LOGGER_NAME = "storage_initializer"
TEXT_FORMAT = "%(asctime)s.%(msecs)03d %(process)d %(levelname)s %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"

log = logging.getLogger(LOGGER_NAME)


def _one_line(record: logging.LogRecord) -> logging.LogRecord:
    """A copy of ``record`` whose message has its control characters escaped: a file name or
    URI holding a newline cannot forge a second log line (a traceback, debug only, keeps its
    own lines)."""
    message = record.getMessage()
    escaped = escape_controls(message)
    if escaped == message:
        return record
    copy = logging.makeLogRecord(record.__dict__)
    copy.msg, copy.args = escaped, None
    return copy


#: What json.dumps leaves raw but a line-splitting log reader or a terminal would act on.
_JSON_UNSAFE = {
    0x2028: "\\u2028",
    0x2029: "\\u2029",
    **{c: f"\\u{c:04x}" for c in range(0x7F, 0xA0)},
}


class _RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(_one_line(record)))


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "pid": record.process,
            "message": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            data.update(extra)
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return redact(json.dumps(data, ensure_ascii=False, default=str)).translate(_JSON_UNSAFE)


def setup_logging(log_format: str = "text", level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_RedactingFormatter(TEXT_FORMAT, DATE_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger(LOGGER_NAME).setLevel(level)


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def describe_progress(snap: dict[str, Any], rate: float | None = None) -> str:
    done, total = snap.get("bytes_done", 0), snap.get("bytes_total", 0)
    text = f"{human_bytes(done)}"
    if total:
        text += f" / {human_bytes(total)} ({100 * done / total:.0f}%)"
    text += f", {snap.get('files_done', 0)}/{snap.get('files_total', 0)} files"
    if rate:
        text += f", {human_bytes(rate)}/s"
        if total and done < total:
            text += f", ETA {max(0.0, (total - done) / rate):.0f}s"
    return text


class ProgressReporter:
    """Prints progress of a download this process runs, on a daemon thread."""

    def __init__(self, label: str, interval: float, snapshot: Callable[[], dict[str, Any]]):
        self.label = label
        self.interval = interval
        self.snapshot = snapshot
        self.tty = sys.stderr.isatty()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
        self._last: tuple[float, int] | None = None

    def __enter__(self) -> ProgressReporter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()

    def _rate(self, snap: dict[str, Any]) -> float | None:
        now, done = time.monotonic(), int(snap.get("bytes_done", 0))
        rate = None
        if self._last is not None and now > self._last[0]:
            rate = (done - self._last[1]) / (now - self._last[0])
        elif snap.get("elapsed"):
            # The first line: the average so far, so that it too has a rate and an ETA.
            rate = int(snap.get("bytes_from_origin", 0)) / float(snap["elapsed"]) or None
        self._last = (now, done)
        return rate

    def _run(self) -> None:
        interval = 0.5 if self.tty else self.interval
        while not self._stop.wait(interval):
            if signals.received() is not None:
                # Terminated: the run's last line says so, and a pull still unwinding (one
                # stuck in a request is not waited for) must not print after it.
                return
            snap = self.snapshot()
            if snap.get("phase") != "transfer":
                continue
            rate = self._rate(snap)
            line = describe_progress(snap, rate)
            if self.tty:
                sys.stderr.write(f"\r\033[K{escape_controls(redact(f'{self.label}: {line}'))}")
                sys.stderr.flush()
            else:
                left = int(snap.get("bytes_total", 0)) - int(snap.get("bytes_done", 0))
                eta = max(0.0, left / rate) if rate and rate > 0 and left > 0 else None
                log.info(
                    "progress %s: %s",
                    self.label,
                    line,
                    extra={"fields": {"event": "progress", **snap, "rate": rate, "eta": eta}},
                )


def summary(fields: dict[str, Any], log_format: str) -> None:
    """The one line a run ends with on success."""
    if log_format == "json":
        log.info("summary", extra={"fields": {"event": "summary", **fields}})
        return
    outcome = fields["outcome"]
    what = {
        "downloaded": "downloaded",
        "waited": "waited for another replica's download",
        "complete": "found complete",
        "linked": "linked",
        "copied-up": "copied up from a slower cache tier",
        "no-op": "nothing to download",
    }.get(outcome, outcome)
    split = ""
    if fields.get("files_fetched") or fields.get("files_reused"):
        fetched, reused = fields.get("files_fetched", 0), fields.get("files_reused", 0)
        split = f" ({fetched} fetched, {reused} reused)"
    log.info(
        "summary: %s %s -> %s: %s from origin, %s reused, %d files%s, %.2fs",
        what,
        fields["source"],
        fields["dest"],
        human_bytes(fields.get("bytes_from_origin", 0)),
        human_bytes(fields.get("bytes_reused", 0)),
        fields.get("files", 0),
        split,
        fields.get("seconds", 0.0),
    )
