"""Access records: when an entry was last used and how often, kept cheaply.

Every pull that ends with the model in place appends one short line to
``<state>/access.log`` (an ``O_APPEND`` write of a few dozen bytes: no lock, no rewrite, on the
fast path too). In cache mode the line is written *before* the destination is linked, and the
pull then checks that the entry is still current: ``gc`` hides an entry first and reads the log
second, so either gc sees the use and keeps the entry, or the pull sees it gone and waits.
Racing writers on a network filesystem may lose or tear a line — a count may be off by one —
but can never touch the entry itself. ``gc`` compacts the log when it grows.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from storage_initializer.store.layout import Entry

LOG_NAME = "access.log"
#: Lines kept by compaction: the count survives as a "total" line.
COMPACT_AFTER = 10_000


@dataclass(frozen=True)
class Usage:
    hits: int
    last_used: float | None


def log_path(entry: Entry) -> Path:
    return entry.state / LOG_NAME


def record(entry: Entry, outcome: str) -> None:
    """Note one use of the entry. Never fails the pull: a read-only state directory (another
    UID without group write) only loses the record."""
    line = f"{time.time():.3f} {outcome} {os.environ.get('POD_NAME', '')}\n".encode()
    with contextlib.suppress(OSError):
        fd = os.open(log_path(entry), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o664)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


def stamp(entry: Entry) -> tuple[int, int]:
    """The log's (inode, size): it changes with every use recorded since, whatever the
    writers' clocks say, so ``gc`` can tell that a replica used an entry after it planned to
    evict it even when that replica's node is behind in time."""
    try:
        st = log_path(entry).stat()
    except OSError:
        return 0, 0
    return st.st_ino, st.st_size


def usage(entry: Entry) -> Usage:
    hits = 0
    last: float | None = None
    try:
        with open(log_path(entry), encoding="utf-8", errors="replace") as handle:
            for line in handle:
                parts = line.split()
                if not parts:
                    continue
                try:
                    when = float(parts[0])
                except ValueError:
                    continue  # a torn line
                if len(parts) >= 3 and parts[1] == "total":
                    hits += int(parts[2]) if parts[2].isdigit() else 0
                else:
                    hits += 1
                last = when if last is None else max(last, when)
    except FileNotFoundError:
        pass
    return Usage(hits, last)


def compact(entry: Entry) -> None:
    """Replace a long log by one "total" line (atomic rename; concurrent appends to the old
    file in that instant are lost, as documented)."""
    path = log_path(entry)
    try:
        if path.stat().st_size < COMPACT_AFTER * 30:
            return
    except FileNotFoundError:
        return
    current = usage(entry)
    tmp = path.with_name(f".{LOG_NAME}.{os.getpid()}.tmp")
    tmp.write_text(f"{current.last_used or time.time():.3f} total {current.hits}\n")
    os.replace(tmp, path)
