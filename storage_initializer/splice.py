"""Plain-http bodies moved from the socket into the file by the kernel (``splice``).

Why: a received block normally crosses memory twice, socket buffer → our buffer (``recv``)
and our buffer → page cache (``pwrite``), and on KServe's 1-CPU limit those copies are most
of a pull's CPU. ``splice`` moves the socket's pages into a pipe without copying and from the
pipe into the file with one copy, so a body costs one copy instead of two (about half the CPU
of a plain-http pull: docs/performance.md "Zero-copy receive"). TLS bodies are decrypted in
user space and cannot take this path; they keep the ordinary one.

How it fits the engine, which otherwise only sees blocks of bytes:

- The engine *offers* a :class:`Landing` (the file descriptor and the offset where the next
  byte of the range goes) around one attempt at one range (:func:`offered`). Only buffered
  page-cache writes offer one (direct I/O needs aligned user buffers).
- ``lean_http.read_body`` takes the offer when its answer can be spliced (plain socket, a
  ``Content-Length`` body, no head to drop) and yields :class:`Landed` blocks instead of bytes:
  bytes already written at ``Landed.offset``. Whatever ``http.client`` had buffered past the
  headers is written first, as a normal ``pwrite``.
- The engine does not write a landed block again; when it checksums while bytes arrive, it
  reads the block back from the page cache (:attr:`Landed.view`, one ``pread`` of pages that
  were just written, cheap next to a copy from the socket).

Everything else stays as on the ordinary path: the stall guard sees the socket being read
(``stall.reading``) and counts the bytes taken from it (``stall.received``), and cuts it when
the transfer stalls; the read timeout bounds every wait; a body cut short is a
:class:`TransientError` and the engine resumes the range at its last byte; the connection is
kept only when the whole body was read. TCP urgent data in a body (splice stops at its mark
while ``poll`` keeps reporting the socket readable) sends the rest of that body the ordinary
way. A filesystem that cannot take a splice (``EINVAL``) turns the path off for the process,
after the bytes already in the pipe are written the ordinary way.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import http.client
import logging
import os
import select
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from storage_initializer import stall
from storage_initializer.errors import TransientError
from storage_initializer.redact import redact
from storage_initializer.writer import pwrite_all

log = logging.getLogger(__name__)

#: Most bytes moved by one splice from the socket, and the read-back buffer of each thread.
SEGMENT = 1 << 20
#: Bodies shorter than this take the ordinary path: for a few kilobytes, the pipe and the
#: extra system calls cost more than the copy they save.
MIN_BODY = 1 << 20
#: fcntl's F_SETPIPE_SZ (Linux); the pipe holds one segment.
_F_SETPIPE_SZ = 1031
_SPLICE_F_MOVE = 1
_SPLICE_F_NONBLOCK = 2
_NONBLOCKING = _SPLICE_F_MOVE | _SPLICE_F_NONBLOCK
#: What a splice into a file the filesystem cannot take fails with.
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV}

_available = hasattr(os, "splice")
_local = threading.local()


@dataclass
class Landing:
    """Where the body of the range being fetched may be written directly: ``fd`` at
    ``offset``, which advances as bytes land (the engine keeps it at its own position)."""

    fd: int
    offset: int
    #: Size of each move into the file (the sink's ``write_size``): the kernel allocates
    #: page-cache folios as large as each write, as with ``pwrite`` (writer.py).
    piece: int


class Landed:
    """A block already written to the landing's file at ``offset``: its length counts as
    received bytes; :attr:`view` gives its bytes, read back, for checksums."""

    __slots__ = ("_data", "fd", "offset", "size")

    def __init__(self, fd: int, offset: int, size: int, data: bytes | None = None) -> None:
        self.fd = fd
        self.offset = offset
        self.size = size
        self._data = data

    def __len__(self) -> int:
        return self.size

    @property
    def spliced(self) -> bool:
        """Whether the kernel moved it (else it was written from bytes we received)."""
        return self._data is None

    @property
    def view(self) -> bytes | memoryview:
        """The block's bytes. A spliced block is read back into this thread's buffer, which
        the next block overwrites: use it before asking for the next block."""
        if self._data is not None:
            return self._data
        buffer = _read_back_buffer()
        view = memoryview(buffer)[: self.size]
        got = 0
        while got < self.size:
            count = os.preadv(self.fd, [view[got:]], self.offset + got)
            if count <= 0:
                raise TransientError(
                    f"reading back {self.size} bytes written at {self.offset} gave only {got}"
                )
            got += count
        return view


_offer: contextvars.ContextVar[Landing | None] = contextvars.ContextVar("landing", default=None)


@contextlib.contextmanager
def offered(landing: Landing | None) -> Iterator[Landing | None]:
    """Offer ``landing`` to the reads made inside the block (None: offer nothing)."""
    token = _offer.set(landing)
    try:
        yield landing
    finally:
        _offer.reset(token)


def enabled() -> bool:
    """Whether this process can splice at all (Linux, and no filesystem refused it yet)."""
    return _available


def take(sock: socket.socket | None) -> Landing | None:
    """The landing offered to this read, when its body can go there from ``sock``; taking it
    withdraws the offer (one body per attempt)."""
    landing = _offer.get()
    if landing is None or not _available or type(sock) is not socket.socket:
        return None  # nothing offered, no splice here, or TLS (an ssl.SSLSocket)
    _offer.set(None)
    return landing


def land(
    response: http.client.HTTPResponse,
    sock: socket.socket,
    landing: Landing,
    want: int,
    where: str,
) -> Iterator[Landed]:
    """Move the next ``want`` bytes of ``response``'s body (fewer when its Content-Length
    ends first) into ``landing``, yielding each block as it lands. A connection that closes
    early is a :class:`TransientError`, as on the ordinary path."""
    left = min(want, response.length or 0)
    for head in _buffered_head(response, left, where):
        pwrite_all(landing.fd, head, landing.offset)
        block = Landed(landing.fd, landing.offset, len(head), head)
        landing.offset += len(head)
        left -= len(head)
        yield block
    if left <= 0:
        return
    yield from _splice_body(response, sock, landing, left, where)


def _buffered_head(response: http.client.HTTPResponse, left: int, where: str) -> Iterator[bytes]:
    """What ``http.client``'s reader holds past the headers (at most its buffer,
    ``io.DEFAULT_BUFFER_SIZE``: ``peek`` returns what it buffered, or makes one socket read
    when it holds nothing), taken through ``read1`` so the answer counts it; the reader is
    empty afterwards, so the socket holds the rest of the body."""
    reader = response.fp
    if reader is None or left <= 0:
        return
    try:
        held = len(reader.peek(1))
        head = response.read1(min(held, left)) if held else b""
    except (OSError, http.client.HTTPException) as exc:
        raise _broke_off(where, exc) from None
    if not head:
        raise _cut(where, response)
    yield head


def _splice_body(
    response: http.client.HTTPResponse,
    sock: socket.socket,
    landing: Landing,
    left: int,
    where: str,
) -> Iterator[Landed]:
    global _available
    pipe = _pipe()
    read_end, write_end = pipe.read_end, pipe.write_end
    timeout = sock.gettimeout()
    wait_ms = -1 if timeout is None else max(1, int(timeout * 1000))
    source = sock.fileno()
    poller = select.poll()
    poller.register(source, select.POLLIN | select.POLLPRI)
    clean = False
    ready = False  # poll said the socket was readable, and splice has not taken from it since
    try:
        with stall.reading(sock):
            while left > 0 and _available:
                try:
                    count = os.splice(source, write_end, min(left, SEGMENT), flags=_NONBLOCKING)
                except BlockingIOError:
                    if ready:
                        # Readable, yet splice takes nothing: TCP urgent data (splice stops at
                        # its mark, poll keeps saying POLLIN). recv reads past it (lean_http
                        # sets SO_OOBINLINE): the rest of this body the ordinary way.
                        log.info("%s: the socket holds what splice cannot take", where)
                        break
                    events = poller.poll(wait_ms)
                    if not events:
                        raise _broke_off(where, TimeoutError("timed out")) from None
                    if any(event & select.POLLPRI for _, event in events):
                        log.info("%s: urgent data in the body; reading it the ordinary way", where)
                        break
                    ready = True
                    continue
                except OSError as exc:
                    if exc.errno not in _UNSUPPORTED:
                        raise _broke_off(where, exc) from None
                    _available = False  # nothing was taken from the socket
                    break
                if count == 0:
                    response.length = left  # for the message; the connection is dropped
                    raise _cut(where, response)
                ready = False
                stall.received(count)
                start = landing.offset
                try:
                    _drain(read_end, landing, count)
                except OSError as exc:
                    if exc.errno not in _UNSUPPORTED:
                        raise
                    log.info("%s: splice into this filesystem refused (%s)", where, exc)
                    _available = False
                    _rescue(read_end, landing, start + count)
                left -= count
                response.length = (response.length or 0) - count
                yield Landed(landing.fd, start, count)
        clean = True
    finally:
        if not clean:
            _drop_pipe()  # bytes may be left in it: the next body needs an empty pipe
    # Splicing turned out impossible here (or elsewhere in the process), or the socket holds
    # what splice cannot take: the rest as usual (the pipe is empty: each segment was drained).
    yield from _read_rest(response, landing, left, where)


def _drain(read_end: int, landing: Landing, count: int) -> None:
    """Move ``count`` bytes from the pipe into the file at the landing."""
    piece = landing.piece
    while count > 0:
        ask = min(count, piece - landing.offset % piece)  # pieces end on multiples of piece
        moved = os.splice(
            read_end, landing.fd, ask, offset_dst=landing.offset, flags=_SPLICE_F_MOVE
        )
        if moved <= 0:
            raise OSError(errno.EIO, "splice from the pipe moved nothing")
        count -= moved
        landing.offset += moved


def _rescue(read_end: int, landing: Landing, end: int) -> None:
    """Write what is still in the pipe, up to file offset ``end``, the ordinary way."""
    while landing.offset < end:
        data = os.read(read_end, min(SEGMENT, end - landing.offset))
        if not data:
            raise OSError(errno.EIO, "the pipe ended before its bytes were written")
        pwrite_all(landing.fd, data, landing.offset)
        landing.offset += len(data)


def _read_rest(
    response: http.client.HTTPResponse, landing: Landing, left: int, where: str
) -> Iterator[Landed]:
    """The rest of the body through ``http.client`` (splice turned out impossible here)."""
    while left > 0:
        try:
            data = response.read(min(left, SEGMENT))
        except (OSError, http.client.HTTPException) as exc:
            raise _broke_off(where, exc) from None
        if not data:
            raise _cut(where, response)
        pwrite_all(landing.fd, data, landing.offset)
        block = Landed(landing.fd, landing.offset, len(data), data)
        landing.offset += len(data)
        left -= len(data)
        yield block


def _broke_off(where: str, exc: BaseException) -> TransientError:
    return TransientError(
        f"{where}: the transfer broke off: {type(exc).__name__}: {redact(str(exc))}"
    )


def _cut(where: str, response: http.client.HTTPResponse) -> TransientError:
    return TransientError(
        f"{where}: the transfer broke off: the connection closed with "
        f"{response.length} bytes of the answer missing"
    )


class _Pipe:
    """A thread's pipe, sized to one segment when the system allows; closed with the thread
    (its thread-local reference goes), so runs of a long-lived process leak no descriptors."""

    def __init__(self) -> None:
        self.read_end, self.write_end = os.pipe()
        with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size: keep 64 KiB
            import fcntl

            fcntl.fcntl(self.write_end, _F_SETPIPE_SZ, SEGMENT)

    def close(self) -> None:
        for end in (self.read_end, self.write_end):
            with contextlib.suppress(OSError):
                os.close(end)
        self.read_end = self.write_end = -1

    def __del__(self) -> None:
        if self.read_end >= 0:
            self.close()


def _pipe() -> _Pipe:
    pipe: _Pipe | None = getattr(_local, "pipe", None)
    if pipe is None:
        pipe = _local.pipe = _Pipe()
    return pipe


def _drop_pipe() -> None:
    pipe: _Pipe | None = getattr(_local, "pipe", None)
    _local.pipe = None
    if pipe is not None:
        pipe.close()


def _read_back_buffer() -> bytearray:
    buffer: bytearray | None = getattr(_local, "buffer", None)
    if buffer is None:
        buffer = _local.buffer = bytearray(SEGMENT)
    return buffer
