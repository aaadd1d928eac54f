"""What a pull finds already published, and how it hands a complete model to DEST.

Shared by the fast path, the waiters and the holder (and by the cache tiers), so none of them
imports another's private names.
"""

from __future__ import annotations

import os
from pathlib import Path

from storage_initializer.errors import DestinationError, TransientError
from storage_initializer.pulling.outcome import Result
from storage_initializer.settings import Settings
from storage_initializer.store import access, layout
from storage_initializer.store import marker as marker_io
from storage_initializer.store.layout import EntryMode
from storage_initializer.uri import SourceUri


def entry_for(uri: SourceUri, dest: Path, settings: Settings) -> layout.Entry:
    key = uri.key(settings.include, settings.exclude)
    if settings.cache_dirs:
        return layout.cached(Path(settings.cache_dirs[0]).absolute(), key)
    return layout.direct(dest, key)


def prepare_dir(path: Path, what: str) -> None:
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


def valid(
    entry: layout.Entry, marker: marker_io.Marker | None, settings: Settings | None = None
) -> bool:
    if marker is None or marker.key != entry.key or marker_io.problems(entry, marker):
        return False
    # --require-signature: a model verified under this trust, never one pulled unsigned.
    return settings is None or not settings.require_signature or signed(marker, settings)


def signed(marker: marker_io.Marker | None, settings: Settings) -> bool:
    from storage_initializer.signing import accepts  # not on a warm start

    return accepts(marker, settings)


def published(entry: layout.Entry) -> tuple[layout.Entry, marker_io.Marker | None]:
    """The directory readers get (:meth:`layout.Entry.published`) and its marker; none for a
    cache entry with no version yet."""
    model = entry.published()
    if model.mode == EntryMode.CACHE:
        return entry, None
    return model, marker_io.read(model)


def found(
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


def finish(
    entry: layout.Entry, dest: Path | None, marker: marker_io.Marker, settings: Settings
) -> None:
    """Cache mode: link DEST to the concrete version directory ``entry`` (never through
    ``current``), so a later version switch leaves this pod's model untouched.

    The use is recorded *before* linking and ``current`` read again after it: gc hides
    ``current`` before it reads the access log a last time, so either gc sees this use and
    keeps the entry, or this pull sees the entry going (:class:`EntryVanished`) and looks
    again, instead of linking files that are being removed."""
    if entry.mode == EntryMode.VERSION:
        keyed = layout.Entry(entry.root.parent, entry.key, EntryMode.CACHE)
        access.record(keyed, "use")
        if keyed.current_version() != entry.root.name:
            raise EntryVanished(f"{keyed.root}: the version {entry.root.name} is not current now")
    if entry.mode == EntryMode.VERSION and dest is not None:
        from storage_initializer.store import links  # (lazy: not on a warm start)
        from storage_initializer.store.commit import top_level

        prepare_dir(dest, "destination")
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
