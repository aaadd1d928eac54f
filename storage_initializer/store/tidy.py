"""After a failed first pull that downloaded nothing: no state left behind.

A first pull of a source that does not exist (a 404, a typo in the bucket) creates the state
directory, a lock and a lease before the listing fails. Left there, they make ``status`` report
the destination "incomplete", as if a download had started and died, and send an operator
looking for a partial model that never existed. When the entry holds nothing else — no model
file, no marker, no version, no staged byte, no lease but ours — the holder removes what it
created. Anything more, and the state stays: it is then worth resuming or reporting.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from storage_initializer.store.layout import LOCK_NAME, STAGING_NAME, Entry, EntryMode

log = logging.getLogger(__name__)


def forget_empty_entry(entry: Entry, our_lease: Path) -> bool:
    """Remove ``entry``'s state when this failed pull is all it ever held; True if removed.

    Called after the lease is released. Only our own lease file is deleted and directories
    are removed with ``rmdir`` (which fails on anything another replica put there meanwhile),
    so a replica that claims the entry at this instant keeps its lease."""
    if entry.mode == EntryMode.VERSION or _holds_a_model(entry):
        return False
    try:
        names = set(os.listdir(entry.state))
    except OSError:
        return False
    if not names <= {LOCK_NAME, STAGING_NAME, our_lease.name}:
        return False
    if STAGING_NAME in names and _has_content(entry.staging_root):
        return False
    with contextlib.suppress(OSError):
        for name in sorted(names - {STAGING_NAME}):
            os.unlink(entry.state / name)
        if STAGING_NAME in names:
            for area in os.listdir(entry.staging_root):
                os.rmdir(entry.staging_root / area)
            os.rmdir(entry.staging_root)
        os.rmdir(entry.state)
        if entry.mode == EntryMode.CACHE:
            os.rmdir(entry.root)
        log.info("nothing was downloaded: removed the state this pull created in %s", entry.root)
        return True
    return False


def _holds_a_model(entry: Entry) -> bool:
    if entry.mode == EntryMode.CACHE:
        return bool(entry.versions()) or os.path.lexists(entry.current_link)
    return bool([name for name in entry.model_items() if name != "lost+found"])


def _has_content(staging_root: Path) -> bool:
    """Whether any staging area holds a file (empty area directories do not count)."""
    try:
        areas = os.listdir(staging_root)
    except OSError:
        return True
    for area in areas:
        path = staging_root / area
        if path.is_symlink() or not path.is_dir():
            return True
        with contextlib.suppress(OSError):
            if os.listdir(path):
                return True
    return False
