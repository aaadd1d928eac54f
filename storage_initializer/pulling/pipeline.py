"""The lease holder's download, one function per step:
list → select → plan → transfer → extract → commit (:func:`download` runs them in order).

Everything a step needs is in the :class:`Job` or passed in; nothing travels through globals.
"""

from __future__ import annotations

import errno
import logging
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from storage_initializer import (
    __version__,
    changes,
    diskspace,
    signals,
    stall,
    storage_config,
    tls,
)
from storage_initializer.archive import is_archive
from storage_initializer.engine import Engine
from storage_initializer.errors import DestinationError, NotFoundError, UsageError
from storage_initializer.paths import safe_relpath, selected
from storage_initializer.providers import open_source
from storage_initializer.pulling.outcome import Result
from storage_initializer.pulling.published import finish, found, published, signed, valid
from storage_initializer.pulling.staged import (
    dedupe_fetched,
    extract_single,
    reuse_staged,
    reuse_volume,
)
from storage_initializer.report import ProgressReporter, human_bytes
from storage_initializer.settings import Settings
from storage_initializer.signing import always_selected, check_staged
from storage_initializer.store import commit as store
from storage_initializer.store import layout
from storage_initializer.store import marker as marker_io
from storage_initializer.store.commit import (
    describe_foreign,
    find_version,
    is_ours,
    recover_interrupted,
    switch_current,
)
from storage_initializer.store.layout import EntryMode
from storage_initializer.store.staging import Staging
from storage_initializer.uri import SourceUri

if TYPE_CHECKING:
    from storage_initializer.progress import Progress
    from storage_initializer.providers.base import Listing, RemoteFile, Source
    from storage_initializer.store.lease import Lease, Owner
    from storage_initializer.store.staging import Staging

log = logging.getLogger("storage_initializer.pull")

#: The state after a transfer: the listing, the files selected from it, the files fetched,
#: and the checksums of every staged file (changes.transfer).
Transferred = tuple["Listing", list["RemoteFile"], list["RemoteFile"], dict[str, dict[str, str]]]


@dataclass
class Job:
    """One holder's download. ``staging`` is set by :func:`plan` once the staging area exists:
    the holder discards it when the pull fails for good."""

    uri: SourceUri
    entry: layout.Entry
    dest: Path | None
    settings: Settings
    lease: Lease
    progress: Progress
    owner: Owner
    staging: Staging | None = None


@dataclass
class Plan:
    """What :func:`plan` decided: the staging area, the files still to fetch, the total size
    and the checksums of the files already staged."""

    staging: Staging
    todo: list[RemoteFile]
    total: int
    results: dict[str, dict[str, str]]


def download(job: Job, source_override: Source | None = None) -> Result:
    """The whole download as the holder. ``source_override`` (tiered caches): read from this
    source instead of the URI's own provider."""
    model, existing = published(job.entry)
    if valid(model, existing, job.settings) and not job.settings.revalidate:
        assert existing is not None
        finish(model, job.dest, existing, job.settings)
        return found(job.uri, job.dest, job.entry, existing, "complete", 0.0)
    if source_override is None:
        storage_config.apply()
        tls.configure_process()
    source = source_override or open_source(job.uri, job.settings)
    try:
        listing = list_source(job, source)
        files = select(job.uri, listing.files, job.settings)
        ready = already_there(job, model, existing, listing)
        if ready is not None:
            return ready
        planned = plan(job, source, listing, files)
        listing, files, todo, results = transfer(job, source, planned, (listing, files))
    finally:
        source.close()
    final = extract(job, source, planned.staging, files, todo, results)
    return commit(job, planned.staging, listing, files, todo, final)


def list_source(job: Job, source: Source) -> Listing:
    job.progress.set_phase("listing")
    job.lease.update(phase="listing")
    log.info("listing %s", job.uri.redacted)
    return watched_listing(job, source)


def watched_listing(job: Job, source: Source) -> Listing:
    """``source.list()``, cut and failed as a stall when its server trickles (stall.listing)."""
    settings = job.settings
    what = f"{job.uri.redacted}: listing"
    return stall.listing(settings.stall_timeout, settings.min_rate, what, source.list)


def select(uri: SourceUri, files: list[RemoteFile], settings: Settings) -> list[RemoteFile]:
    chosen: list[RemoteFile] = []
    seen: dict[str, str] = {}
    for item in files:
        path = safe_relpath(item.path, "file")
        if not selected(path, settings.include, settings.exclude) and not (
            settings.require_signature and _always_selected(path, settings)
        ):
            continue
        if path.lower() in seen:
            raise UsageError(
                f"{uri.redacted} holds two files that map to {path!r}",
                "Rename one of them at the source",
            )
        seen[path.lower()] = path
        chosen.append(replace(item, path=path) if path != item.path else item)
    dirs = {p.rsplit("/", 1)[0] for p in seen.values() if "/" in p}
    prefixes = {d.split("/")[0] for d in dirs} | {d for d in dirs}
    clash = [p for p in seen.values() if p in prefixes]
    if clash:
        raise UsageError(f"{uri.redacted}: {clash[0]!r} is both a file and a directory")
    if not chosen:
        filters = ""
        if settings.include or settings.exclude:
            filters = (
                f" after the filters include={list(settings.include)}"
                f" exclude={list(settings.exclude)}"
            )
        raise NotFoundError(f"nothing to download from {uri.redacted}{filters}")
    return chosen


def _always_selected(path: str, settings: Settings) -> bool:
    return always_selected(path, settings)


def already_there(
    job: Job, model: layout.Entry, existing: marker_io.Marker | None, listing: Listing
) -> Result | None:
    """The listed version is already complete on the volume (unchanged since it was
    downloaded, or a complete cache version to switch to): its result, with nothing fetched.
    Otherwise None, once a direct destination is known to be ours to write."""
    uri, entry, dest, settings = job.uri, job.entry, job.dest, job.settings
    if (
        settings.revalidate
        and valid(model, existing, settings)
        and existing is not None
        and existing.fingerprint == listing.fingerprint
    ):
        log.info("%s has not changed since it was downloaded", uri.redacted)
        finish(model, dest, existing, settings)
        return found(uri, dest, entry, existing, "complete", 0.0)
    if entry.mode == EntryMode.CACHE:
        ready = find_version(entry, listing.fingerprint)
        if ready is not None and settings.require_signature:
            ready = ready if signed(marker_io.read(entry.version(ready)), settings) else None
        if ready is not None:
            # Published by an owner that died before switching, or an earlier version
            # the source went back to: switch without downloading.
            job.lease.ensure_held()
            switch_current(entry, ready)
            version = entry.version(ready)
            complete = marker_io.read(version)
            assert complete is not None
            log.info("%s: switching to the complete version %s", uri.redacted, ready)
            finish(version, dest, complete, settings)
            return found(uri, dest, entry, complete, "complete", 0.0)
    else:
        _check_destination(uri, entry, existing, settings)
    return None


def _check_destination(
    uri: SourceUri, entry: layout.Entry, existing: marker_io.Marker | None, settings: Settings
) -> None:
    names = [n for n in entry.model_items() if n != "lost+found"]
    if not names or settings.replace:
        return
    if existing is not None and existing.key != entry.key:
        raise DestinationError(
            f"{entry.root} holds a model from {existing.source}, not {uri.redacted}",
            "Use another destination, or pass --replace (STORAGE_INITIALIZER_REPLACE=true) to "
            "replace it",
        )
    if not is_ours(entry, names, existing):
        raise DestinationError(
            describe_foreign(entry, names),
            "Use an empty destination, or pass --replace (STORAGE_INITIALIZER_REPLACE=true)",
        )


def plan(job: Job, source: Source, listing: Listing, files: list[RemoteFile]) -> Plan:
    """Prepare the staging area (resuming a dead owner's), reuse what is staged or on the
    volume, and check that what is left fits."""
    uri, entry, settings, progress = job.uri, job.entry, job.settings, job.progress
    total = sum(f.size or 0 for f in files)
    progress.set_totals(len(files), total)
    staging = job.staging = Staging.prepare(entry, job.owner.id, entry.key, listing.fingerprint)
    if entry.mode == EntryMode.DIRECT:
        recover_interrupted(entry, staging)
    todo = reuse_staged(files, staging, progress)
    # Same content already on the volume (any version, entry or DEST): link, not fetch.
    todo = reuse_volume(entry, uri, todo, staging, progress, settings)
    single_archive = len(files) == 1 and is_archive(files[0].path) and source.extract_single_archive
    needed = sum(f.size or 0 for f in todo)
    diskspace.check(staging.data, needed, single_archive, dest=entry.root)
    if settings.max_size:
        diskspace.check_quota(total, settings.max_size)
    results = {r.path: r.checksums for r in staging.verified().values()}
    log.info(
        "downloading %s: %d files, %s%s",
        uri.redacted,
        len(files),
        _human(total),
        f" ({len(files) - len(todo)} already staged)" if len(todo) < len(files) else "",
    )
    return Plan(staging, todo, total, results)


def transfer(
    job: Job,
    source: Source,
    planned: Plan,
    selection: tuple[Listing, list[RemoteFile]],
) -> Transferred:
    """Fetch what the plan left to fetch into staging, following a source that changes."""
    uri, entry, settings, progress, lease = (
        job.uri,
        job.entry,
        job.settings,
        job.progress,
        job.lease,
    )
    staging, todo, total, results = planned.staging, planned.todo, planned.total, planned.results
    listing, files = selection
    progress.set_phase("transfer")
    lease.update(phase="transfer")
    with ProgressReporter(uri.redacted, settings.progress_interval, progress.snapshot):
        try:
            # A source that changes meanwhile is followed, never stitched (changes.py).
            return changes.transfer(
                uri.redacted,
                lambda: watched_listing(job, source),
                lambda batch: Engine(
                    source, settings, progress, cancel_on_loss(lease), lease.ensure_held
                ).run(batch, staging),
                lambda listed: select(uri, listed, settings),
                progress,
                staging,
                (listing, files, todo, results),
            )
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            sized = all(f.size is not None for f in files)
            raise diskspace.describe_enospc(
                exc, entry.root, total if sized else None, staging.dir
            ) from None


def cancel_on_loss(lease: Lease) -> threading.Event:
    """The engine stops when the lease is lost; its own failures must not look like a loss."""
    cancel = signals.cancel_event()  # set by SIGTERM/SIGINT too: one way to stop the engine
    lease.on_lost(cancel.set)  # at once if it is lost already
    return cancel


def extract(
    job: Job,
    source: Source,
    staging: Staging,
    files: list[RemoteFile],
    todo: list[RemoteFile],
    results: dict[str, dict[str, str]],
) -> list[marker_io.MarkerFile]:
    """The files the marker will list: the staged files (fetched ones linked to identical
    committed files), or what a single archive expands to."""
    uri, entry, settings = job.uri, job.entry, job.settings
    dedupe_fetched(entry, uri, todo, staging, settings)
    final = [
        marker_io.MarkerFile(
            f.path,
            int(f.size if f.size is not None else (staging.data / f.path).stat().st_size),
            dict(results[f.path]),
        )
        for f in files
    ]
    if len(files) == 1 and is_archive(files[0].path) and source.extract_single_archive:
        job.progress.set_phase("extract")
        job.lease.update(phase="extract")
        try:
            final = extract_single(staging, files[0].path, settings)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            # How far the archive would have expanded is unknown: say what was written.
            raise diskspace.describe_enospc(exc, entry.root, None, staging.dir) from None
        if settings.max_size:
            extracted = sum(f.size for f in final)
            diskspace.check_quota(extracted, settings.max_size)
    return final


def commit(
    job: Job,
    staging: Staging,
    listing: Listing,
    files: list[RemoteFile],
    todo: list[RemoteFile],
    final: list[marker_io.MarkerFile],
) -> Result:
    """Verify the signature if required, then publish: files first, the marker last."""
    uri, entry, dest, settings = job.uri, job.entry, job.dest, job.settings
    progress, lease, owner = job.progress, job.lease, job.owner
    signature = None
    if settings.require_signature:  # verified before anything is published (signing.py)
        progress.set_phase("verify")
        lease.update(phase="signature")
        signature = check_staged(uri.redacted, staging.data, final, settings)
    progress.set_phase("commit")
    lease.update(phase="commit")
    lease.ensure_held()
    new_marker = marker_io.Marker(
        key=entry.key,
        source=uri.redacted,
        fingerprint=listing.fingerprint,
        files=final,
        include=list(settings.include),
        exclude=list(settings.exclude),
        downloaded_by={"host": owner.host, "pod": owner.pod, "pid": owner.pid},
        read_only=settings.read_only or entry.mode == EntryMode.CACHE,
        tool_version=__version__,
        signature=signature,
    )
    try:
        if entry.mode == EntryMode.CACHE:
            # A cache version is shared by every pod and other entries' links: always
            # read-only; a --writable pod gets private copies of it (published.finish).
            name = store.commit_version(entry, staging, new_marker, lease, True)
        else:
            store.commit(entry, staging, new_marker, lease, settings.read_only, remove_others=True)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise diskspace.full_at_commit(exc, entry.root, len(final)) from None
    if entry.mode == EntryMode.CACHE:
        finish(entry.version(name), dest, new_marker, settings)
    progress.set_phase("done")
    snap = progress.snapshot()
    log.info("committed %s into %s", uri.redacted, entry.root)
    return Result(
        uri.redacted,
        str(dest or entry.root),
        "downloaded",
        snap["bytes_from_origin"],
        snap["bytes_reused"],
        len(final),
        0.0,
        entry.key,
        listing.fingerprint,
        files_fetched=len(todo),
        files_reused=len(files) - len(todo),
    )


def _human(count: int) -> str:
    return human_bytes(count)
