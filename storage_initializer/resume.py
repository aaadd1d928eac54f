"""Resume at the block: durable progress of in-flight ranges, and what a new owner may keep.

A killed holder should cost its successor at most the blocks it had in flight, not whole chunks
(nor whole files: a file smaller than the chunk size is one range). So while a range streams,
its progress is journalled in the staging area's ``chunks.jsonl`` as ``{"path", "start",
"end"}``: bytes ``[start, end)`` of ``path`` are on disk. Progress is only journalled once it is
durable: a :class:`Checkpointer` thread collects the offsets the workers reached, ``fdatasync``s
those files, and only then appends the lines (one ``O_APPEND`` write per round; a torn last line
is skipped by the reader). The workers never wait for the disk; what a kill loses is what was
written since the last round began: at most :data:`ROUND_INTERVAL` of transfer, plus the round
under way.

Rounds are at least :data:`ROUND_INTERVAL` apart, except when a worker waits for its finished
chunk to be on record (:meth:`Checkpointer.settle`). Back to back, they were an ``fdatasync`` of
every file in flight each few milliseconds (1 200 for a 2 GiB pull): each one writes the dirty
pages back in the pull's own context, charged to its CPU limit, where the kernel's flusher
would otherwise do it (about a tenth of a pull's CPU, docs/performance.md).

The journal is in the group-writable state directory, so it is input, not truth
(:func:`kept_prefixes`): a claim past the file's size, past the staged file's end or over a hole
in it is discarded (those bytes are fetched again), and whatever is kept is re-read from disk to
resume the checksum (a CRC restarted from the prefix's CRC, MD5/SHA-256 fed the prefix before
the rest), so a prefix whose bytes were changed fails verification and the file is fetched
again, never published.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from storage_initializer.store.staging import Staging

log = logging.getLogger(__name__)

BLOCK = 1 << 20
#: Least seconds between two journal rounds unless a worker is waiting for one.
ROUND_INTERVAL = 0.2


def kept_prefixes(
    claims: Iterable[tuple[int, int]],
    spans: list[tuple[int, int | None]],
    size: int,
    on_disk: Callable[[int, int], bool],
) -> dict[int, int]:
    """Chunk start -> the offset its bytes are kept up to (only chunks that keep something).

    ``claims`` are the journal's ranges for one file; each must lie within ``size`` and be
    ``on_disk`` (written, no hole), or it is discarded. The rest are merged, so the answer does
    not depend on the chunk size the dead owner used."""
    valid = sorted((s, e) for s, e in claims if 0 <= s < e <= size and on_disk(s, e))
    merged: list[list[int]] = []
    for start, end in valid:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    firsts = [first for first, _last in merged]
    kept: dict[int, int] = {}
    for start, stop in spans:
        index = bisect.bisect_right(firsts, start) - 1
        if index >= 0 and start < merged[index][1]:
            kept[start] = min(size if stop is None else stop, merged[index][1])
    return kept


def plan(
    claims: Iterable[tuple[int, int]],
    spans: list[tuple[int, int | None]],
    size: int,
    path: Path,
    staged: int | None,
) -> tuple[set[tuple[int, int]], dict[int, int]]:
    """What a new owner keeps of the file staged at ``path`` (``staged``: its size when it is
    a regular file reached without a link, else None): the chunks kept whole, and chunk start
    -> where each partly written range continues."""
    on_disk = disk_extent(path) if staged is not None and staged <= size else None
    if on_disk is None:
        return set(), {}
    kept = kept_prefixes(claims, spans, size, on_disk)
    whole = {(start, done) for start, done in kept.items() if (start, done) in spans}
    if len(spans) == 1:  # a file of one range is hashed as it streams: continue it
        whole = set()
    partial = {start: done for start, done in kept.items() if (start, done) not in whole}
    return whole, partial


def disk_extent(path: Path) -> Callable[[int, int], bool] | None:
    """``on_disk(start, end)`` for a staged file: within its size and without a hole (a range
    journalled over a hole was never written). None when the file cannot be opened as a
    regular file without following a link."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        regular = stat.S_ISREG(info.st_mode)
        written = _data_segments(fd, info.st_size) if regular else []
    finally:
        os.close(fd)
    if not regular:
        return None

    firsts = [first for first, _last in written]  # in order: found by bisection

    def on_disk(start: int, end: int) -> bool:
        index = bisect.bisect_right(firsts, start) - 1
        return index >= 0 and end <= written[index][1]

    return on_disk


def _data_segments(fd: int, size: int) -> list[tuple[int, int]]:
    """The runs of written data of a file (``SEEK_DATA``/``SEEK_HOLE``); the whole file where
    the filesystem cannot tell."""
    segments: list[tuple[int, int]] = []
    position = 0
    while position < size:
        try:
            data = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole from ``position`` to the end
                break
            return [(0, size)]
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        segments.append((data, hole))
        position = hole
    return segments


def read_back(fd: int, start: int, end: int, update: Callable[[bytes], None]) -> int:
    """Feed ``update`` the bytes ``[start, end)`` of ``fd``; returns where it stopped (``end``,
    or earlier if the file is shorter)."""
    position = start
    while position < end:
        block = os.pread(fd, min(BLOCK, end - position), position)
        if not block:
            break
        update(block)
        position += len(block)
    return position


class Checkpointer:
    """Journals durable progress off the workers' path: ``note`` is a dict update; a thread
    ``fdatasync``s the noted files and then appends one line per range that moved."""

    def __init__(self, staging: Staging) -> None:
        self.staging = staging
        self._pending: dict[tuple[str, int], tuple[Path, int]] = {}
        self._wake = threading.Condition()
        self._closed = False
        self._broken = False
        self._stopped = False
        #: Rounds that took their batch / that finished journalling it (see settle).
        self._started = 0
        self._finished = 0
        #: The round a worker waits for in settle: when not started yet, it starts at once.
        self._wanted = 0
        self._thread = threading.Thread(target=self._run, name="checkpoint", daemon=True)
        self._thread.start()

    def note(self, path: Path, name: str, start: int, offset: int) -> None:
        """Bytes ``[start, offset)`` of ``name`` (staged at ``path``) are written."""
        with self._wake:
            self._pending[(name, start)] = (path, offset)
            self._wake.notify()

    def settle(self, name: str, start: int) -> None:
        """Wait until the progress noted for the range at ``start`` of ``name`` is journalled
        (or could not be): a worker calls it when its range is complete, so a finished chunk
        is on record before the worker takes the next one."""
        with self._wake:
            # Still pending: the next round takes it; otherwise the round under way has it.
            target = self._started + 1 if (name, start) in self._pending else self._started
            if target > self._wanted:
                self._wanted = target
                self._wake.notify_all()
            self._wake.wait_for(lambda: self._finished >= target or self._stopped)

    def close(self) -> None:
        """Journal what is pending, then stop (called once the workers are done)."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    def _run(self) -> None:
        try:
            due = 0.0
            while True:
                with self._wake:
                    self._wake.wait_for(
                        lambda: self._wanted > self._started or self._closed,
                        timeout=max(0.0, due - time.monotonic()),
                    )
                    self._wake.wait_for(lambda: self._pending or self._closed)
                    due = time.monotonic() + ROUND_INTERVAL
                    batch, self._pending = self._pending, {}
                    last = self._closed and not batch
                    self._started += 1
                if batch and not self._broken:
                    self._flush(batch)
                with self._wake:
                    self._finished = self._started
                    self._wake.notify_all()
                if last:
                    return
        finally:
            with self._wake:
                self._stopped = True
                self._wake.notify_all()

    def _flush(self, batch: dict[tuple[str, int], tuple[Path, int]]) -> None:
        synced: set[Path] = set()
        ranges = []
        for (name, start), (path, offset) in batch.items():
            if path not in synced and not _datasync(path):
                continue  # gone (the area was adopted by a new owner) or unreadable
            synced.add(path)
            ranges.append((name, start, offset))
        try:
            self.staging.record_ranges(ranges)
        except OSError as exc:
            # Our staging area was renamed by a new owner (lease lost) or the disk failed:
            # progress is not journalled, which costs a refetch, never a wrong byte.
            self._broken = True
            log.debug("not journalling progress any more: %s", exc)


def _datasync(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        os.fdatasync(fd)
        return True
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
