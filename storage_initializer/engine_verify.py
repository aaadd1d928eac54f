"""Verifying a transfer: each file's checksum, computed in order or combined, then checked.

A file read in one stream was hashed as its bytes arrived; the chunks of other files are
hashed here in order as soon as the chunks before them are complete (read back from the page
cache), or, for a CRC, combined from each chunk's own CRC (crcmath). A finished file is checked
against its size and the source's checksum, fsynced and recorded in staging; a mismatch is
fetched once more, then reported. Split from engine.py; the engine inherits :class:`Verifier`.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from storage_initializer import checksums, crcmath
from storage_initializer.engine_plan import _FileJob
from storage_initializer.errors import IntegrityError
from storage_initializer.progress import Progress
from storage_initializer.settings import Settings
from storage_initializer.store.staging import Staging

log = logging.getLogger("storage_initializer.engine")  # the engine's log, as before

BLOCK = 1 << 20
#: Verification failures of one file that we retry from scratch before giving up.
INTEGRITY_ATTEMPTS = 2


class Verifier:
    """The engine's verifying half (a mixin of engine.Engine, which sets these attributes)."""

    settings: Settings
    progress: Progress
    results: dict[str, dict[str, str]]
    _results_lock: threading.Lock

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
