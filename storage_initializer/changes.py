"""A source that changes while it is pulled: discard, list again, fetch the new version whole.

A model re-uploaded during a rollout must never be committed as a file made of two versions:
its marker would say complete and ``verify`` would pass it, since for most objects we compute
the checksum ourselves. Every provider therefore pins each read, resumed ones included, to the
version of the listing (S3 ``If-Match``/``VersionId``, HTTP ``If-Match``/``If-Unmodified-Since``,
GCS generation, Azure ``If-Match``) and raises :class:`SourceChangedError` when the source no
longer has it; the engine never retries such a read.

The pull then comes here: it lists the source again, and every file whose size or version
changed (or vanished), and the one whose read failed, loses what staging holds of it (its bytes,
its verified record and its finished chunks). Only then is the staging area labelled with the
new listing's fingerprint, so that a replica adopting it after a crash finds bytes of the
versions it lists and nothing else. The files still missing are fetched, each pinned to its new
version. After :data:`MAX_CHANGES` such changes the pull gives up, naming the file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable

from storage_initializer.errors import RangesIgnoredError, SourceChangedError
from storage_initializer.progress import Progress
from storage_initializer.providers.base import Listing, RemoteFile
from storage_initializer.store import staging as staging_mod
from storage_initializer.store.fsutil import read_state_text
from storage_initializer.store.marker import write_atomic
from storage_initializer.store.staging import Staging

log = logging.getLogger(__name__)

#: Changes of the source during one pull that we follow before giving up.
MAX_CHANGES = 3


def transfer(
    where: str,
    list_source: Callable[[], Listing],
    run: Callable[[list[RemoteFile]], dict[str, dict[str, str]]],
    select: Callable[[list[RemoteFile]], list[RemoteFile]],
    progress: Progress,
    staging: Staging,
    state: tuple[Listing, list[RemoteFile], list[RemoteFile], dict[str, dict[str, str]]],
) -> tuple[Listing, list[RemoteFile], list[RemoteFile], dict[str, dict[str, str]]]:
    """Fetch the files still to fetch with ``run`` (an engine run into ``staging``), following
    the source when it changes meanwhile. ``state`` and the result: the listing the staged
    files belong to, the files selected from it, the files fetched (to fetch, in ``state``)
    and the checksums of every staged file."""
    listing, files, todo, results = state
    fetched = {f.path for f in todo}
    key = staging.entry.key
    changes = 0
    while True:
        try:
            results.update(run(todo))
        except RangesIgnoredError as exc:
            # Not a change: the source now reads files in one stream, so this cannot recur.
            discard(staging, {exc.path} if exc.path else {f.path for f in todo})
            todo = remaining(files, staging)
            results = verified_checksums(files, staging)
            continue
        except SourceChangedError as exc:
            changes += 1
            listing, files = relist(where, list_source, select, files, staging, key, exc, changes)
            todo = remaining(files, staging)
            fetched |= {f.path for f in todo}
            results = verified_checksums(files, staging)
            progress.set_totals(len(files), sum(f.size or 0 for f in files))
            continue
        return listing, files, [f for f in files if f.path in fetched], results


def relist(
    where: str,
    list_source: Callable[[], Listing],
    select: Callable[[list[RemoteFile]], list[RemoteFile]],
    before: list[RemoteFile],
    staging: Staging,
    key: str,
    error: SourceChangedError,
    changes: int,
) -> tuple[Listing, list[RemoteFile]]:
    """The source's new listing (and the files selected from it), once staging holds nothing
    of a version that is not in it. ``changes``: how many changes this pull has seen."""
    name = error.path or "a file"
    if changes > MAX_CHANGES:
        raise SourceChangedError(
            f"{where}: {name} changed {changes} times while it was downloading; gave up "
            "(nothing was committed)"
        )
    log.warning(
        "%s: %s changed at the source during the download; discarding what was fetched of "
        "it and listing again (change %d of at most %d)",
        where,
        name,
        changes,
        MAX_CHANGES,
    )
    listing = list_source()
    files = select(listing.files)
    stale = changed_paths(before, files)
    if error.path:
        stale.add(error.path)
    discard(staging, stale)
    relabel(staging, key, listing.fingerprint)
    return listing, files


def changed_paths(before: list[RemoteFile], after: list[RemoteFile]) -> set[str]:
    """Paths of ``before`` whose size or version differs in ``after``, or that are gone."""
    now = {f.path: (f.size, f.version) for f in after}
    return {f.path for f in before if now.get(f.path) != (f.size, f.version)}


def discard(staging: Staging, paths: set[str]) -> None:
    """Forget every staged byte of ``paths``: the data, the verified record, the chunks."""
    for path in sorted(paths):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging.data / path)
        if path in staging.verified():
            staging.forget(path)
    journal = staging.dir / staging_mod.CHUNKS
    try:
        text = read_state_text(journal)
    except FileNotFoundError:
        return
    kept = []
    for line in text.splitlines(keepends=True):
        try:
            data = json.loads(line)
        except ValueError:
            continue  # a torn line: dropped with the rest of what it may have described
        if not (isinstance(data, dict) and data.get("path") in paths):
            kept.append(line if line.endswith("\n") else line + "\n")
    write_atomic(journal, "".join(kept))


def relabel(staging: Staging, key: str, fingerprint: str) -> None:
    """Record that the staging area now holds bytes of the listing ``fingerprint`` only."""
    meta = {"key": key, "fingerprint": fingerprint}
    write_atomic(staging.dir / staging_mod.META, json.dumps(meta))


def remaining(files: list[RemoteFile], staging: Staging) -> list[RemoteFile]:
    """The files of ``files`` that staging does not hold verified."""
    verified = staging.verified()
    return [item for item in files if not holds(staging, item, verified.get(item.path))]


def holds(staging: Staging, item: RemoteFile, record: staging_mod.VerifiedRecord | None) -> bool:
    """Whether staging holds ``item`` as verified: a record of the listed size whose staged
    file still has that size."""
    return (
        record is not None
        and (item.size is None or record.size == item.size)
        and staging.staged_size(item.path) == record.size
    )


def verified_checksums(files: list[RemoteFile], staging: Staging) -> dict[str, dict[str, str]]:
    """Path -> checksums of the files of ``files`` that staging holds verified."""
    wanted = {f.path for f in files}
    return {r.path: r.checksums for r in staging.verified().values() if r.path in wanted}
