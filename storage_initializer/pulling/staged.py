"""The holder's staging area, beyond transfers: files already staged (a dead owner's journal)
or already on the volume are reused rather than fetched, files fetched meanwhile by another
pull are linked, and a single archive is extracted in place."""

from __future__ import annotations

import logging
import os
import shutil
from typing import TYPE_CHECKING

from storage_initializer.archive import Limits, extract
from storage_initializer.changes import holds
from storage_initializer.settings import Settings
from storage_initializer.store import layout, reuse
from storage_initializer.store import marker as marker_io
from storage_initializer.store.fsutil import remove_tree
from storage_initializer.store.layout import EntryMode
from storage_initializer.uri import SourceUri

if TYPE_CHECKING:
    from storage_initializer.progress import Progress
    from storage_initializer.providers.base import RemoteFile
    from storage_initializer.store.staging import Staging

log = logging.getLogger("storage_initializer.pull")


def reuse_volume(
    entry: layout.Entry,
    uri: SourceUri,
    todo: list[RemoteFile],
    staging: Staging,
    progress: Progress,
    settings: Settings,
) -> list[RemoteFile]:
    """The files still to fetch once those the volume holds are in staging (store.reuse).
    Cache versions are always committed read-only, so they may share inodes."""
    may_link = settings.read_only or entry.mode == EntryMode.CACHE
    return reuse.from_volume(entry, uri.redacted, todo, staging, progress, may_link).todo


def dedupe_fetched(
    entry: layout.Entry,
    uri: SourceUri,
    fetched: list[RemoteFile],
    staging: Staging,
    settings: Settings,
) -> None:
    """Another pull may have committed a file we fetched meanwhile: link to it (store.reuse)."""
    may_link = settings.read_only or entry.mode == EntryMode.CACHE
    reuse.dedupe_fetched(entry, uri.redacted, fetched, staging, may_link)


def reuse_staged(files: list[RemoteFile], staging: Staging, progress: Progress) -> list[RemoteFile]:
    verified = staging.verified()
    todo = []
    for item in files:
        record = verified.get(item.path)
        ok = (
            record is not None  # holds() checks it too; said here for the type checker
            and holds(staging, item, record)
            and all(item.checksums.get(a, v) == v for a, v in record.checksums.items())
        )
        if ok:
            assert record is not None
            progress.reused(record.size)
        else:
            if record is not None:
                staging.forget(item.path)
            todo.append(item)
    return todo


def extract_single(staging: Staging, name: str, settings: Settings) -> list[marker_io.MarkerFile]:
    log.info("extracting %s", name)
    target = staging.dir / "extracted"
    if target.exists():
        remove_tree(target)
    extracted = extract(staging.data / name, target, Limits.from_settings(settings))
    old = staging.dir / "archive-data"
    os.rename(staging.data, old)
    os.rename(target, staging.data)
    shutil.rmtree(old, ignore_errors=True)
    return [marker_io.MarkerFile(e.path, e.size, {"sha256": e.sha256}) for e in extracted]
