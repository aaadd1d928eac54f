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
  ``stale_after`` seconds), so clock skew between nodes does not matter; a lease whose holder is
  a dead process on this very host is stale at once. No node's wall clock takes part: the
  ``heartbeat`` time in the file is for people. A reader that looks once (``status``, ``gc``,
  ``verify --repair``) judges the file's age by the filesystem's own clock (:func:`silent_for`).
* A lease file is read defensively (:func:`read_lease`): anything but a regular file of JSON
  is "unreadable" (stale once it stays so for ``stale_after``), and fields of the wrong type
  are dropped with one warning, so a planted or corrupt lease never stops a pull.

Correctness does not rest on any of this: staging is private and the marker is written last, so
two owners at once would only cost bandwidth.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from storage_initializer import signals
from storage_initializer.errors import LeaseLostError
from storage_initializer.store.layout import Entry
from storage_initializer.store.lease_view import (  # noqa: F401 - the lease API, in one place
    CLOCK_SKEW,
    LEASE_RE,
    NODE_ID_ENV,
    LeaseState,
    Observer,
    _host_id,
    _pid_start,
    current,
    generations,
    glance,
    holder_is_dead,
    lease_path,
    node_name,
    number,
    process_is_dead,
    read_lease,
    silent_for,
    stale_at_a_glance,
)
from storage_initializer.store.marker import write_atomic

log = logging.getLogger(__name__)


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
        self._on_lost: list[Callable[[], None]] = []
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

    def on_lost(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when the lease is lost (at once if it is already): how a holder's
        engine is cancelled by a takeover. It may be called more than once."""
        self._on_lost.append(callback)
        if self.lost.is_set():
            callback()

    def mark_lost(self) -> None:
        """The lease is lost: set :attr:`lost` and call the :meth:`on_lost` callbacks."""
        self.lost.set()
        for callback in list(self._on_lost):
            callback()

    def ensure_held(self) -> None:
        if self.lost.is_set() or not self.still_held():
            self.mark_lost()
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
                    self.mark_lost()
                    return
                self._write(**self._progress())
                failing_since = None
            except OSError as exc:
                now = time.monotonic()
                failing_since = failing_since or now
                log.warning("cannot renew the download lease of %s: %s", self.entry.root, exc)
                if now - failing_since > interval * 4:
                    self.mark_lost()
                    return

    def update(self, **changes: Any) -> None:
        """Publish a phase change right away (waiters show it). A phase change is also where
        a holder on a thread other than the main one stops when the process is terminated."""
        signals.check()
        with contextlib.suppress(OSError):
            self._write(**{**self._progress(), **changes})

    @signals.deferred
    def release(self, outcome: str) -> None:
        """Mark the lease released with ``outcome``: waiters claim it at their next poll.
        Runs whole even when a signal arrives meanwhile (signals.deferred)."""
        with _held_lock:
            _held.discard(self)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.lost.is_set():
            return
        with contextlib.suppress(OSError):
            if self.still_held():
                self._write(released=True, outcome=outcome, **self._progress())


@signals.deferred  # a claimed lease is always in _held, for release_all
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
    lease = Lease(entry, owner, generation, data)
    with _held_lock:
        _held.add(lease)
    for old in generations(entry):
        if old < generation:
            with contextlib.suppress(OSError):
                os.unlink(lease_path(entry, old))
    return lease


#: Leases this process holds and has not released: what :func:`release_all` releases.
_held: set[Lease] = set()
_held_lock = threading.Lock()


def release_all(outcome: str) -> None:
    """Release every lease still held (a terminated process leaving without waiting for a
    thread stuck in a request): waiters take over at once instead of after ``stale_after``."""
    with _held_lock:
        leases = list(_held)
    for lease in leases:
        lease.release(outcome)
