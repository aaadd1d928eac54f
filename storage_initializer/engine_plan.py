"""Planning a transfer: each file's job and the order in which its chunks are fetched.

A job says how one file is fetched (one stream, or ranged chunks of ``chunk_size``), which
checksum verifies it, and what a previous owner already wrote durably (resume.py). The chunks
of a few large files at a time are then handed out in turn, so their in-order hashes keep up;
the workers take them one after another (:meth:`Planner._work`). Split from engine.py, which
fetches; the engine inherits :class:`Planner`.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from storage_initializer import checksums, crcmath, resume
from storage_initializer.progress import Progress
from storage_initializer.providers.base import RemoteFile
from storage_initializer.settings import Settings
from storage_initializer.store.staging import Staging

log = logging.getLogger("storage_initializer.engine")  # the engine's log, as before

#: Large files whose chunks are fetched at the same time (see Planner._tasks).
ACTIVE_FILES = 4
#: A file fetched in one range and smaller than this is not journalled as it arrives: a new
#: owner fetches it again whole, which costs less than the ``fdatasync`` and journal line that
#: would save it (a third of what a 16 KiB file costs; the file is fsynced when complete).
CHECKPOINT_MIN = 8 << 20


class Cancelled(Exception):
    """Another task failed, or the lease was lost: stop quietly."""


@dataclass
class _FileJob:
    file: RemoteFile
    path: Path
    algorithm: str
    expected: str | None
    chunks: list[tuple[int, int | None]]
    attempt: int = 1
    fd: int = -1
    hasher: checksums.Hasher | None = None
    hashed_to: int = 0
    finished: dict[int, int] = field(default_factory=dict)
    remaining: int = 0
    #: Chunks already on disk from a previous owner (kept, hashed in order with the rest).
    resumed: set[tuple[int, int]] = field(default_factory=set)
    #: Chunk start -> where that range continues: a previous owner durably wrote its prefix
    #: (resume.py); taken by the first fetch of the range.
    prefix: dict[int, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: For a chunked file verified by a CRC: ``update(data, crc)``; each chunk is hashed by
    #: its own worker as bytes arrive and the file's CRC is combined at the end (crcmath).
    crc_update: Callable[[bytes, int], int] | None = None
    #: Chunk start -> CRC of that chunk (with ``crc_update``).
    crcs: dict[int, int] = field(default_factory=dict)
    #: --require-signature: the file's SHA-256 as well, for the signed manifest (signing.py),
    #: when the source's checksum is another algorithm. Chunked files are hashed in order.
    sha256: checksums.Hasher | None = None

    @property
    def inline_hash(self) -> bool:
        return len(self.chunks) == 1

    @property
    def journalled(self) -> bool:
        """Whether progress inside this file is worth journalling (see CHECKPOINT_MIN)."""
        size = self.file.size
        return size is not None and (len(self.chunks) > 1 or size >= CHECKPOINT_MIN)

    @property
    def combined(self) -> bool:
        """Chunks hashed independently and combined (no in-order read-back)."""
        return self.crc_update is not None and len(self.chunks) > 1


class Planner:
    """The engine's planning half (a mixin of engine.Engine, which sets these attributes)."""

    settings: Settings
    progress: Progress
    ranged: bool
    workers: int
    cancel: threading.Event
    _resumable: dict[str, set[tuple[int, int]]]
    #: The plan's tasks, taken by the workers themselves (see _work) under ``_more``.
    _queue: Iterator[tuple[_FileJob, int, int | None]]
    _more: threading.Condition
    _busy: int
    _idle: int
    _stopping: bool

    def _chunk(
        self, job: _FileJob, start: int, end: int | None, staging: Staging
    ) -> _FileJob | None:
        raise NotImplementedError  # engine.Engine fetches

    def _job(self, file: RemoteFile, staging: Staging) -> _FileJob:
        algorithm = checksums.choose(file.checksums) or checksums.local_default()
        expected = file.checksums.get(algorithm)
        size = file.size
        chunk = self.settings.chunk_size
        if size is None or not self.ranged or size <= chunk:
            spans: list[tuple[int, int | None]] = [(0, size)]
        else:
            spans = [(start, min(start + chunk, size)) for start in range(0, size, chunk)]
        path = staging.data / file.path
        job = _FileJob(file, path, algorithm, expected, spans, remaining=len(spans))
        if len(spans) > 1:
            job.crc_update = crcmath.updater(algorithm)
        if self.ranged and size is not None and file.path in self._resumable:
            self._plan_resume(job, staging)
        return job

    def _plan_resume(self, job: _FileJob, staging: Staging) -> None:
        """Keep what a previous owner durably wrote of this file (resume.py): whole chunks,
        and the prefix of each range it had in flight; claims the staged file does not back
        (past its end, over a hole, through a link) are discarded and fetched again."""
        size = job.file.size
        assert size is not None
        claims = self._resumable[job.file.path]
        staged = staging.staged_size(job.file.path)
        job.resumed, job.prefix = resume.plan(claims, job.chunks, size, job.path, staged)
        if job.resumed:
            # One bookkeeping task replaces the chunks we keep (see _chunk with start < 0).
            job.remaining = len(job.chunks) - len(job.resumed) + 1
        kept = {**dict(job.resumed), **job.prefix}
        kept_bytes = sum(done - start for start, done in kept.items())
        if kept_bytes:
            self.progress.reused_bytes(kept_bytes)
            log.info(
                "%s: resuming, %d of %d bytes already on disk (%d of %d chunks whole)",
                job.file.path,
                kept_bytes,
                size,
                len(job.resumed),
                len(job.chunks),
            )

    def _tasks(self, jobs: list[_FileJob]) -> Iterator[tuple[_FileJob, int, int | None]]:
        """Chunks of a few files at a time, taken in turn (A1 B1 C1 A2 B2 C2 ...).

        Spreading the workers over several large files, instead of putting them all on the
        chunks of one, keeps each file's chunks finishing nearly in order (so its in-order hash
        keeps up, and the files' hashes run on different threads) and avoids a pile-up of
        writers on one inode lock. Files join the turn one by one, so few are open at once.
        """
        pending = iter(jobs)
        active: deque[Iterator[tuple[_FileJob, int, int | None]]] = deque()
        limit = max(1, min(ACTIVE_FILES, self.workers // 4))
        while True:
            while len(active) < limit:
                job = next(pending, None)
                if job is None:
                    break
                active.append(_job_tasks(job))
            if not active:
                return
            tasks = active.popleft()
            task = next(tasks, None)
            if task is not None:
                yield task
                active.append(tasks)

    def _work(self, staging: Staging) -> None:
        """One worker: takes the next task of the plan until none is left. Workers take tasks
        themselves, instead of the main thread handing out a future per task and waking at
        each one's end: on a model of many small files that bookkeeping (a future, a waiter
        on every task in flight, a switch to the main thread and back) cost 30-40 us a file
        on 1 CPU. A worker that finds nothing to do while others are busy waits: a file
        that failed verification comes back with all its chunks (see _chunk)."""
        more = self._more
        while True:
            with more:
                while True:
                    if self.cancel.is_set() or self._stopping:
                        raise Cancelled()
                    task = next(self._queue, None)
                    if task is not None:
                        self._busy += 1
                        break
                    if not self._busy:
                        return
                    self._idle += 1
                    more.wait()
                    self._idle -= 1
            again = None
            failed = True
            try:
                again = self._chunk(*task, staging)
                failed = False
            finally:
                with more:
                    self._busy -= 1
                    self._stopping = self._stopping or failed  # the others take no new task
                    if again is not None:  # failed verification: fetch the file again
                        self._queue = _chain(self._tasks([again]), self._queue)
                    if self._idle and (failed or again is not None or not self._busy):
                        more.notify_all()


def _job_tasks(job: _FileJob) -> Iterator[tuple[_FileJob, int, int | None]]:
    """One file's tasks in order: the bookkeeping of resumed chunks, then the chunks to fetch."""
    if job.resumed:
        yield job, -1, None
    for start, end in job.chunks:
        if (start, end) not in job.resumed:
            yield job, start, end


def _chain(first: Iterator, second: Iterator) -> Iterator:
    yield from first
    yield from second
