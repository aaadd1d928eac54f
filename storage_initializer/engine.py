"""The transfer engine: moves bytes from a source into staging, verified, with bounded memory.

Many files run in parallel and large files in concurrent ranged chunks on one bounded pool.
Each worker streams blocks straight to the file with ``pwrite`` (or, for a plain-http body,
lets the kernel splice it there: splice.py); memory is about ``workers × block``, whatever the
model's size. Checksums are computed while bytes arrive: a
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
import gc
import logging
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

from storage_initializer import checksums, resume, splice, stall, writer
from storage_initializer.engine_plan import Cancelled, Planner, _FileJob
from storage_initializer.engine_verify import INTEGRITY_ATTEMPTS, Verifier  # noqa: F401
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

RETRYABLE = (TransientError, ConnectionError, TimeoutError)
#: Least seconds between lease checks before new requests and files (Engine._guard_if_due).
GUARD_INTERVAL = 1.0


def backoff(attempt: int, retry_after: float | None) -> float:
    """Exponential backoff with full jitter; a server's Retry-After is a floor."""
    ceiling = min(30.0, 0.25 * (2**attempt))
    delay = random.uniform(ceiling / 2, ceiling)
    if retry_after is not None:
        delay = max(delay, min(retry_after, 120.0))
    return delay


class Engine(Planner, Verifier):
    """Runs a transfer: planning (engine_plan.py), fetching (here), verifying
    (engine_verify.py)."""

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
        self._made_dirs: set[Path] = set()
        #: The plan's tasks, taken by the workers themselves (see _work) under ``_more``.
        self._queue: Iterator[tuple[_FileJob, int, int | None]] = iter(())
        self._more = threading.Condition()
        self._busy = 0
        self._idle = 0
        self._stopping = False
        #: Cuts transfers that make too little progress, and cancels us at the deadline.
        self.stalls = stall.Guard(settings.stall_timeout, settings.min_rate, cancel)
        self.writer = writer.Writer(settings.write_size, settings.direct_io, settings.splice)

    # -- running ----------------------------------------------------------------------------

    def run(self, files: list[RemoteFile], staging: Staging) -> dict[str, dict[str, str]]:
        """Download ``files`` into ``staging``; returns path -> verified checksums."""
        # What exists now (imported modules, SDK clients: hundreds of thousands of objects)
        # lives as long as the process: out of the collector's sight, a collection during the
        # transfer costs what the transfer allocates, not the whole heap (5 % of a pull's CPU).
        gc.freeze()
        self._resumable = staging.chunks()
        jobs = [self._job(f, staging) for f in files]
        checkpoints = self._checkpoints = resume.Checkpointer(staging)
        self._queue = self._tasks(jobs)
        with self.stalls, _pool(self.workers) as pool:
            loops = [pool.submit(self._work, staging) for _ in range(self.workers)]
            try:
                done, _ = wait(loops, return_when=FIRST_EXCEPTION)
                failed = [e for e in (f.exception() for f in done) if e is not None]
                if failed:  # the failure itself, not the Cancelled of a worker it stopped
                    raise next((e for e in failed if not isinstance(e, Cancelled)), failed[0])
            except BaseException:
                self.cancel.set()
                # Workers stop at their next block; one stuck in a request to a stalled
                # server is not waited for (see _pool).
                wait(loops, timeout=STOP_GRACE)
                raise
            finally:
                checkpoints.close()  # journals the last progress: a failed pull resumes there
                for job in jobs:
                    if job.fd >= 0:
                        with contextlib.suppress(OSError):
                            os.close(job.fd)
        return self.results

    def _make_parent(self, path: Path) -> None:
        """Create ``path``'s directory once per run (a model of many small files in one
        directory would otherwise pay a ``mkdir`` per file)."""
        parent = path.parent
        if parent in self._made_dirs:
            return
        parent.mkdir(parents=True, exist_ok=True)
        self._made_dirs.add(parent)

    def _open(self, job: _FileJob) -> None:
        with job.lock:
            if job.fd >= 0:
                return
            self._make_parent(job.path)
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
                landing = sink.landing(offset)
                try:
                    with splice.offered(landing):
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
                            if type(block) is splice.Landed:  # already in the file
                                if block.offset != offset:
                                    raise AssertionError(
                                        f"{job.file.path}: {size} bytes landed at "
                                        f"{block.offset}, expected at {offset}"
                                    )
                                data = block.view if crc_update or job.inline_hash else b""
                                if block.spliced:
                                    self.progress.spliced(size)
                            else:
                                sink.write(block, offset)
                                data = block
                                if landing is not None:
                                    landing.offset = offset + size
                            if crc_update is not None:
                                crc = crc_update(data, crc)
                            elif job.inline_hash and job.hasher is not None:
                                job.hasher.update(data)
                                if job.sha256 is not None:
                                    job.sha256.update(data)
                                job.hashed_to = offset + size
                            offset += size
                            self.progress.transferred(size)
                            # Journal only what reached the kernel, never bytes the sink
                            # buffers.
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
                error = watch.explain(caught, job.file.path)
                if not isinstance(error, RETRYABLE):
                    raise
                attempt += 1
                if attempt > self.settings.retries:
                    message = (
                        error.describe() if isinstance(error, InitializerError) else str(error)
                    )
                    raise TransientError(
                        f"{job.file.path}: gave up after {attempt} attempts: {message}",
                        "The source kept failing; check its health or raise "
                        "STORAGE_INITIALIZER_RETRIES",
                    ) from error
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
                delay = backoff(attempt, getattr(error, "retry_after", None))
                log.info(
                    "retrying %s at byte %d in %.1fs (attempt %d/%d): %s",
                    job.file.path,
                    offset,
                    delay,
                    attempt + 1,
                    self.settings.retries + 1,
                    error,
                )
                if self.cancel.wait(delay):
                    raise Cancelled() from error

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
        if self._checkpoints is not None and self.ranged and job.journalled:
            self._checkpoints.note(job.path, job.file.path, start, offset)

    def _settle(self, job: _FileJob, start: int) -> None:
        """A chunk is complete: wait until its progress is journalled before the next one."""
        if self._checkpoints is not None and self.ranged and job.journalled:
            self._checkpoints.settle(job.file.path, start)


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
