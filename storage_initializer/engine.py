"""The transfer engine: moves bytes from a source into staging, verified, with bounded memory.

Many files run in parallel and large files in concurrent ranged chunks on one bounded pool.
Each worker streams blocks straight to the file with ``pwrite``; memory is about
``workers × block``, whatever the model's size. Checksums are computed while bytes arrive: a
file read in one stream is hashed block by block; a chunked file verified by a CRC is hashed
chunk by chunk as bytes arrive and the CRCs are combined at the end (crcmath); other chunked
files are hashed in order as soon as the chunks before them are complete (reading back from
the page cache). Large files are worked on a few at a time, and each finished chunk is handed
to the kernel's writeback at once, so the fsync before a file counts as verified is short.
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

from storage_initializer import checksums, crcmath, writer
from storage_initializer.errors import InitializerError, IntegrityError, TransientError
from storage_initializer.progress import Progress
from storage_initializer.providers.base import RemoteFile, Source
from storage_initializer.settings import Settings
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
        self.workers = settings.workers or source.workers()
        self.ranged = source.supports_ranges
        self.results: dict[str, dict[str, str]] = {}
        self._results_lock = threading.Lock()
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
        done = self._resumable.get(file.path, set())
        if len(spans) > 1 and done and path.is_file() and path.stat().st_size == size:
            job.resumed = {span for span in spans if span in done}  # type: ignore[misc]
        if job.resumed:
            # One bookkeeping task replaces the chunks we keep (see _chunk with start < 0).
            job.remaining = len(spans) - len(job.resumed) + 1
            kept = sum(end - start for start, end in job.resumed)
            self.progress.reused_bytes(kept)
            log.info(
                "%s: resuming, %d of %d chunks already on disk",
                file.path,
                len(job.resumed),
                len(spans),
            )
        return job

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
        queue = self._tasks(jobs)
        in_flight: dict[Future[_FileJob | None], tuple[_FileJob, int, int | None]] = {}
        window = self.workers * 2
        with ThreadPoolExecutor(self.workers, thread_name_prefix="transfer") as pool:
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
                raise
            finally:
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
            if job.resumed:
                job.fd = os.open(job.path, os.O_RDWR)
                for start, end in job.resumed:
                    job.finished[start] = end
            else:
                self._guard_if_due()
                job.fd = os.open(job.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            job.hasher = checksums.new_hasher(job.algorithm)
            job.sha256 = self._new_sha256(job)
            job.hashed_to = 0
            if job.file.size and not job.inline_hash and not job.resumed:
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
            staging.record_chunk(job.file.path, start, end)
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
        offset = start
        attempt = 0
        source = self.source
        crc_update = job.crc_update if job.combined else None
        crc = 0  # this chunk's CRC so far (resumed along with ``offset`` after a failure)
        while True:
            try:
                sink = self.writer.open(job.fd, job.path, offset, job.file.size)
                try:
                    for block in source.read(job.file, offset, end):
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
                finally:
                    sink.close()  # what it buffered is written before any retry from offset
                expected_end = end if end is not None else job.file.size
                if expected_end is not None and offset < expected_end:
                    raise TransientError(
                        f"{job.file.path}: the connection closed after {offset} of "
                        f"{expected_end} bytes"
                    )
                if crc_update is not None:
                    job.crcs[start] = crc
                return
            except RETRYABLE as exc:
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
