"""The lease holder: runs the download (:mod:`.pipeline`) under a heartbeat, then releases
the lease with its outcome. On failure it decides what stays for the next owner (a termination
or a lost lease keeps the staged files) and says why in the exception it raises."""

from __future__ import annotations

import contextlib
import errno
import time
from pathlib import Path
from typing import TYPE_CHECKING

from storage_initializer.errors import LeaseLostError, TransientError
from storage_initializer.progress import Progress
from storage_initializer.pulling.outcome import (
    Result,
    attach_stats,
    holder_failure_stats,
    phase_seconds,
    terminated,
)
from storage_initializer.pulling.pipeline import Job, download
from storage_initializer.settings import Settings
from storage_initializer.store import layout
from storage_initializer.store.tidy import forget_empty_entry
from storage_initializer.uri import SourceUri

if TYPE_CHECKING:
    from storage_initializer.providers.base import Source
    from storage_initializer.store.lease import Lease, Owner


def as_holder(
    uri: SourceUri,
    entry: layout.Entry,
    dest: Path | None,
    settings: Settings,
    started: float,
    lease: Lease,
    waited: bool,
    owner: Owner,
    source_override: Source | None = None,
    took_over: bool = False,
) -> Result:
    progress = Progress()
    lease.start_heartbeat(settings.heartbeat_interval, progress.snapshot)
    outcome = "failed"
    job = Job(uri, entry, dest, settings, lease, progress, owner)
    claimed = time.monotonic()
    try:
        result = download(job, source_override)
        outcome = result.outcome
        result.seconds = time.monotonic() - started
        result.phases = phase_seconds(claimed - started, progress)
        result.retries = progress.retries
        result.verify_failures = progress.verify_failures
        result.bytes_spliced = progress.bytes_spliced
        result.takeovers = int(took_over)
        if waited and result.outcome == "complete":
            result.outcome = "waited"
        return result
    except BaseException as exc:
        where = progress.snapshot()  # before holder_failure_stats books the phase as "failed"
        stats = holder_failure_stats(progress, claimed - started, took_over)
        attach_stats(exc, stats)
        ended = terminated(exc, uri, where, stats)
        if ended is not None:
            # SIGTERM/SIGINT: the staging journal stays for the next owner, and the lease is
            # released as "terminated" (below) so that a waiter takes over at once.
            outcome = "terminated"
            if ended is exc:
                raise
            raise ended from exc
        lost = lease.lost.is_set() or not _still_held(lease)
        keep = isinstance(exc, TransientError | KeyboardInterrupt) or lost
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            keep = False
        # Full while committing: every file is verified, keep them for the next run.
        keep = keep or getattr(exc, "keep_staging", False)
        staging = job.staging
        if staging is not None and not keep:
            with contextlib.suppress(OSError):
                staging.discard()
        if lost and not isinstance(exc, LeaseLostError | KeyboardInterrupt):
            # Whatever broke (the engine cancelled, a journal whose directory the new owner
            # adopted), the cause is the takeover: say so in the last log line.
            lease.mark_lost()
            lost_error = LeaseLostError(
                f"lost the download lease of {entry.root} to another replica while "
                f"downloading {uri.redacted}; stopped without committing"
            )
            attach_stats(lost_error, stats)
            raise lost_error from exc
        raise
    finally:
        lease.release(outcome)
        if outcome == "failed":  # a first pull that got nothing leaves no state
            with contextlib.suppress(OSError):
                forget_empty_entry(entry, lease.path)


def _still_held(lease: Lease) -> bool:
    try:
        return lease.still_held()
    except OSError:
        return True  # cannot tell: do not claim a takeover we did not see
