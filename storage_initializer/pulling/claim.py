"""Waiting for, or claiming, an entry's lease (store.lease).

A file lock serialises replicas on one node cheaply; the lease decides between nodes. A waiter
logs the holder's progress and re-checks the marker; whoever claims the lease becomes the holder
(:mod:`.holder`). A stale or terminated holder is taken over.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock, Timeout

from storage_initializer import signals, stall
from storage_initializer.errors import LockTimeoutError
from storage_initializer.pulling.holder import as_holder
from storage_initializer.pulling.outcome import Result
from storage_initializer.pulling.published import EntryVanished, finish, found, published, valid
from storage_initializer.report import describe_progress
from storage_initializer.settings import Settings
from storage_initializer.store import layout
from storage_initializer.store.lease import Observer, Owner, current, try_claim
from storage_initializer.uri import SourceUri

if TYPE_CHECKING:
    from filelock import FileLock

    from storage_initializer.providers.base import Source

log = logging.getLogger("storage_initializer.pull")


def _try_flock(flock: FileLock, timeout: float) -> tuple[bool, bool]:
    """(held, usable). A filesystem without working flock leaves only the lease in charge."""
    try:
        flock.acquire(timeout=timeout, poll_interval=min(0.05, timeout))
        return True, True
    except Timeout:
        return False, True
    except (OSError, NotImplementedError) as exc:
        log.debug("file lock unavailable on this filesystem (%s); relying on the lease", exc)
        return False, False


def _describe_holder(data: dict[str, Any] | None) -> str:
    if not data:
        return "another replica"
    return f"{data.get('pod') or data.get('host')} (pid {data.get('pid')})"


def claim_or_wait(
    uri: SourceUri,
    entry: layout.Entry,
    dest: Path | None,
    settings: Settings,
    started: float,
    source_override: Source | None = None,
) -> Result:
    """Wait while another replica holds the entry's lease (logging its progress, re-checking
    the marker), or claim it and download as the holder (:func:`holder.as_holder`)."""
    layout.ensure_state_dir(entry)
    owner = Owner.this_process()
    observer = Observer(settings.stale_after)
    flock = FileLock(str(entry.lock), mode=0o666)
    flock_held, flock_usable = False, True
    # The fast path found no complete model: if one appears now, another replica made it.
    waited = not settings.revalidate
    holding, data = False, None  # (for the last line of a terminated waiter)
    free_since: float | None = None
    last_report = 0.0
    poll = settings.poll_interval
    try:
        while True:
            signals.check()  # a terminated prefetch's waiter threads stop here
            model, existing = published(entry)
            if valid(model, existing, settings) and not (settings.revalidate and not waited):
                assert existing is not None
                try:
                    finish(model, dest, existing, settings)
                except EntryVanished:
                    continue  # evicted or switched this instant: look again
                elapsed = time.monotonic() - started
                return found(
                    uri,
                    dest,
                    entry,
                    existing,
                    "waited" if waited else "complete",
                    elapsed,
                    phases={"wait": elapsed},
                )
            if not flock_held and flock_usable:
                flock_held, flock_usable = _try_flock(flock, poll)
            generation, data = current(entry)
            state = observer.classify(generation, data)
            now = time.monotonic()
            if state == "free" and not flock_held and flock_usable:
                # Someone local holds the flock and is about to lease, or its flock is stuck.
                free_since = free_since or now
                proceed = now - free_since > settings.stale_after
            else:
                free_since = None
                proceed = state == "stale" or (state == "free")
            if proceed:
                if state == "stale":
                    log.warning(
                        "the download lease of %s held by %s is stale; taking over",
                        entry.root,
                        _describe_holder(data),
                    )
                elif (data or {}).get("outcome") == "terminated":
                    log.info(
                        "%s was terminated while downloading %s; taking over",
                        _describe_holder(data),
                        uri.redacted,
                    )
                # gc may have removed the whole entry, state directory and all, while we
                # waited: claim in a fresh one (a download from scratch) rather than fail.
                layout.ensure_state_dir(entry)
                lease = try_claim(
                    entry, owner, generation, {"source": uri.redacted, "phase": "starting"}
                )
                if lease is not None:
                    holding = True
                    return as_holder(
                        uri,
                        entry,
                        dest,
                        settings,
                        started,
                        lease,
                        waited,
                        owner,
                        source_override,
                        took_over=state == "stale" or (data or {}).get("outcome") == "terminated",
                    )
                continue
            waited = True
            if now - last_report >= settings.progress_interval:
                last_report = now
                progress = describe_progress(data or {})
                log.info(
                    "waiting for %s to finish downloading %s: %s, phase %s",
                    _describe_holder(data),
                    uri.redacted,
                    progress,
                    (data or {}).get("phase", "?"),
                )
            stall.check_deadline()
            if settings.lock_timeout and now - started > settings.lock_timeout:
                raise LockTimeoutError(
                    f"gave up after {settings.lock_timeout:g}s waiting for "
                    f"{_describe_holder(data)} to finish downloading {uri.redacted}"
                )
            if flock_held or not flock_usable:
                time.sleep(poll)
    except signals.Terminated as exc:
        if not holding and not exc.detail:
            exc.detail = (
                f"while waiting for {_describe_holder(data)} to download {uri.redacted}; "
                "this pod fetched nothing of it"
            )
        raise
    finally:
        if flock_held:
            with contextlib.suppress(Exception):
                flock.release()
