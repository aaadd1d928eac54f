"""How received bytes reach the file: page-cache writes in pieces, or direct I/O.

Most of a pull's CPU goes into copying received bytes into the page cache. How much that copy
costs depends on the size of each ``pwrite``: since Linux 6.x a buffered write allocates page
cache folios as large as the write, and large fresh folios can cost far more per byte (in a
VM whose free memory goes back to the host, every first touch of such a folio is a host page
fault). So the size is a setting (``write_size``, ``STORAGE_INITIALIZER_WRITE_SIZE``); its
default comes from the sweep in ``scripts/bench`` (docs/performance.md). It is separate from
the size of the blocks providers read from the network (``read_size``): each block is
checksummed and counted once, in Python, so reading in small blocks costs per block what
writing in small pieces saves per byte. Each block is written in pieces of ``write_size``.

``direct_io`` (``STORAGE_INITIALIZER_DIRECT_IO``) writes the large files with ``O_DIRECT``
instead: received bytes are copied into a page-aligned buffer and written from it straight to
the device, so a model much larger than the node's free memory does not push everything else
out of the page cache, and a pod's memory limit (page cache counts against it) is not filled
with dirty pages. Only aligned whole blocks go direct; the unaligned tail of a chunk is written
through the ordinary descriptor. Files smaller than :data:`DIRECT_MIN_SIZE`, and filesystems
that refuse ``O_DIRECT`` (tmpfs, some overlay setups), fall back to buffered writes. Every file
is still fsynced before it counts as verified.

A sink belongs to one attempt at one chunk: the engine opens it where the attempt starts and
closes it when the attempt ends, however it ends; closing writes whatever is buffered, so every
byte the engine has counted (and hashed) is on the file when it retries from there.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
from typing import TYPE_CHECKING, Protocol

from storage_initializer.settings import Settings

if TYPE_CHECKING:
    from storage_initializer import splice

log = logging.getLogger(__name__)

#: The default piece size of page-cache writes (the benchmark's sweep, docs/performance.md).
DEFAULT_WRITE_SIZE = Settings.write_size
#: Offsets, lengths and buffer addresses of O_DIRECT writes are multiples of this (4 KiB
#: covers 512-byte and 4 KiB logical sectors).
ALIGN = 4096
#: Size of each O_DIRECT write (and of each worker's aligned buffer).
DIRECT_BUFFER = 4 * 1024 * 1024
#: Files smaller than this are written through the page cache even in direct mode.
DIRECT_MIN_SIZE = 8 * 1024 * 1024


class Sink(Protocol):
    def write(self, data: bytes, offset: int) -> None: ...

    def written_to(self, offset: int) -> int:
        """Of the bytes handed to :meth:`write` up to ``offset``, the end of those the kernel
        already has (the rest is buffered here): what the resume journal may claim."""
        ...

    def close(self) -> None: ...

    def landing(self, offset: int) -> splice.Landing | None:
        """Where a body may be spliced straight into the file from ``offset`` (splice.py);
        None when this sink must see every byte."""
        ...


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """``pwrite`` until every byte is written (a regular file may take fewer at once)."""
    written = os.pwrite(fd, data, offset)
    if written == len(data):
        return
    view = memoryview(data)
    while written < len(view):
        written += os.pwrite(fd, view[written:], offset + written)


class BufferedSink:
    """Writes through the page cache in ``piece``-sized ``pwrite``s."""

    __slots__ = ("fd", "piece", "splice")

    def __init__(self, fd: int, piece: int, splice: bool = False) -> None:
        self.fd = fd
        self.piece = piece
        self.splice = splice

    def write(self, data: bytes, offset: int) -> None:
        size = len(data)
        piece = self.piece
        # Pieces end on multiples of ``piece`` in the file, so each fills whole page-cache
        # folios: blocks that arrive in arbitrary sizes (an eager read) stay aligned.
        first = piece - offset % piece
        if size <= first:
            pwrite_all(self.fd, data, offset)
            return
        view = memoryview(data)
        pwrite_all(self.fd, view[:first], offset)
        for position in range(first, size, piece):
            pwrite_all(self.fd, view[position : position + piece], offset + position)

    def written_to(self, offset: int) -> int:
        return offset  # every write is a pwrite before it returns

    def close(self) -> None:
        return None

    def landing(self, offset: int) -> splice.Landing | None:
        if not self.splice:
            return None
        from storage_initializer import splice  # splice.py writes with pwrite_all (below)

        return splice.Landing(self.fd, offset, self.piece) if splice.enabled() else None


class DirectSink:
    """Collects sequential bytes in an aligned buffer and writes it with ``O_DIRECT``."""

    def __init__(self, fd: int, direct_fd: int, offset: int, buffer: mmap.mmap) -> None:
        self.fd = fd
        self.direct_fd = direct_fd
        self.buffer = buffer
        self.view = memoryview(buffer)
        #: File offset of ``buffer[0]`` (aligned) and how much of the buffer holds data.
        self.base = offset
        self.fill = 0

    def write(self, data: bytes, offset: int) -> None:
        if offset != self.base + self.fill:  # not sequential (cannot happen in the engine)
            self._flush_all()
            if offset % ALIGN:
                pwrite_all(self.fd, data, offset)
                self.base = -1  # stays buffered: every later write differs from base + fill
                return
            self.base = offset
        size = len(data)
        position = 0
        capacity = len(self.buffer)
        while position < size:
            take = min(size - position, capacity - self.fill)
            self.view[self.fill : self.fill + take] = data[position : position + take]
            self.fill += take
            position += take
            if self.fill == capacity:
                pwrite_all(self.direct_fd, self.view, self.base)
                self.base += capacity
                self.fill = 0

    def written_to(self, offset: int) -> int:
        # ``base``: the file offset of the first byte still buffered (-1: nothing aligned is
        # buffered, every write went through the page cache).
        return offset if self.base < 0 else min(offset, self.base)

    def _flush_all(self) -> None:
        """The aligned part directly, the tail through the page cache."""
        if self.fill <= 0 or self.base < 0:
            self.fill = 0
            return
        aligned = self.fill - self.fill % ALIGN
        if aligned:
            pwrite_all(self.direct_fd, self.view[:aligned], self.base)
        if aligned < self.fill:
            pwrite_all(self.fd, self.view[aligned : self.fill], self.base + aligned)
        self.base += self.fill
        self.fill = 0

    def close(self) -> None:
        try:
            self._flush_all()
        finally:
            self.view.release()
            self.buffer.close()
            os.close(self.direct_fd)

    def landing(self, offset: int) -> splice.Landing | None:
        return None  # direct writes go from an aligned buffer of ours


class Writer:
    """Opens the sink for each attempt at a chunk, as the settings ask."""

    def __init__(
        self, write_size: int = DEFAULT_WRITE_SIZE, direct: bool = False, splice: bool = False
    ) -> None:
        self.write_size = max(1, write_size)
        self.direct = direct and hasattr(os, "O_DIRECT")
        self.splice = splice
        self._warned = False

    def open(self, fd: int, path: os.PathLike[str] | str, offset: int, size: int | None) -> Sink:
        if not self.direct or size is None or size < DIRECT_MIN_SIZE or offset % ALIGN:
            return BufferedSink(fd, self.write_size, self.splice)
        try:
            direct_fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as exc:  # EINVAL: the filesystem does not do O_DIRECT
            if not self._warned:
                self._warned = True
                log.warning(
                    "direct I/O is not possible on %s (%s); writing through the page cache",
                    os.path.dirname(path),
                    exc.strerror,
                )
            return BufferedSink(fd, self.write_size, self.splice)
        try:
            buffer = mmap.mmap(-1, DIRECT_BUFFER)  # anonymous mappings are page-aligned
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(direct_fd)
            raise
        return DirectSink(fd, direct_fd, offset, buffer)


def direct_io_supported(directory: os.PathLike[str] | str) -> bool:
    """Whether files in ``directory`` can be opened with ``O_DIRECT`` and written aligned."""
    if not hasattr(os, "O_DIRECT"):
        return False
    path = os.path.join(directory, ".direct-io-probe")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    buffer = mmap.mmap(-1, ALIGN)
    try:
        os.pwrite(fd, buffer, 0)
        return True
    except OSError:
        return False
    finally:
        buffer.close()
        os.close(fd)
        os.unlink(path)
