"""SIGTERM and SIGINT: stop promptly, keep the work, hand the download over at once.

Kubernetes sends SIGTERM when it deletes a pod, scales a deployment down or drains a node,
then SIGKILL after the grace period (30 s by default). Dying on the default action would leave
no last log line and a lease that looks held: every waiter would lose ``stale_after`` before
taking over. So ``pull``, the KServe entrypoint and ``prefetch`` install :func:`install`:

* the first signal sets every cancel event handed out by :func:`cancel_event` — the engine's
  one cancellation mechanism (the one a lost lease uses), so transfer workers stop at their
  next block — and raises :class:`Terminated` in the main thread, wherever it waits (a
  waiter's poll, a listing request, the engine's wait for its workers);
* code that must not be cut in half (a commit, the lease's release) runs under
  :func:`deferred`: the signal is noted and raised when it ends;
* threads other than the main one (``prefetch`` runs pulls on a pool) stop at their next
  safe point (:func:`check`: a waiter's poll, a phase change of the holder);
* the holder keeps its staging journal, marks its lease released with the outcome
  ``terminated`` (a waiter claims it at its next poll) and the process logs one last line and
  exits ``128 + signal``: 143 for SIGTERM, 130 for SIGINT. :func:`leave` releases any lease a
  stuck thread still holds and leaves without waiting for threads blocked in a request.

A second signal while stopping is ignored: the first one is already being acted on.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import threading
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any, NoReturn, TypeVar

log = logging.getLogger(__name__)

HANDLED = (signal.SIGTERM, signal.SIGINT)
#: Seconds a stopping engine gives its workers to notice the cancellation before leaving
#: behind those stuck inside a request (a stalled server); they die with the process.
STOP_GRACE = 0.5

_received: int | None = None
_pending = False  # a signal arrived inside a deferred section of the main thread
_depth = 0  # deferred sections the main thread is in
_events: weakref.WeakSet[threading.Event] = weakref.WeakSet()
_lock = threading.Lock()

F = TypeVar("F", bound=Callable[..., Any])


class Terminated(BaseException):
    """The process was asked to stop (SIGTERM, SIGINT). A BaseException, so that no
    ``except Exception`` on the way turns it into an ordinary failure."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        #: What the pull was doing, for the last log line ("downloading ...: 3/4 files").
        self.detail = ""

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def code(self) -> int:
        """The exit status a shell reports for death by this signal: 143, 130."""
        return 128 + self.signum

    def __str__(self) -> str:
        return f"terminated by {self.name}"


def _is_main() -> bool:
    return threading.current_thread() is threading.main_thread()


def stop_pulls(signum: int) -> bool:
    """Note ``signum`` and stop every pull in progress: engines cancel, other threads raise
    :class:`Terminated` at their next safe point. False if already stopping. (Called from a
    signal handler: ``prefetch --watch`` uses it alone, raising nothing in its main thread.)"""
    global _received
    if _received is not None:
        return False
    _received = signum
    # From a thread: the main thread may be inside one of these events' own lock right now.
    threading.Thread(target=_cancel_all, name="terminating", daemon=True).start()
    return True


def _handle(signum: int, _frame: object) -> None:
    global _pending
    if not stop_pulls(signum):
        return  # already stopping
    if _depth:
        _pending = True
        return
    raise Terminated(signum)


def _cancel_all() -> None:
    with _lock:
        events = list(_events)
    for event in events:
        event.set()


def install() -> bool:
    """Handle SIGTERM and SIGINT from now on (main thread only; False elsewhere). A
    termination that no caller handles (it came between two pulls) still ends the process
    with one line and 128 + signal, not a traceback (:func:`_uncaught`)."""
    if not _is_main():
        return False
    for signum in HANDLED:
        signal.signal(signum, _handle)
    sys.excepthook = _uncaught
    return True


_default_hook = sys.excepthook


def _uncaught(kind: type[BaseException], exc: BaseException, trace: TracebackType | None) -> None:
    if not isinstance(exc, Terminated):
        _default_hook(kind, exc, trace)
        return
    log.error("%s %s", exc, exc.detail or "between two steps; nothing was interrupted")
    leave(exc.code)


def received() -> int | None:
    """The signal that asked us to stop, or None."""
    return _received


def cancel_event() -> threading.Event:
    """A cancel event (the engine's) that a termination sets; already set if one came."""
    event = threading.Event()
    with _lock:
        _events.add(event)
    if _received is not None:
        event.set()
    return event


def check() -> None:
    """A safe point of a thread other than the main one: raise :class:`Terminated` if a
    signal came. (The main thread got it from the handler already.)"""
    if _received is not None and not _is_main():
        raise Terminated(_received)


def terminated_by(exc: BaseException) -> Terminated | None:
    """``exc`` as a termination: itself, or the Terminated behind an exception that a
    cancellation caused (the engine's Cancelled in a worker thread); None otherwise."""
    if isinstance(exc, Terminated):
        return exc
    if _received is not None:
        ended = Terminated(_received)
        ended.__cause__ = exc
        return ended
    return None


def deferred(func: F) -> F:
    """Run ``func`` whole: a signal arriving meanwhile is raised when it returns (or fails).
    For steps whose half would cost more than their end: a commit, a lease's release."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        global _depth, _pending
        if not _is_main():
            return func(*args, **kwargs)
        _depth += 1
        try:
            result = func(*args, **kwargs)
        finally:
            _depth -= 1
            if not _depth and _pending:
                _pending = False
                raise Terminated(_received or signal.SIGTERM)
        return result

    return wrapper  # type: ignore[return-value]


def leave(code: int) -> NoReturn:
    """Leave now with ``code``: release the leases a thread stuck in a request still holds
    (marked ``terminated``, so waiters take over at once), flush the logs, and do not wait
    for threads blocked in I/O (they would hold the process until the kubelet's SIGKILL)."""
    from storage_initializer.store.lease import release_all  # lease imports signals

    with contextlib.suppress(Exception):
        release_all("terminated")
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
