"""How a lease looks from outside: reading its file, and judging it free, held or stale.

Split from lease.py (which claims, renews and releases): everything here only reads, so
``status``, ``gc`` and waiters share one definition of "stale". The rules are in lease.py's
docstring and docs/concurrency.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import socket
import stat
import time
import uuid
from enum import StrEnum
from pathlib import Path
from typing import Any

from storage_initializer.store.layout import Entry, EntryMode

log = logging.getLogger(__name__)

#: Twelve digits, or more once a (planted, absurd) generation outgrows them: the next
#: generation after ``lease.999999999999.json`` must be seen as the current one.
LEASE_RE = re.compile(r"^lease\.(\d{12,})\.json$")
#: Allowance on top of ``stale_after`` before a one-look reader calls a lease file old: where
#: writers stamp mtimes with their own clock (some FUSE and cluster filesystems), it is the
#: skew between nodes that the one-look test tolerates. Waiters do not use it.
CLOCK_SKEW = 30.0
#: A lease file larger than this is not a lease.
MAX_LEASE_BYTES = 1 << 20
#: Field types of a lease; a field of another type is dropped (see read_lease).
_NUMBERS: tuple[str, ...]
_NUMBERS = ("pid", "generation", "started", "heartbeat", "bytes_done", "bytes_total")
_NUMBERS += ("bytes_reused", "bytes_from_origin", "files_done", "files_total", "retries")
_STRINGS = ("owner", "host", "host_id", "pod", "pid_start", "phase", "source", "outcome")
_warned: set[str] = set()


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def _pid_start(pid: int) -> str:
    """Start time of a process in clock ticks since boot (defends against pid reuse)."""
    stat = _read_text(f"/proc/{pid}/stat")
    if not stat:
        return ""
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else ""


#: Names this node in leases instead of the hostname (in Kubernetes, pass ``spec.nodeName``
#: through the downward API). Two processes with different node ids never judge each other's
#: liveness by pid, only by heartbeat: that is what a lease from another node needs.
NODE_ID_ENV = "STORAGE_INITIALIZER_NODE_ID"


def node_name() -> str:
    """The node as leases and logs name it: the override, else the hostname."""
    return os.environ.get(NODE_ID_ENV, "").strip() or socket.gethostname()


def _host_id() -> str:
    """Equal for two processes exactly when they share a node name, a pid namespace and a boot.

    Only then may a waiter conclude from a missing pid that the holder died; a pid on another
    node says nothing about ours."""
    try:
        pidns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        pidns = "?"
    boot = _read_text("/proc/sys/kernel/random/boot_id") or "?"
    return f"{node_name()}/{pidns}/{boot}"


def process_is_dead(host_id: str, pid: int, pid_start: str) -> bool:
    """True only when we can prove it: same host and pid namespace, and the process is gone
    (or a zombie, or a different process reusing the pid)."""
    if host_id != _host_id() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    stat = _read_text(f"/proc/{pid}/stat")
    if not stat:
        return True
    state = stat.rsplit(")", 1)[-1].split()[0]
    if state in ("Z", "X"):
        return True
    return bool(pid_start) and _pid_start(pid) != pid_start


def lease_path(entry: Entry, generation: int) -> Path:
    return entry.state / f"lease.{generation:012d}.json"


def generations(entry: Entry) -> list[int]:
    try:
        names = os.listdir(entry.state)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for n in names if (m := LEASE_RE.match(n)))


def _open_regular(path: Path) -> int:
    """A descriptor of ``path`` if it is a regular file, reached without following a link
    and without blocking (a FIFO planted as a lease must not hang its readers)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file")
    return fd


def read_lease(entry: Entry, generation: int) -> dict[str, Any] | None:
    """The lease's fields, or None when the file is gone or is not a lease (not a regular
    file, too large, not a JSON object). Fields of the wrong type (a string pid, a list as
    the time, NaN, a "released" that is not a boolean) are dropped with one warning."""
    path = lease_path(entry, generation)
    try:
        fd = _open_regular(path)
        with os.fdopen(fd, "rb") as handle:
            raw = handle.read(MAX_LEASE_BYTES + 1)
        if len(raw) > MAX_LEASE_BYTES:
            raise ValueError("too large")
        data = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return _sanitised(path, data) if isinstance(data, dict) else None


def _sanitised(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    bad = [
        name
        for name, value in data.items()
        if (name in _NUMBERS and number(value) is None)
        or (name in _STRINGS and not isinstance(value, str))
        or (name == "released" and not isinstance(value, bool))
    ]
    if bad and str(path) not in _warned:
        _warned.add(str(path))
        log.warning("%s: ignoring fields of the wrong type: %s", path, ", ".join(sorted(bad)))
    return {name: value for name, value in data.items() if name not in bad}


def number(value: Any) -> float | None:
    """``value`` if it is a finite JSON number (not a boolean), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return value if math.isfinite(value) else None
    except OverflowError:  # an int beyond any float
        return None


def current(entry: Entry) -> tuple[int, dict[str, Any] | None]:
    """The highest generation and its content (0, None when there is no lease at all)."""
    gens = generations(entry)
    if not gens:
        return 0, None
    return gens[-1], read_lease(entry, gens[-1])


def holder_is_dead(data: dict[str, Any]) -> bool:
    """The lease's holder is provably gone: a dead process on this very host (no clock)."""
    pid = data.get("pid")
    return isinstance(pid, int) and process_is_dead(
        str(data.get("host_id", "")), pid, str(data.get("pid_start", ""))
    )


#: Filesystem (st_dev) -> (its clock minus ours, when measured): one probe per filesystem
#: and minute, so a gc over many entries writes one probe file, not one per entry.
_offsets: dict[int, tuple[float, float]] = {}
PROBE_EVERY = 60.0


def _filesystem_now(entry: Entry) -> float | None:
    """The clock of the filesystem holding the entry: the mtime it gives a file created now.
    A lease file gets its mtime from the same clock when it is written (the kernel for a
    local filesystem, the server for NFS), so comparing the two involves no node's wall
    clock. The probe goes in the cache directory (whose mtime nothing reads), not in the
    state directory, whose mtime gc reads as a sign of life. None where we cannot create a
    file (a read-only mount)."""
    where = entry.root.parent if entry.mode == EntryMode.CACHE else entry.state
    try:
        device = os.stat(where).st_dev
    except OSError:
        return None
    known = _offsets.get(device)
    if known is None or time.monotonic() - known[1] > PROBE_EVERY:
        probe = where / f".clock.{uuid.uuid4().hex}.tmp"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except OSError:
            return None
        try:
            known = (os.fstat(fd).st_mtime - time.time(), time.monotonic())
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(probe)
        _offsets[device] = known
    return time.time() + known[0]


def silent_for(entry: Entry, generation: int) -> float | None:
    """Seconds since the lease file was last written, by the filesystem's clock (our own
    wall clock only where we cannot write a probe); None when the file is gone. The file is
    opened, not just stat'ed: on NFS an open revalidates the attributes, a stat may not."""
    try:
        fd = _open_regular(lease_path(entry, generation))
    except OSError:
        try:  # a planted non-file: its own age
            written = lease_path(entry, generation).lstat().st_mtime
        except OSError:
            return None
    else:
        try:
            written = os.fstat(fd).st_mtime
        finally:
            os.close(fd)
    now = _filesystem_now(entry)
    return (time.time() if now is None else now) - written


def stale_at_a_glance(
    entry: Entry, generation: int, data: dict[str, Any] | None, stale_after: float
) -> bool:
    """Whether one look proves the lease stale: its holder is a dead process on this very
    host, or its file has not been rewritten for ``stale_after`` plus :data:`CLOCK_SKEW` by
    the filesystem's clock. Never the ``heartbeat`` inside, which is the holder's clock.

    The one test for every reader that cannot watch a lease over time (``status``, ``gc``'s
    plan and its eviction, ``verify --repair``); a waiter watches instead (:class:`Observer`).
    Keeping it in one place is what lets ``gc --dry-run`` announce exactly what a real run
    does."""
    if data is not None and holder_is_dead(data):
        return True
    age = silent_for(entry, generation)
    return age is not None and age > stale_after + CLOCK_SKEW


class LeaseState(StrEnum):
    """What the current lease says, the one vocabulary of every reader (status, gc, waiters)."""

    #: No lease, or released: anyone may claim it.
    FREE = "free"
    #: A live holder is downloading.
    HELD = "held"
    #: Its holder is dead or silent for longer than stale-after: it may be taken over.
    STALE = "stale"


def glance(
    entry: Entry, generation: int, data: dict[str, Any] | None, stale_after: float
) -> LeaseState:
    """From one look at the current lease (see :func:`stale_at_a_glance`). A lease file that
    is gone this instant is free: the next look sees its successor."""
    if generation == 0 or (data is not None and data.get("released") is True):
        return LeaseState.FREE
    if data is None and not os.path.lexists(lease_path(entry, generation)):
        return LeaseState.FREE
    stale = stale_at_a_glance(entry, generation, data, stale_after)
    return LeaseState.STALE if stale else LeaseState.HELD


class Observer:
    """A waiter's view of the current lease, watched over time.

    Stale means provably dead (:func:`holder_is_dead`) or silent — its content unchanged,
    or unreadable — for ``stale_after`` seconds of this waiter's monotonic clock. Nothing
    here reads a wall clock, ours or the holder's: a live holder whose clock is hours off
    is never taken over, and a dead or frozen one is taken over ``stale_after`` after we
    first saw it silent, whatever the clocks say."""

    def __init__(self, stale_after: float) -> None:
        self.stale_after = stale_after
        self._seen: dict[int, tuple[Any, float]] = {}

    def classify(self, generation: int, data: dict[str, Any] | None) -> LeaseState:
        now = time.monotonic()
        if generation == 0:
            return LeaseState.FREE
        if data is None:
            # Being replaced this very instant, or a file left empty by a crash: judge it by
            # how long it stays unreadable.
            seq: Any = ("unreadable",)
        else:
            if data.get("released") is True:
                return LeaseState.FREE
            if holder_is_dead(data):
                return LeaseState.STALE
            seq = json.dumps(data.get("seq"), sort_keys=True)
        seen = self._seen.get(generation)
        if seen is None or seen[0] != seq:
            self._seen[generation] = (seq, now)
            return LeaseState.HELD
        return LeaseState.STALE if now - seen[1] >= self.stale_after else LeaseState.HELD
