"""Symbolic links planted in an entry's state: removed (the link, never its target) on sight.

The state directory is group-writable by design (replicas of other UIDs of the pod's group must
lock and lease), so the model server can write there, while the init container may run with
more privilege and cloud credentials. storage-initializer itself never makes a link in its state
directory (only ``<cache>/<key>/current``, a bare version name), so a link there is corruption:
a linked ``lock`` would be opened and truncated, a linked ``staging`` would have another
directory's contents adopted and deleted. Every holder and ``verify --repair`` calls
:func:`remove_planted_links` before it opens anything there.

This is a first line; each reader also opens its file with ``O_NOFOLLOW`` (a link planted after
this sweep is refused, not followed).
"""

from __future__ import annotations

import logging
import os

from storage_initializer.store.fsutil import unlink_planted_link
from storage_initializer.store.layout import (
    COMMIT_JOURNAL,
    LOCK_NAME,
    MARKER_NAME,
    STAGING_NAME,
    VERSION_RE,
    Entry,
    EntryMode,
)

log = logging.getLogger(__name__)

#: Names in the state directory that are ours and never links (leases are checked by
#: store/lease.py).
STATE_FILES = (LOCK_NAME, MARKER_NAME, COMMIT_JOURNAL, STAGING_NAME, "access.log", "link.json")


def remove_planted_links(entry: Entry) -> None:
    """Unlink every symbolic link where ``entry`` keeps state: the state directory itself,
    its files, the staging areas, and in cache mode version directories and a ``current``
    that leads anywhere but to a version directory beside it."""
    unlink_planted_link(entry.state, "the state directory")
    for name in STATE_FILES:
        unlink_planted_link(entry.state / name, "the state file")
    try:
        owners = os.listdir(entry.staging_root)
    except OSError:
        owners = []
    for owner in owners:
        unlink_planted_link(entry.staging_root / owner, "the staging area")
    if entry.mode == EntryMode.CACHE:
        _check_versions(entry)


def _check_versions(entry: Entry) -> None:
    try:
        names = os.listdir(entry.root)
    except OSError:
        return
    for name in names:
        if VERSION_RE.match(name):
            unlink_planted_link(entry.root / name, "the version directory")
            unlink_planted_link(entry.version(name).state, "the state directory")
            unlink_planted_link(entry.version(name).marker, "the marker")
    try:
        target = os.readlink(entry.current_link)
    except OSError:
        return
    if not VERSION_RE.match(target):
        unlink_planted_link(entry.current_link, "the version pointer", "not a version beside it")
