"""Who downloads: a file lock for cheap local serialisation, and a lease with a heartbeat.

The file lock (``filelock`` on ``<state>/lock``) keeps replicas on one node from racing, but it is
not enough: on many network filesystems ``flock`` is not shared between hosts, and a holder that
is frozen (SIGSTOP, a stuck node) keeps its lock forever. So the lease decides:

* Leases are files ``lease.<generation>.json``; the highest generation is the current one.
* A lease is *claimed* by creating the next generation's file atomically (``link`` of a complete
  temp file, or ``O_EXCL``): of two replicas that both see the current lease stale, exactly one
  creates the next file.
* The holder rewrites its file every heartbeat (temp + rename) with a sequence number and its
  progress. Before every heartbeat and before committing it checks that no higher generation
  exists; if one does, it has lost the lease and stops without committing.
* A waiter judges staleness by its own monotonic clock (the sequence number has not moved for
  ``stale_after`` seconds), so clock skew between nodes does not matter; a lease whose wall-clock
  heartbeat is far in the past, or whose holder is a dead process on this very host, is stale at
  once.

Correctness does not rest on any of this: staging is private and the marker is written last, so
two owners at once would only cost bandwidth.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from storage_initializer.errors import LeaseLostError
from storage_initializer.store.layout import Entry
from storage_initializer.store.marker import write_atomic

log = logging.getLogger(__name__)

LEASE_RE = re.compile(r"^lease\.(\d{12})\.json$")
#: Clock skew we tolerate between nodes before trusting a wall-clock age on its own.
CLOCK_SKEW = 30.0


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


@dataclass(frozen=True)
class Owner:
    id: str
    host: str
    host_id: str
    pod: str
    pid: int
    pid_start: str

    @classmethod
    def this_process(cls) -> Owner:
        pid = os.getpid()
        host = node_name()
        pod = os.environ.get("POD_NAME") or os.environ.get("HOSTNAME") or host
        return cls(uuid.uuid4().hex[:12], host, _host_id(), pod, pid, _pid_start(pid))


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


def read_lease(entry: Entry, generation: int) -> dict[str, Any] | None:
    try:
        with open(lease_path(entry, generation), encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def current(entry: Entry) -> tuple[int, dict[str, Any] | None]:
    """The highest generation and its content (0, None when there is no lease at all)."""
    gens = generations(entry)
    if not gens:
        return 0, None
    return gens[-1], read_lease(entry, gens[-1])


def stale_at_a_glance(data: dict[str, Any], stale_after: float) -> bool:
    """Whether one reading of a lease proves it stale: its holder is a dead process on this
    very host, or its wall-clock heartbeat is older than ``stale_after`` plus the clock skew we
    tolerate between nodes.

    The one test for every reader that cannot watch a lease over time (``status``, ``gc``'s
    plan and its eviction); a waiter adds its own observation (:class:`Observer`). Keeping it
    in one place is what lets ``gc --dry-run`` announce exactly what a real run does."""
    if process_is_dead(
        str(data.get("host_id", "")), int(data.get("pid", 0)), str(data.get("pid_start", ""))
    ):
        return True
    try:
        heartbeat = float(data.get("heartbeat", 0))
    except (TypeError, ValueError):
        heartbeat = 0.0
    return time.time() - heartbeat > stale_after + CLOCK_SKEW


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
    """From one look at the current lease (see :func:`stale_at_a_glance`). An unreadable lease
    file (a crash left it empty) is judged by its age on disk."""
    if generation == 0 or (data is not None and data.get("released")):
        return LeaseState.FREE
    if data is None:
        try:
            age = time.time() - lease_path(entry, generation).stat().st_mtime
        except OSError:
            return LeaseState.FREE  # replaced this very instant: the next look sees its successor
        return LeaseState.STALE if age > stale_after + CLOCK_SKEW else LeaseState.HELD
    return LeaseState.STALE if stale_at_a_glance(data, stale_after) else LeaseState.HELD


class Observer:
    """A waiter's view of the current lease, watched over time."""

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
            if data.get("released"):
                return LeaseState.FREE
            if stale_at_a_glance(data, self.stale_after):
                return LeaseState.STALE
            seq = data.get("seq")
        seen = self._seen.get(generation)
        if seen is None or seen[0] != seq:
            self._seen[generation] = (seq, now)
            return LeaseState.HELD
        return LeaseState.STALE if now - seen[1] >= self.stale_after else LeaseState.HELD


def _create_exclusive(path: Path, text: str) -> bool:
    """Create ``path`` with ``text`` unless it exists; True if we created it. Readers never see
    it partly written where the filesystem supports hard links."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.chmod(tmp, 0o664)
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:
        # No hard links here (some FUSE and SMB mounts): O_EXCL is atomic too, only not
        # all-or-nothing for the content, which readers tolerate as "unreadable".
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o664)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        return True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


class Lease:
    """A lease we hold. Heartbeats run on a daemon thread until :meth:`release`."""

    def __init__(self, entry: Entry, owner: Owner, generation: int, data: dict[str, Any]):
        self.entry = entry
        self.owner = owner
        self.generation = generation
        self.data = data
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._progress: Callable[[], dict[str, Any]] = dict
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return lease_path(self.entry, self.generation)

    def still_held(self) -> bool:
        gens = generations(self.entry)
        if not gens or gens[-1] != self.generation:
            return False
        data = read_lease(self.entry, self.generation)
        # Unreadable means we are rewriting it this instant (only we write this file).
        return data is None or data.get("owner") == self.owner.id

    def ensure_held(self) -> None:
        if self.lost.is_set() or not self.still_held():
            self.lost.set()
            raise LeaseLostError(
                f"lost the download lease of {self.entry.root} to another replica; "
                "stopped without committing"
            )

    def start_heartbeat(self, interval: float, progress: Callable[[], dict[str, Any]]) -> None:
        self._progress = progress
        self._thread = threading.Thread(
            target=self._beat, args=(interval,), name="lease-heartbeat", daemon=True
        )
        self._thread.start()

    def _write(self, **changes: Any) -> None:
        with self._lock:
            self.data.update(changes)
            self.data["seq"] = int(self.data.get("seq", 0)) + 1
            self.data["heartbeat"] = time.time()
            write_atomic(self.path, json.dumps(self.data, sort_keys=True), mode=0o664)

    def _beat(self, interval: float) -> None:
        failing_since: float | None = None
        while not self._stop.wait(interval):
            try:
                if not self.still_held():
                    log.warning("another replica took over the download of %s", self.entry.root)
                    self.lost.set()
                    return
                self._write(**self._progress())
                failing_since = None
            except OSError as exc:
                now = time.monotonic()
                failing_since = failing_since or now
                log.warning("cannot renew the download lease of %s: %s", self.entry.root, exc)
                if now - failing_since > interval * 4:
                    self.lost.set()
                    return

    def update(self, **changes: Any) -> None:
        """Publish a phase change right away (waiters show it)."""
        with contextlib.suppress(OSError):
            self._write(**{**self._progress(), **changes})

    def release(self, outcome: str) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.lost.is_set():
            return
        with contextlib.suppress(OSError):
            if self.still_held():
                self._write(released=True, outcome=outcome, **self._progress())


def try_claim(
    entry: Entry, owner: Owner, after_generation: int, info: dict[str, Any]
) -> Lease | None:
    """Claim generation ``after_generation + 1``; None when another replica got there first."""
    generation = after_generation + 1
    now = time.time()
    data = {
        **asdict(owner),
        "owner": owner.id,
        "generation": generation,
        "started": now,
        "heartbeat": now,
        "seq": 0,
        "released": False,
        **info,
    }
    data.pop("id", None)
    if not _create_exclusive(lease_path(entry, generation), json.dumps(data, sort_keys=True)):
        return None
    for old in generations(entry):
        if old < generation:
            with contextlib.suppress(OSError):
                os.unlink(lease_path(entry, old))
    return Lease(entry, owner, generation, data)
