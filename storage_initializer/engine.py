"""The transfer engine: moves bytes from a source into staging, verified, with bounded memory.

Many files run in parallel and large files in concurrent ranged chunks on one bounded pool.
Each worker streams blocks straight to the file with ``pwrite``; memory is about
``workers × block``, whatever the model's size. Checksums are computed while bytes arrive: a
file read in one stream is hashed block by block; a chunked file verified by a CRC is hashed
chunk by chunk as bytes arrive and the CRCs are combined at the end (crcmath); other chunked
files are hashed in order as soon as the chunks before them are complete (reading back from
the page cache). Large files are worked on a few at a time, and each finished chunk is handed
to the kernel's writeback at once, so the fsync before a file counts as verified is short.
Progress is journalled as it becomes durable, so a new owner resumes each range at its last
block (resume.py).
Failures worth retrying resume the chunk at the last byte written, with exponential backoff
and jitter (honouring Retry-After); a file whose checksum does not match is fetched once more,
then reported.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from storage_initializer import checksums, crcmath, resume, stall, writer
from storage_initializer.errors import (
    InitializerError,
    IntegrityError,
    SourceChangedError,
    TransientError,
)
from storage_initializer.progress import Progress
from storage_initializer.providers.base import RemoteFile, Source
from storage_initializer.settings import Settings
from storage_initializer.signals import STOP_GRACE
from storage_initializer.store.staging import Staging

log = logging.getLogger(__name__)

BLOCK = 1 << 20
RETRYABLE = (TransientError, ConnectionError, TimeoutError)
#: Verification failures of one file that we retry from scratch before giving up.
INTEGRITY_ATTEMPTS = 2
#: Least seconds between lease checks before new requests and files (Engine._guard_if_due).
GUARD_INTERVAL = 1.0
#: Large files whose chunks are fetched at the same time (see Engine._tasks).
ACTIVE_FILES = 4


class Cancelled(Exception):
    """Another task failed, or the lease was lost: stop quietly."""


def backoff(attempt: int, retry_after: float | None) -> float:
    """Exponential backoff with full jitter; a server's Retry-After is a floor."""
    ceiling = min(30.0, 0.25 * (2**attempt))
    delay = random.uniform(ceiling / 2, ceiling)
    if retry_after is not None:
        delay = max(delay, min(retry_after, 120.0))
    return delay


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
    def combined(self) -> bool:
        """Chunks hashed independently and combined (no in-order read-back)."""
        return self.crc_update is not None and len(self.chunks) > 1


class Engine:
    def __init__(
        self,
        source: Source,
        settings: Settings,
        progress: Progress,
        cancel: threading.Event,
        guard: Callable[[], None] = lambda: None,
    ) -> None:
        self.source = source
        self.settings = settings
        self.progress = progress
        self.cancel = cancel
        #: Raises when we no longer own the download; called before anything destructive,
        #: since a new owner may have adopted our staging files.
        self.guard = guard
        self._guarded_at = time.monotonic()
        self._guard_lock = threading.Lock()
        self._resumable: dict[str, set[tuple[int, int]]] = {}
        self._checkpoints: resume.Checkpointer | None = None
        self.workers = settings.workers or source.workers()
        self.ranged = source.supports_ranges
        self.results: dict[str, dict[str, str]] = {}
        self._results_lock = threading.Lock()
        #: Cuts transfers that make too little progress, and cancels us at the deadline.
        self.stalls = stall.Guard(settings.stall_timeout, settings.min_rate, cancel)
        self.writer = writer.Writer(settings.write_size, settings.direct_io)

    # -- planning ---------------------------------------------------------------------------

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

    # -- running ----------------------------------------------------------------------------

    def run(self, files: list[RemoteFile], staging: Staging) -> dict[str, dict[str, str]]:
        """Download ``files`` into ``staging``; returns path -> verified checksums."""
        self._resumable = staging.chunks()
        jobs = [self._job(f, staging) for f in files]
        checkpoints = self._checkpoints = resume.Checkpointer(staging)
        queue = self._tasks(jobs)
        in_flight: dict[Future[_FileJob | None], tuple[_FileJob, int, int | None]] = {}
        window = self.workers * 2
        with self.stalls, _pool(self.workers) as pool:
            try:
                while True:
                    while len(in_flight) < window:
                        task = next(queue, None)
                        if task is None:
                            break
                        in_flight[pool.submit(self._chunk, *task, staging)] = task
                    if not in_flight:
                        break
                    done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                    for future in done:
                        in_flight.pop(future)
                        again = future.result()
                        if again is not None:  # failed verification: fetch the file again
                            queue = _chain(self._tasks([again]), queue)
            except BaseException:
                self.cancel.set()
                for future in in_flight:
                    future.cancel()
                # Workers stop at their next block; one stuck in a request to a stalled
                # server is not waited for (see _pool).
                wait(in_flight, timeout=STOP_GRACE)
                raise
            finally:
                checkpoints.close()  # journals the last progress: a failed pull resumes there
                for job in jobs:
                    if job.fd >= 0:
                        with contextlib.suppress(OSError):
                            os.close(job.fd)
        return self.results

    def _open(self, job: _FileJob) -> None:
        with job.lock:
            if job.fd >= 0:
                return
            job.path.parent.mkdir(parents=True, exist_ok=True)
            if job.resumed or job.prefix:
                job.fd = os.open(job.path, os.O_RDWR | os.O_NOFOLLOW)
                for start, end in job.resumed:
                    job.finished[start] = end
                if job.inline_hash:  # drop what was written after the last journalled block
                    os.ftruncate(job.fd, job.prefix.get(0, 0))
            else:
                self._guard_if_due()
                job.fd = os.open(job.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            job.hasher = checksums.new_hasher(job.algorithm)
            job.sha256 = self._new_sha256(job)
            job.hashed_to = 0
            if job.file.size and not job.inline_hash:  # a resumed file may be shorter
                os.ftruncate(job.fd, job.file.size)

    def _chunk(
        self, job: _FileJob, start: int, end: int | None, staging: Staging
    ) -> _FileJob | None:
        if self.cancel.is_set():
            raise Cancelled()
        self._open(job)
        if start >= 0:
            self._guard_if_due()
        if start < 0:
            # Bookkeeping for resumed chunks: hash them (combined CRC), or hash what is
            # contiguous below (in-order hash).
            if job.combined:
                self._crc_resumed(job)
        elif end is not None and end > start:
            self._fetch(job, start, end)
        elif end is None:
            self._fetch(job, start, None)
        if not job.inline_hash and start >= 0 and end is not None:
            _start_writeback(job.fd, start, end - start)
            self._settle(job, start)
        with job.lock:
            if start >= 0:
                job.finished[start] = job.hashed_to if end is None else end
            if not job.inline_hash and (not job.combined or job.sha256 is not None):
                self._hash_in_order(job)
            job.remaining -= 1
            if job.remaining:
                return None
        return self._complete(job, staging)

    def _guard_if_due(self) -> None:
        """Check that we still own the download before a new request or a new file, at most
        once per heartbeat interval (a check reads the lease: on a model of many small files,
        one per file was a large part of the per-file cost). A holder that was frozen
        (SIGSTOP, a stalled node) finds the time since its last check long when it resumes,
        so it asks before fetching another byte, instead of waiting for its next heartbeat
        while the new owner works."""
        with self._guard_lock:
            now = time.monotonic()
            if now - self._guarded_at < max(GUARD_INTERVAL, self.settings.heartbeat_interval):
                return
            self._guarded_at = now
        self.guard()

    def _fetch(self, job: _FileJob, start: int, end: int | None) -> None:
        attempt = 0
        source = self.source
        crc_update = job.crc_update if job.combined else None
        # Where this range starts, and its CRC so far (resumed along with ``offset`` after a
        # failure): past the prefix a previous owner left, if any.
        offset, crc = self._resume_point(job, start)
        while True:
            watch = self.stalls.watch()
            try:
                blocks = source.read(job.file, offset, end) if end is None or offset < end else ()
                sink = self.writer.open(job.fd, job.path, offset, job.file.size)
                try:
                    for block in watch.blocks(blocks, job.file.path):
                        if self.cancel.is_set():
                            raise Cancelled()
                        size = len(block)
                        limit = end if end is not None else job.file.size
                        if limit is not None and offset + size > limit:
                            raise IntegrityError(
                                f"{job.file.path}: the source sent more bytes than the "
                                f"{limit} it announced"
                            )
                        sink.write(block, offset)
                        if crc_update is not None:
                            crc = crc_update(block, crc)
                        elif job.inline_hash and job.hasher is not None:
                            job.hasher.update(block)
                            if job.sha256 is not None:
                                job.sha256.update(block)
                            job.hashed_to = offset + size
                        offset += size
                        self.progress.transferred(size)
                        # Journal only what reached the kernel, never bytes the sink buffers.
                        self._note(job, start, sink.written_to(offset))
                finally:
                    sink.close()  # what it buffered is written before any retry from offset
                self._note(job, start, offset)
                expected_end = end if end is not None else job.file.size
                if expected_end is not None and offset < expected_end:
                    raise TransientError(
                        f"{job.file.path}: the connection closed after {offset} of "
                        f"{expected_end} bytes"
                    )
                if crc_update is not None:
                    job.crcs[start] = crc
                return
            except SourceChangedError as exc:
                # Not retried: another version's bytes must not join these. The pull discards
                # the file and lists the source again (changes.py).
                exc.path = job.file.path
                raise
            except Exception as caught:
                if self.cancel.is_set():
                    stall.check_deadline()  # the --timeout deadline passed: say so
                    if isinstance(caught, Cancelled):
                        raise
                    raise Cancelled() from caught
                exc = watch.explain(caught, job.file.path)
                if not isinstance(exc, RETRYABLE):
                    raise
                attempt += 1
                if attempt > self.settings.retries:
                    message = exc.describe() if isinstance(exc, InitializerError) else str(exc)
                    raise TransientError(
                        f"{job.file.path}: gave up after {attempt} attempts: {message}",
                        "The source kept failing; check its health or raise "
                        "STORAGE_INITIALIZER_RETRIES",
                    ) from exc
                self.progress.retried()  # counted once a retry is really made
                if not self.ranged and offset > start:
                    self.guard()
                    self.progress.rewound(offset - start)
                    offset = start
                    crc = 0
                    job.hasher = checksums.new_hasher(job.algorithm)
                    job.sha256 = self._new_sha256(job)
                    job.hashed_to = 0
                    os.ftruncate(job.fd, 0)
                delay = backoff(attempt, getattr(exc, "retry_after", None))
                log.info(
                    "retrying %s at byte %d in %.1fs (attempt %d/%d): %s",
                    job.file.path,
                    offset,
                    delay,
                    attempt + 1,
                    self.settings.retries + 1,
                    exc,
                )
                if self.cancel.wait(delay):
                    raise Cancelled() from exc

    def _resume_point(self, job: _FileJob, start: int) -> tuple[int, int]:
        """Where the range at ``start`` continues, and its CRC so far. A kept prefix is read
        back from disk into the range's CRC, or into the file's hash when the file is one
        range (chunks hashed in order are read back when they finish anyway), so what is
        verified is the bytes on disk, never the journal's word."""
        kept = job.prefix.pop(start, None)
        if kept is None or job.fd < 0:
            return start, 0
        crc = 0
        crc_update = job.crc_update

        def update(block: bytes) -> None:
            nonlocal crc
            if job.combined and crc_update is not None:
                crc = crc_update(block, crc)
            elif job.inline_hash and job.hasher is not None:
                job.hasher.update(block)
                if job.sha256 is not None:
                    job.sha256.update(block)

        if not job.combined and not job.inline_hash:
            return kept, 0
        reached = resume.read_back(job.fd, start, kept, update)
        if job.inline_hash:
            job.hashed_to = reached
        return reached, crc

    def _note(self, job: _FileJob, start: int, offset: int) -> None:
        """Bytes up to ``offset`` of the range at ``start`` are written: journal them once
        they are durable (resume.Checkpointer), so a new owner continues from there. Call
        it only once the bytes were handed to the kernel (the write returned), never for
        bytes still buffered in the process."""
        if self._checkpoints is not None and self.ranged and job.file.size is not None:
            self._checkpoints.note(job.path, job.file.path, start, offset)

    def _settle(self, job: _FileJob, start: int) -> None:
        """A chunk is complete: wait until its progress is journalled before the next one."""
        if self._checkpoints is not None and self.ranged:
            self._checkpoints.settle(job.file.path, start)

    def _hash_in_order(self, job: _FileJob) -> None:
        """Hash every chunk that is now contiguous with what was hashed (job.lock held); for a
        file verified by combined CRCs, only its SHA-256 (--require-signature)."""
        assert job.hasher is not None
        while job.hashed_to in job.finished:
            end = job.finished.pop(job.hashed_to)
            position = job.hashed_to
            while position < end:
                block = os.pread(job.fd, min(BLOCK, end - position), position)
                if not block:
                    break
                if not job.combined:
                    job.hasher.update(block)
                if job.sha256 is not None:
                    job.sha256.update(block)
                position += len(block)
            job.hashed_to = end

    def _new_sha256(self, job: _FileJob) -> checksums.Hasher | None:
        if not self.settings.require_signature or job.algorithm == "sha256":
            return None
        return checksums.new_hasher("sha256")

    def _crc_resumed(self, job: _FileJob) -> None:
        """CRCs of the chunks a previous owner left on disk (read back once)."""
        assert job.crc_update is not None
        for start, end in job.resumed:
            crc = 0
            position = start
            while position < end:
                block = os.pread(job.fd, min(BLOCK, end - position), position)
                if not block:
                    break
                crc = job.crc_update(block, crc)
                position += len(block)
            job.crcs[start] = crc

    def _digest(self, job: _FileJob) -> str:
        if not job.combined:
            assert job.hasher is not None
            return job.hasher.hexdigest()
        value = 0
        for start, end in job.chunks:
            assert end is not None  # chunked files have a known size
            chunk_crc = job.crcs.get(start)
            if chunk_crc is None:  # cannot happen: every chunk records its CRC
                return "missing"
            value = crcmath.combine(job.algorithm, value, chunk_crc, end - start)
        return crcmath.hexdigest(value, job.algorithm)

    def _complete(self, job: _FileJob, staging: Staging) -> _FileJob | None:
        assert job.hasher is not None
        began = time.monotonic()  # the "verify" phase of the metrics: digest, check, fsync
        size = os.fstat(job.fd).st_size
        digest = self._digest(job)
        problem = None
        if job.file.size is not None and size != job.file.size:
            problem = f"size {size}, expected {job.file.size}"
        elif job.expected is not None and digest != job.expected.lower():
            problem = f"{job.algorithm} {digest}, expected {job.expected.lower()}"
        if problem is None:
            os.fsync(job.fd)
        os.close(job.fd)
        job.fd = -1
        with self._results_lock:  # summed over files: it overlaps the transfer of others
            phases = self.progress.phases
            phases["verify"] = phases.get("verify", 0.0) + time.monotonic() - began
        if problem is not None:
            if job.attempt < INTEGRITY_ATTEMPTS:
                log.warning(
                    "%s failed verification (%s); fetching it again", job.file.path, problem
                )
                self.progress.rewound(size)
                self.progress.verify_failed()
                job.attempt += 1
                job.finished.clear()
                job.crcs.clear()
                job.resumed = set()
                job.prefix.clear()
                job.remaining = len(job.chunks)
                return job
            raise IntegrityError(f"{job.file.path} failed verification: {problem}")
        verified = {job.algorithm: digest}
        if job.sha256 is not None and job.hashed_to == size:  # every byte hashed in order
            verified["sha256"] = job.sha256.hexdigest()
        staging.record(job.file.path, size, verified)
        with self._results_lock:
            self.results[job.file.path] = verified
        self.progress.file_done()
        return None


def _writeback_starter() -> Callable[[int, int, int], None]:
    """``start(fd, offset, length)``: begin writing a finished chunk to disk, without waiting.

    Every file is fsynced before it counts as verified. Chunks of the large files finish
    together at the end of a pull, so without this their fsyncs would write gigabytes at once
    after the last byte arrived; asking the kernel to start writeback as each chunk lands
    (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``) overlaps the disk with the network and
    leaves little for the final fsync. A no-op where the call does not exist.
    """

    def nothing(fd: int, offset: int, length: int) -> None:
        return None

    if not sys.platform.startswith("linux"):
        return nothing
    try:
        import ctypes

        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return nothing
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int

    def start(fd: int, offset: int, length: int) -> None:
        function(fd, offset, length, SYNC_FILE_RANGE_WRITE)  # advisory: errors are ignored

    return start


SYNC_FILE_RANGE_WRITE = 2
_start_writeback = _writeback_starter()


@contextlib.contextmanager
def _pool(workers: int) -> Iterator[ThreadPoolExecutor]:
    """The transfer pool. When the run fails or is cancelled (a lost lease, SIGTERM), it does
    not wait for workers still inside a request: a stalled server would hold a terminated
    pod until the kubelet's SIGKILL. They stop at their next block (Engine.cancel) and
    write nothing more, or end with the process."""
    pool = ThreadPoolExecutor(workers, thread_name_prefix="transfer")
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _job_tasks(job: _FileJob) -> Iterator[tuple[_FileJob, int, int | None]]:
    """One file's tasks in order: the bookkeeping of resumed chunks, then the chunks to fetch."""
    if job.resumed:
        yield job, -1, None
    for start, end in job.chunks:
        if (start, end) not in job.resumed:
            yield job, start, end


def _chain(first: Iterator, second: Iterator) -> Iterator:  # type: ignore[type-arg]
    yield from first
    yield from second
