"""One pull: source URI → destination directory, downloaded at most once per shared volume.

1. Fast path, no lock, no cloud SDK import: a valid marker for this source → done.
2. Otherwise wait for, or claim, the entry's lease (store.lease). Waiters log the holder's
   progress and re-check the marker.
3. The holder lists the source, downloads into private staging (resuming a dead owner's),
   extracts a single archive, verifies, commits (marker last) and releases the lease.
4. In cache mode the destination is then populated from the entry (store.links).
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from storage_initializer import __version__, stall
from storage_initializer.errors import (
    DestinationError,
    InitializerError,
    LeaseLostError,
    LockTimeoutError,
    NotFoundError,
    TransientError,
    UsageError,
)
from storage_initializer.paths import safe_relpath, selected
from storage_initializer.settings import Settings
from storage_initializer.store import layout
from storage_initializer.store import marker as marker_io
from storage_initializer.uri import SourceUri, parse

if TYPE_CHECKING:
    from storage_initializer.providers.base import RemoteFile
    from storage_initializer.store.lease import Lease, Owner

log = logging.getLogger(__name__)

#: Tiered caches: while set, the holder reads from this source (a slower tier's copy) instead
#: of the URI's own provider; everything else — key, lease, marker — stays the URI's.
SOURCE_OVERRIDE: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "storage_initializer_source_override", default=None
)


@dataclass
class Result:
    source: str
    dest: str
    outcome: str
    bytes_from_origin: int = 0
    bytes_reused: int = 0
    files: int = 0
    seconds: float = 0.0
    key: str = ""
    fingerprint: str = ""
    #: Seconds by phase (metrics): wait, list, transfer, verify, extract, commit.
    phases: dict[str, float] | None = None
    retries: int = 0
    takeovers: int = 0
    verify_failures: int = 0
    #: Files fetched from the origin, and files reused from the volume or a staging area.
    files_fetched: int = 0
    files_reused: int = 0

    def fields(self) -> dict[str, Any]:
        return dict(self.__dict__)


def entry_for(uri: SourceUri, dest: Path, settings: Settings) -> layout.Entry:
    key = uri.key(settings.include, settings.exclude)
    if settings.cache_dirs:
        return layout.cached(Path(settings.cache_dirs[0]).absolute(), key)
    return layout.direct(dest, key)


def _prepare_dir(path: Path, what: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DestinationError(
            f"cannot create the {what} {path}: {exc.strerror}",
            "Check that the volume is mounted and writable by this UID",
        ) from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise DestinationError(
            f"the {what} {path} is not writable by UID {os.getuid()}",
            "Mount it writable, or set the pod's fsGroup so this UID may write",
        )


def _valid(
    entry: layout.Entry, marker: marker_io.Marker | None, settings: Settings | None = None
) -> bool:
    if marker is None or marker.key != entry.key or marker_io.problems(entry, marker):
        return False
    # --require-signature: a model verified under this trust, never one pulled unsigned.
    return settings is None or not settings.require_signature or _signed(marker, settings)


def _always_selected(path: str, settings: Settings) -> bool:
    from storage_initializer.signing import always_selected

    return always_selected(path, settings)


def _signed(marker: marker_io.Marker | None, settings: Settings) -> bool:
    from storage_initializer.signing import accepts

    return accepts(marker, settings)


def _published(entry: layout.Entry) -> tuple[layout.Entry, marker_io.Marker | None]:
    """The directory readers get (:meth:`layout.Entry.published`) and its marker; none for a
    cache entry with no version yet."""
    model = entry.published()
    if model.mode == "cache":
        return entry, None
    return model, marker_io.read(model)


def _found(
    uri: SourceUri,
    dest: Path | None,
    entry: layout.Entry,
    marker: marker_io.Marker,
    outcome: str,
    seconds: float,
    phases: dict[str, float] | None = None,
) -> Result:
    """The result of a pull that found the model in place (nothing from the origin)."""
    return Result(
        uri.redacted,
        str(dest or entry.root),
        outcome,
        0,
        marker.total_size,
        len(marker.files),
        seconds,
        entry.key,
        marker.fingerprint,
        phases=phases,
        files_reused=len(marker.files),
    )


def _finish(
    entry: layout.Entry, dest: Path | None, marker: marker_io.Marker, settings: Settings
) -> None:
    """Cache mode: link DEST to the concrete version directory ``entry`` (never through
    ``current``), so a later version switch leaves this pod's model untouched.

    The use is recorded *before* linking and ``current`` read again after it: gc hides
    ``current`` before it reads the access log a last time, so either gc sees this use and
    keeps the entry, or this pull sees the entry going (:class:`EntryVanished`) and looks
    again, instead of linking files that are being removed."""
    if entry.mode == "version":
        from storage_initializer.store import access

        keyed = layout.Entry(entry.root.parent, entry.key, "cache")
        access.record(keyed, "use")
        if keyed.current_version() != entry.root.name:
            raise EntryVanished(f"{keyed.root}: the version {entry.root.name} is not current now")
    if entry.mode == "version" and dest is not None:
        from storage_initializer.store import links
        from storage_initializer.store.commit import top_level

        _prepare_dir(dest, "destination")
        links.populate(
            entry,
            dest,
            top_level([f.path for f in marker.files]),
            settings.link_mode,
            settings.replace,
            private=not settings.read_only,
        )


class EntryVanished(TransientError):
    """The cache entry stopped being current between our look at it and the record of our use
    (gc evicted it, or a new version was switched in): look again."""


def pull(source: str, dest: str | Path | None, settings: Settings) -> Result:
    """Materialise ``source`` in ``dest``. ``dest=None`` (cache mode only) fills the cache and
    links nothing: how ``prefetch`` seeds a cache."""
    started = time.monotonic()
    uri = parse(source)
    if dest is None:
        if not settings.cache_dirs:
            raise UsageError(f"{uri.redacted}: no destination and no cache directory")
        if uri.kind in ("model-mount", "pvc"):
            raise UsageError(f"{uri.redacted} is already on a volume: nothing to cache")
    if len(settings.cache_dirs) > 1 and uri.kind not in ("model-mount", "pvc"):
        from storage_initializer.cache.tiers import pull_tiered

        return pull_tiered(uri, None if dest is None else Path(dest).absolute(), settings)
    result = _pull_one(uri, None if dest is None else Path(dest).absolute(), settings, started)
    if result.key:
        _after(uri, result, settings)
    return result


def _after(uri: SourceUri, result: Result, settings: Settings) -> None:
    """Bookkeeping of a successful pull: the access record, and the cache's size limit."""
    from storage_initializer.store import access

    entry = entry_for(uri, Path(result.dest), settings)
    if entry.mode != "cache":  # cache mode recorded the use before linking (_finish)
        access.record(entry, result.outcome)
    if settings.cache_dirs and settings.cache_max_size:
        from storage_initializer.cache import eviction as gc

        limits = gc.Policy(
            max_size=settings.cache_max_size,
            policy=settings.cache_policy,
            stale_after=settings.stale_after,
        )
        try:
            _planned, done = gc.run(Path(settings.cache_dirs[0]).absolute(), limits, False)
        except OSError as exc:
            log.warning("the cache size limit could not be enforced: %s", exc)
            return
        for action in done:
            log.info("cache limit: %s %s (%s)", action.kind, action.entry.key, action.reason)


def _pull_one(uri: SourceUri, dest: Path | None, settings: Settings, started: float) -> Result:
    if uri.kind == "model-mount":
        assert dest is not None
        _prepare_dir(dest, "destination")
        log.info("%s is the model mount directory: nothing to download", uri.redacted)
        return Result(uri.redacted, str(dest), "no-op")
    if uri.kind == "pvc":
        assert dest is not None
        return _link_pvc(uri, dest, settings, started)
    entry = entry_for(uri, dest or Path("."), settings)
    if entry.mode == "direct":
        _prepare_dir(dest, "destination")
    else:
        _prepare_dir(entry.root, "cache entry")
    checking = time.monotonic()
    model, current = _published(entry)
    if _valid(model, current, settings) and not settings.revalidate:
        assert current is not None
        checked = {"verify": time.monotonic() - checking}  # the marker check: stat sizes
        with contextlib.suppress(EntryVanished):  # evicted this instant: the slow path
            _finish(model, dest, current, settings)
            elapsed = time.monotonic() - started
            return _found(uri, dest, entry, current, "complete", elapsed, phases=checked)
    return _locked_pull(uri, entry, dest, settings, started)


# -- waiting for, or claiming, the lease -------------------------------------------------------


def _try_flock(flock: Any, timeout: float) -> tuple[bool, bool]:
    """(held, usable). A filesystem without working flock leaves only the lease in charge."""
    from filelock import Timeout

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


def _locked_pull(
    uri: SourceUri, entry: layout.Entry, dest: Path | None, settings: Settings, started: float
) -> Result:
    from filelock import FileLock

    from storage_initializer import signals
    from storage_initializer.report import describe_progress
    from storage_initializer.store.lease import Observer, Owner, current, try_claim

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
            model, existing = _published(entry)
            if _valid(model, existing, settings) and not (settings.revalidate and not waited):
                assert existing is not None
                try:
                    _finish(model, dest, existing, settings)
                except EntryVanished:
                    continue  # evicted or switched this instant: look again
                elapsed = time.monotonic() - started
                return _found(
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
                    return _as_holder(
                        uri,
                        entry,
                        dest,
                        settings,
                        started,
                        lease,
                        waited,
                        owner,
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


# -- the holder --------------------------------------------------------------------------------


def _select(uri: SourceUri, files: list[RemoteFile], settings: Settings) -> list[RemoteFile]:
    from dataclasses import replace

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


def _check_destination(
    uri: SourceUri, entry: layout.Entry, existing: marker_io.Marker | None, settings: Settings
) -> None:
    from storage_initializer.store.commit import describe_foreign, is_ours

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


def _as_holder(
    uri: SourceUri,
    entry: layout.Entry,
    dest: Path | None,
    settings: Settings,
    started: float,
    lease: Lease,
    waited: bool,
    owner: Owner,
    took_over: bool = False,
) -> Result:
    from storage_initializer.progress import Progress

    progress = Progress()
    lease.start_heartbeat(settings.heartbeat_interval, progress.snapshot)
    outcome = "failed"
    made: dict[str, Any] = {}  # _download records its staging area here as soon as it exists
    claimed = time.monotonic()
    try:
        result = _download(uri, entry, dest, settings, lease, progress, owner, made)
        outcome = result.outcome
        result.seconds = time.monotonic() - started
        result.phases = _phase_seconds(claimed - started, progress)
        result.retries = progress.retries
        result.verify_failures = progress.verify_failures
        result.takeovers = int(took_over)
        if waited and result.outcome == "complete":
            result.outcome = "waited"
        return result
    except BaseException as exc:
        where = progress.snapshot()  # before _failure_stats books the phase as "failed"
        stats = _failure_stats(progress, claimed - started, took_over)
        _attach_stats(exc, stats)
        ended = _terminated(exc, uri, where, stats)
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
        staging = made.get("staging")
        if staging is not None and not keep:
            with contextlib.suppress(OSError):
                staging.discard()
        if lost and not isinstance(exc, LeaseLostError | KeyboardInterrupt):
            # Whatever broke (the engine cancelled, a journal whose directory the new owner
            # adopted), the cause is the takeover: say so in the last log line.
            lease.lost.set()
            lost_error = LeaseLostError(
                f"lost the download lease of {entry.root} to another replica while "
                f"downloading {uri.redacted}; stopped without committing"
            )
            _attach_stats(lost_error, stats)
            raise lost_error from exc
        raise
    finally:
        lease.release(outcome)
        if outcome == "failed":  # a first pull that got nothing leaves no state
            from storage_initializer.store.tidy import forget_empty_entry

            with contextlib.suppress(OSError):
                forget_empty_entry(entry, lease.path)


def _terminated(
    exc: BaseException, uri: SourceUri, where: dict[str, Any], stats: dict[str, Any]
) -> BaseException | None:
    """``exc`` as a termination (signals.Terminated) that says how far the download got, or
    None when the process was not terminated. The engine's Cancelled in a thread other than
    the main one becomes the Terminated behind it."""
    from storage_initializer import signals
    from storage_initializer.report import describe_progress

    ended = signals.terminated_by(exc)
    if ended is None:
        return None
    _attach_stats(ended, stats)
    ended.detail = (
        f"while downloading {uri.redacted} (phase {where.get('phase')}, "
        f"{describe_progress(where)}); the staged files are kept for the next owner and "
        "the lease is released"
    )
    return ended


def _phase_seconds(wait: float, progress: Any) -> dict[str, float]:
    """Seconds by phase under the names docs/cache.md documents (the progress calls the
    listing phase "listing", as leases and ``status`` show it; metrics say "list")."""
    phases = {"wait": wait}
    for name, seconds in dict(progress.phases).items():
        key = "list" if name == "listing" else name
        phases[key] = phases.get(key, 0.0) + seconds
    return phases


def _failure_stats(progress: Any, wait: float, took_over: bool) -> dict[str, Any]:
    """What a failing holder got done, for the metrics file of a failed run: the origin's bytes
    were spent and the retries made even though the pull failed."""
    progress.set_phase("failed")  # books the time of the phase that failed
    snap = progress.snapshot()
    return {
        "bytes_from_origin": snap["bytes_from_origin"],
        "bytes_reused": snap["bytes_reused"],
        "files": snap["files_done"],
        "retries": snap["retries"],
        "verify_failures": progress.verify_failures,
        "takeovers": int(took_over),
        "phases": _phase_seconds(wait, progress),
    }


def _attach_stats(exc: BaseException, stats: dict[str, Any]) -> None:
    with contextlib.suppress(AttributeError, TypeError):  # some built-in exceptions refuse
        exc.pull_stats = stats  # type: ignore[attr-defined]


def failure_stats(exc: BaseException) -> dict[str, Any]:
    """Counters of a pull that raised ``exc`` (empty when it failed before downloading)."""
    stats = getattr(exc, "pull_stats", None)
    return dict(stats) if isinstance(stats, dict) else {}


def _still_held(lease: Lease) -> bool:
    try:
        return lease.still_held()
    except OSError:
        return True  # cannot tell: do not claim a takeover we did not see


def _download(
    uri: SourceUri,
    entry: layout.Entry,
    dest: Path | None,
    settings: Settings,
    lease: Lease,
    progress: Any,
    owner: Owner,
    made: dict[str, Any],
) -> Result:
    from storage_initializer import changes, diskspace, storage_config, tls
    from storage_initializer.engine import Engine
    from storage_initializer.providers import open_source
    from storage_initializer.report import ProgressReporter
    from storage_initializer.store.commit import (
        commit,
        commit_version,
        find_version,
        recover_interrupted,
        switch_current,
    )
    from storage_initializer.store.staging import Staging

    model, existing = _published(entry)
    if _valid(model, existing, settings) and not settings.revalidate:
        assert existing is not None
        _finish(model, dest, existing, settings)
        return _found(uri, dest, entry, existing, "complete", 0.0)
    override = SOURCE_OVERRIDE.get()
    if override is None:
        storage_config.apply()
        tls.configure_process()
    source = override or open_source(uri, settings)
    try:
        progress.set_phase("listing")
        lease.update(phase="listing")
        log.info("listing %s", uri.redacted)
        listing = source.list()
        files = _select(uri, listing.files, settings)
        if (
            settings.revalidate
            and _valid(model, existing, settings)
            and existing is not None
            and existing.fingerprint == listing.fingerprint
        ):
            log.info("%s has not changed since it was downloaded", uri.redacted)
            _finish(model, dest, existing, settings)
            return _found(uri, dest, entry, existing, "complete", 0.0)
        if entry.mode == "cache":
            ready = find_version(entry, listing.fingerprint)
            if ready is not None and settings.require_signature:
                ready = ready if _signed(marker_io.read(entry.version(ready)), settings) else None
            if ready is not None:
                # Published by an owner that died before switching, or an earlier version
                # the source went back to: switch without downloading.
                lease.ensure_held()
                switch_current(entry, ready)
                version = entry.version(ready)
                found = marker_io.read(version)
                assert found is not None
                log.info("%s: switching to the complete version %s", uri.redacted, ready)
                _finish(version, dest, found, settings)
                return _found(uri, dest, entry, found, "complete", 0.0)
        else:
            _check_destination(uri, entry, existing, settings)
        total = sum(f.size or 0 for f in files)
        progress.set_totals(len(files), total)
        staging = made["staging"] = Staging.prepare(entry, owner.id, entry.key, listing.fingerprint)
        if entry.mode == "direct":
            recover_interrupted(entry, staging)
        todo = _reuse_staged(files, staging, progress)
        # Same content already on the volume (any version, entry or DEST): link, not fetch.
        todo = _reuse_volume(entry, uri, todo, staging, progress, settings)
        single_archive = (
            len(files) == 1 and _is_archive(files[0].path) and source.extract_single_archive
        )
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
        progress.set_phase("transfer")
        lease.update(phase="transfer")
        with ProgressReporter(uri.redacted, settings.progress_interval, progress.snapshot):
            try:
                # A source that changes meanwhile is followed, never stitched (changes.py).
                listing, files, todo, results = changes.transfer(
                    uri.redacted,
                    source,
                    lambda batch: Engine(
                        source, settings, progress, _cancel_on_loss(lease), lease.ensure_held
                    ).run(batch, staging),
                    lambda found: _select(uri, found, settings),
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
    finally:
        source.close()
    _dedupe_fetched(entry, uri, todo, staging, settings)
    final = [
        marker_io.MarkerFile(
            f.path,
            int(f.size if f.size is not None else (staging.data / f.path).stat().st_size),
            dict(results[f.path]),
        )
        for f in files
    ]
    if len(files) == 1 and _is_archive(files[0].path) and source.extract_single_archive:
        progress.set_phase("extract")
        lease.update(phase="extract")
        try:
            final = _extract_single(staging, files[0].path, settings)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            # How far the archive would have expanded is unknown: say what was written.
            raise diskspace.describe_enospc(exc, entry.root, None, staging.dir) from None
        if settings.max_size:
            extracted = sum(f.size for f in final)
            diskspace.check_quota(extracted, settings.max_size)
    signature = None
    if settings.require_signature:  # verified before anything is published (signing.py)
        from storage_initializer.signing import check_staged

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
        read_only=settings.read_only or entry.mode == "cache",
        tool_version=__version__,
        signature=signature,
    )
    try:
        if entry.mode == "cache":
            # A cache version is shared by every pod and other entries' links: always
            # read-only; a --writable pod gets private copies of it (_finish).
            name = commit_version(entry, staging, new_marker, lease, True)
        else:
            commit(entry, staging, new_marker, lease, settings.read_only, remove_others=True)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise diskspace.full_at_commit(exc, entry.root, len(final)) from None
    if entry.mode == "cache":
        _finish(entry.version(name), dest, new_marker, settings)
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


def _reuse_volume(
    entry: layout.Entry,
    uri: SourceUri,
    todo: list[RemoteFile],
    staging: Any,
    progress: Any,
    settings: Settings,
) -> list[RemoteFile]:
    """The files still to fetch once those the volume holds are in staging (store.reuse).
    Cache versions are always committed read-only, so they may share inodes."""
    from storage_initializer.store import reuse

    may_link = settings.read_only or entry.mode == "cache"
    return reuse.from_volume(entry, uri.redacted, todo, staging, progress, may_link).todo


def _dedupe_fetched(
    entry: layout.Entry,
    uri: SourceUri,
    fetched: list[RemoteFile],
    staging: Any,
    settings: Settings,
) -> None:
    """Another pull may have committed a file we fetched meanwhile: link to it (store.reuse)."""
    from storage_initializer.store import reuse

    may_link = settings.read_only or entry.mode == "cache"
    reuse.dedupe_fetched(entry, uri.redacted, fetched, staging, may_link)


def _cancel_on_loss(lease: Lease) -> Any:
    """The engine stops when the lease is lost; its own failures must not look like a loss."""
    from storage_initializer import signals

    cancel = signals.cancel_event()  # set by SIGTERM/SIGINT too: one way to stop the engine
    original = lease.lost.set

    def lost_and_cancel() -> None:
        original()
        cancel.set()

    lease.lost.set = lost_and_cancel  # type: ignore[method-assign]
    if lease.lost.is_set():
        cancel.set()
    return cancel


def _reuse_staged(files: list[RemoteFile], staging: Any, progress: Any) -> list[RemoteFile]:
    verified = staging.verified()
    todo = []
    for item in files:
        record = verified.get(item.path)
        ok = (
            record is not None
            and (item.size is None or record.size == item.size)
            and staging.staged_size(item.path) == record.size
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


def _is_archive(path: str) -> bool:
    from storage_initializer.archive import is_archive

    return is_archive(path)


def _extract_single(staging: Any, name: str, settings: Settings) -> list[marker_io.MarkerFile]:
    from storage_initializer.archive import Limits, extract

    log.info("extracting %s", name)
    target = staging.dir / "extracted"
    if target.exists():
        from storage_initializer.store.fsutil import remove_tree

        remove_tree(target)
    extracted = extract(staging.data / name, target, Limits.from_settings(settings))
    old = staging.dir / "archive-data"
    os.rename(staging.data, old)
    os.rename(target, staging.data)
    shutil.rmtree(old, ignore_errors=True)
    return [marker_io.MarkerFile(e.path, e.size, {"sha256": e.sha256}) for e in extracted]


def _human(count: int) -> str:
    from storage_initializer.report import human_bytes

    return human_bytes(count)


# -- legacy PVC sources ------------------------------------------------------------------------


def _link_pvc(uri: SourceUri, dest: Path, settings: Settings, started: float) -> Result:
    """``/mnt/pvc/...``: the model is already on a mounted volume; link it, as KServe does."""
    source = Path(uri.raw)
    if not source.exists():
        raise NotFoundError(
            f"cannot locate source {uri.redacted} on the PVC",
            "Check the PVC name and the path inside it (pvc://<claim>/<path>)",
        )
    _prepare_dir(dest, "destination")
    names = [source.name] if source.is_file() else sorted(os.listdir(source))
    base = source.parent if source.is_file() else source
    linked = 0
    for name in names:
        if not selected(name, settings.include, settings.exclude):
            continue
        target = dest / name
        if target.is_symlink() and os.readlink(target) == str(base / name):
            linked += 1
            continue
        if target.exists() or target.is_symlink():
            if not settings.replace:
                raise DestinationError(
                    f"{target} already exists", "Use an empty destination, or pass --replace"
                )
            from storage_initializer.store.fsutil import remove_path

            remove_path(target)
        os.symlink(base / name, target)
        linked += 1
    if not linked:
        raise NotFoundError(f"no model found in {uri.redacted}")
    return Result(
        uri.redacted, str(dest), "linked", files=linked, seconds=time.monotonic() - started
    )


def describe_failure(uri_text: str, exc: BaseException) -> str:
    """The last log line of a failed pull: which URI, what went wrong, what to do."""
    from storage_initializer.redact import redact, redact_url

    shown = redact_url(uri_text)
    if isinstance(exc, InitializerError):
        detail = exc.describe()
    elif isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        detail = (
            f"the volume is full ({exc.filename or 'destination'}): "
            "free space or use a larger volume"
        )
    elif isinstance(exc, OSError):
        detail = f"{exc.strerror or exc} ({exc.filename})" if exc.filename else str(exc)
    else:
        detail = f"unexpected {type(exc).__name__}: {exc}"
    return redact(f"failed to download {shown}: {detail}")
