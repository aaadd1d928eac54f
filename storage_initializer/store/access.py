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
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from storage_initializer.store.fsutil import append_state_line, read_state_text
from storage_initializer.store.layout import Entry
from storage_initializer.store.marker import write_atomic

LOG_NAME = "access.log"
#: Lines kept by compaction: the count survives as a "total" line.
COMPACT_AFTER = 10_000
#: A "total" count: plain ASCII digits, short enough to be a real count (``str.isdigit`` takes
#: "²", and ``int`` refuses more than 4300 digits: either would crash gc on a forged line).
_COUNT = re.compile(r"[0-9]{1,18}")


@dataclass(frozen=True)
class Usage:
    hits: int
    last_used: float | None


def log_path(entry: Entry) -> Path:
    return entry.state / LOG_NAME


def record(entry: Entry, outcome: str) -> None:
    """Note one use of the entry. Never fails the pull: a read-only state directory (another
    UID without group write) only loses the record."""
    pod = "".join(c for c in os.environ.get("POD_NAME", "") if c.isprintable() and c != " ")
    line = f"{time.time():.3f} {outcome} {pod}\n"
    # Never through a link planted in its place (or as the state directory): it would
    # append to the file it names.
    if os.path.islink(entry.state):
        return
    with contextlib.suppress(OSError):
        append_state_line(log_path(entry), line)


def stamp(entry: Entry) -> tuple[int, int]:
    """The log's (inode, size): it changes with every use recorded since, whatever the
    writers' clocks say, so ``gc`` can tell that a replica used an entry after it planned to
    evict it even when that replica's node is behind in time."""
    try:
        st = log_path(entry).lstat()
    except OSError:
        return 0, 0
    return st.st_ino, st.st_size


def usage(entry: Entry) -> Usage:
    """Uses counted from the log. Every line is input (torn by racing writers, or written by
    another process of the pod's group): a time that is not a finite number, or a "total"
    that is not a plain count, is skipped; a link in the log's place is not read."""
    hits = 0
    last: float | None = None
    try:
        text = read_state_text(log_path(entry))
    except OSError:
        return Usage(0, None)
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        try:
            when = float(parts[0])
        except ValueError:
            continue  # a torn line
        if not math.isfinite(when) or when < 0:
            continue
        if len(parts) >= 3 and parts[1] == "total":
            hits += int(parts[2]) if _COUNT.fullmatch(parts[2]) else 0
        else:
            hits += 1
        last = when if last is None else max(last, when)
    return Usage(hits, last)


def compact(entry: Entry) -> None:
    """Replace a long log by one "total" line (atomic rename; concurrent appends to the old
    file in that instant are lost, as documented)."""
    path = log_path(entry)
    try:
        if path.lstat().st_size < COMPACT_AFTER * 30:
            return
    except FileNotFoundError:
        return
    current = usage(entry)
    write_atomic(path, f"{current.last_used or time.time():.3f} total {current.hits}\n")
