"""Nothing on the network path hangs: a stall guard for every transfer, and the ``--timeout``
deadline of a whole run.

Why a guard of our own: a socket read timeout (botocore's, requests', the Azure and Google
clients') bounds one ``recv``, so a server that trickles one byte every few seconds never trips
it, and an init container would sit in Init for days. What matters is progress over time.

How, for every backend at once: all our HTTP clients (requests, urllib3, botocore, the Google
and Azure SDKs, the Hub client) read a response through ``http.client``, which reads the
socket through :class:`socket.SocketIO`. :func:`install` wraps ``SocketIO.readinto`` once, to
note which socket each thread is reading and to count the bytes that arrive for the thread's
:class:`Watch`. A :class:`Guard` (one per engine run) looks at its watches every second: a
transfer that received fewer than ``min_rate × stall_timeout`` bytes in the last
``stall_timeout`` seconds is *stalled*; the guard shuts its socket down, the blocked read
returns at once, the provider raises, and the engine resumes the chunk from its last written
byte with its usual backoff (``engine._fetch``). A reader that does not go through
``SocketIO`` is still covered: the engine counts the blocks it receives, and a stalled watch
raises :class:`StalledError` at its next block.

The deadline (:func:`start_deadline`): when it passes, every engine is cancelled, every socket
being read is shut down, waiting for another replica stops (``check_deadline``), and the run
ends with one line naming the URI and the deadline. If the process has still not finished
:data:`DEADLINE_GRACE` seconds later (a client stuck where nothing can reach it), the line is
logged and the process exits: the staging area stays private and the lease goes stale, as
after a crash.
"""

from __future__ import annotations

import _socket
import contextlib
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

from storage_initializer.errors import InitializerError, TransientError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds between two looks of the watchdog at the transfers in flight.
TICK = 1.0
#: Seconds the run may take after its deadline passed before the process exits regardless.
DEADLINE_GRACE = 10.0

#: thread id → the socket that thread is reading now (only while it reads).
_reading: dict[int, socket.socket] = {}
#: thread id → the watch of the transfer that thread runs now.
_watches: dict[int, Watch] = {}
_guards: set[Guard] = set()
_lock = threading.Lock()
_installed = False


class StalledError(TransientError):
    """A transfer made too little progress for too long: retried from its last byte."""


class DeadlineError(TransientError):
    """The ``--timeout`` deadline passed. A TransientError: the staging area is kept, so the
    next run resumes what was downloaded."""

    hint = (
        "Raise --timeout (STORAGE_INITIALIZER_TIMEOUT), or check why the source is so slow; "
        "the next run resumes what was downloaded"
    )


def install() -> None:
    """Wrap ``socket.SocketIO.readinto`` (once) to see which socket a thread reads and how many
    bytes arrive; a thread without a watch pays one dict update per read."""
    global _installed
    with _lock:
        if _installed:
            return
        original = socket.SocketIO.readinto

        def readinto(self: socket.SocketIO, b: WriteableBuffer) -> int | None:
            ident = threading.get_ident()
            _reading[ident] = self._sock  # type: ignore[attr-defined]
            try:
                count = original(self, b)
            finally:
                _reading.pop(ident, None)
            if count:
                received(count)
            return count

        socket.SocketIO.readinto = readinto  # type: ignore[method-assign]
        _installed = True


@contextlib.contextmanager
def reading(sock: socket.socket) -> Iterator[None]:
    """This thread reads ``sock`` without :class:`socket.SocketIO` (``splice.py``): let the
    guard and the deadline see it, so they can cut it as they cut any other read."""
    ident = threading.get_ident()
    _reading[ident] = sock
    try:
        yield
    finally:
        _reading.pop(ident, None)


def received(count: int) -> None:
    """``count`` bytes arrived on this thread's socket: progress for its watch. Called by the
    ``SocketIO`` wrapper, and by ``splice.py`` for the bytes it takes from the socket without
    ``SocketIO`` (so a transfer whose bytes still move is not taken for a stalled one while
    they are written out)."""
    watch = _watches.get(threading.get_ident())
    if watch is not None:
        watch.socket_bytes += count


def _shut(sock: socket.socket) -> None:
    """Make a blocked read on ``sock`` return now (TLS sockets too, without touching their
    TLS state, which the reading thread owns)."""
    with contextlib.suppress(OSError, TypeError):
        _socket.socket.shutdown(sock, socket.SHUT_RDWR)


class Watch:
    """One transfer (one request and its body) of one thread, while it runs."""

    def __init__(self, guard: Guard | None) -> None:
        self.guard = guard
        self.thread = threading.get_ident()
        self.socket_bytes = 0
        self.block_bytes = 0
        self.stalled = False
        self.began = time.monotonic()
        self.samples: deque[tuple[float, int]] = deque([(self.began, 0)])

    @property
    def progress(self) -> int:
        return max(self.socket_bytes, self.block_bytes)

    def __enter__(self) -> Watch:
        if self.guard is not None:
            self.began = time.monotonic()
            self.samples = deque([(self.began, 0)])
            _watches[self.thread] = self
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if _watches.get(self.thread) is self:
            del _watches[self.thread]

    def too_slow(self, now: float, window: float, least: int) -> bool:
        """Sample the progress at ``now``: whether the samples span ``window`` seconds and the
        transfer received fewer than ``least`` bytes over them."""
        samples = self.samples
        done = self.progress
        samples.append((now, done))
        while len(samples) > 1 and samples[1][0] <= now - window:
            samples.popleft()
        since, then = samples[0]
        return since <= now - window and done - then < least

    def blocks(self, blocks: Iterable[bytes], what: str) -> Iterator[bytes]:
        """``blocks`` (a provider's read), watched: counted as they reach the engine, and
        StalledError at the next one once the guard found the transfer stalled. The watch
        covers the thread from the first block asked for until the iteration ends."""
        with self:
            for block in blocks:
                self.block_bytes += len(block)
                if self.stalled:
                    raise self.error(what)
                yield block

    def error(self, what: str) -> StalledError:
        guard = self.guard
        assert guard is not None
        rate = _rate_text(guard.min_rate)
        return StalledError(
            f"{what}: the transfer stalled (less than {rate} for {guard.stall_timeout:g}s)"
        )

    def explain(self, exc: Exception, what: str) -> Exception:
        """``exc`` as the engine should see it: when the guard cut the connection, a
        StalledError (retryable, whatever the provider made of the closed socket)."""
        return self.error(what) if self.stalled else exc


class ReadWatch(Watch):
    """The watch of a listing. Its requests, their retries and the waits between them run on
    one thread, so only time spent inside a read counts (a Retry-After wait is no stall), and
    a stalled read is cut without flagging the watch: the client's own retry gets a fresh
    window. ``cuts`` counts the reads cut, for the error."""

    def __init__(self, guard: Guard | None) -> None:
        super().__init__(guard)
        self.cuts = 0
        self._outer: Watch | None = None

    def __enter__(self) -> ReadWatch:
        self._outer = _watches.get(self.thread)
        super().__enter__()
        self.samples.clear()
        return self

    def __exit__(self, *exc: object) -> None:
        super().__exit__(None, None, None)
        if self._outer is not None:
            _watches[self.thread] = self._outer


def _rate_text(rate: int) -> str:
    return f"{rate} B/s" if rate < 1024 else f"{rate / 1024:g} KiB/s"


class Guard:
    """The watchdog of one engine run: flags and cuts stalled transfers; cancels the run when
    the deadline passes. ``stall_timeout`` 0 turns the stall guard off."""

    def __init__(self, stall_timeout: float, min_rate: int, cancel: threading.Event) -> None:
        self.stall_timeout = stall_timeout
        self.min_rate = min_rate
        self.cancel = cancel
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.stall_timeout > 0

    def watch(self) -> Watch:
        return Watch(self if self.enabled else None)

    def __enter__(self) -> Guard:
        install()
        with _lock:
            _guards.add(self)
        if expired():
            self.cancel.set()
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="stall-guard", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        with _lock:
            _guards.discard(self)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        tick = min(TICK, self.stall_timeout / 4)
        while not self._stop.wait(tick):
            self.check(time.monotonic())

    def check(self, now: float) -> None:
        """Flag and cut every transfer of ours that is stalled at ``now``."""
        window = self.stall_timeout
        least = max(1, int(self.min_rate * window))
        for watch in list(_watches.values()):
            if watch.guard is not self:
                continue
            if isinstance(watch, ReadWatch):
                self._check_reads(watch, now, window, least)
                continue
            if watch.stalled:  # flagged while between reads: cut the read it is in now
                sock = _reading.get(watch.thread)
                if sock is not None:
                    _shut(sock)
                continue
            if watch.too_slow(now, window, least):
                watch.stalled = True
                log.debug("transfer of thread %d stalled", watch.thread)
                sock = _reading.get(watch.thread)
                if sock is not None:
                    _shut(sock)

    @staticmethod
    def _check_reads(watch: ReadWatch, now: float, window: float, least: int) -> None:
        """A listing's read that received less than ``least`` bytes over ``window`` seconds
        spent reading is cut; time between reads resets the window."""
        sock = _reading.get(watch.thread)
        samples = watch.samples
        if sock is None:
            samples.clear()
            return
        if watch.too_slow(now, window, least):
            log.debug("a listing read of thread %d stalled: cut", watch.thread)
            watch.cuts += 1
            samples.clear()
            _shut(sock)


def listing(stall_timeout: float, min_rate: int, what: str, call: Callable[[], T]) -> T:
    """``call()`` (a listing, or any metadata requests a pull makes on this thread) under a
    guard of its own: a server that trickles its answer (each byte in time for the socket's
    read timeout, the whole never) is cut as a trickling transfer is, and when the listing
    then fails, it fails as a stall: one line naming ``what`` and the rate. Without it an
    init container would wait in Init for ever on a listing. ``stall_timeout`` 0: no guard."""
    guard = Guard(stall_timeout, min_rate, threading.Event())
    if not guard.enabled:
        return call()
    watch = ReadWatch(guard)
    with guard, watch:
        try:
            return call()
        except Exception as exc:
            if watch.cuts and (
                isinstance(exc, TransientError) or not isinstance(exc, InitializerError)
            ):
                rate = _rate_text(min_rate)
                raise StalledError(
                    f"{what}: the server stalled (less than {rate} for {stall_timeout:g}s, "
                    f"{watch.cuts} time{'s' if watch.cuts > 1 else ''})"
                ) from exc
            raise


# -- the deadline of a run --------------------------------------------------------------------

_deadline: dict[str, float] = {}
_expired = threading.Event()
_finished = threading.Event()


def start_deadline(seconds: float, on_hang: Callable[[DeadlineError], None]) -> None:
    """Arm the deadline of this run (``seconds`` 0: none). ``on_hang`` reports the failure
    (last line, termination message) when the run has not ended DEADLINE_GRACE seconds after
    the deadline; the process then exits with status 1."""
    if seconds <= 0:
        return
    install()
    _expired.clear()
    _finished.clear()
    _deadline["seconds"] = seconds
    thread = threading.Thread(
        target=_expire_at, args=(seconds, on_hang), name="deadline", daemon=True
    )
    thread.start()


def finish_deadline() -> None:
    """The run ended (either way): the deadline no longer applies."""
    _finished.set()


def expired() -> bool:
    return _expired.is_set()


def deadline_error() -> DeadlineError:
    return DeadlineError(f"the --timeout deadline of {_deadline.get('seconds', 0):g}s passed")


def check_deadline() -> None:
    """Raise DeadlineError when the deadline has passed (called where a run waits)."""
    if _expired.is_set():
        raise deadline_error()


def as_deadline(exc: BaseException) -> BaseException:
    """``exc`` as the run should report it: once the deadline passed, whatever a cut socket
    made a library raise is the deadline's doing."""
    if _expired.is_set() and not isinstance(exc, DeadlineError):
        error = deadline_error()
        error.__cause__ = exc
        with contextlib.suppress(AttributeError):
            error.pull_stats = getattr(exc, "pull_stats", None)  # type: ignore[attr-defined]
        return error
    return exc


def _expire_at(seconds: float, on_hang: Callable[[DeadlineError], None]) -> None:
    if _finished.wait(seconds):
        return
    _expired.set()
    with _lock:
        guards = list(_guards)
    for guard in guards:
        guard.cancel.set()
    for sock in list(_reading.values()):
        _shut(sock)
    if _finished.wait(DEADLINE_GRACE):
        return
    # Still running: something is stuck where neither a cancel nor a closed socket reaches.
    with contextlib.suppress(Exception):
        on_hang(deadline_error())
    os._exit(1)
