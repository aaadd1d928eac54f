"""One pull into one cache (or destination): the fast path, else claim or wait for the lease;
then the bookkeeping of a successful pull. :func:`storage_initializer.pull.pull` and each tier
of a tiered cache (cache.tiers) call these."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from storage_initializer.pulling.outcome import Result
from storage_initializer.pulling.published import (
    EntryVanished,
    entry_for,
    finish,
    found,
    prepare_dir,
    published,
    valid,
)
from storage_initializer.settings import Settings
from storage_initializer.store import access
from storage_initializer.store.layout import EntryMode
from storage_initializer.uri import SourceUri

if TYPE_CHECKING:
    from storage_initializer.providers.base import Source

#: One logger name for every part of a pull, as when it was one module.
log = logging.getLogger("storage_initializer.pull")


def after_pull(uri: SourceUri, result: Result, settings: Settings) -> None:
    """Bookkeeping of a successful pull: the access record, and the cache's size limit."""
    entry = entry_for(uri, Path(result.dest), settings)
    if entry.mode != EntryMode.CACHE:  # cache mode recorded the use before linking (finish)
        access.record(entry, result.outcome)
    if settings.cache_dirs and settings.cache_max_size:
        from storage_initializer.cache import eviction as gc  # not on a warm start

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


def pull_one(
    uri: SourceUri,
    dest: Path | None,
    settings: Settings,
    started: float,
    source_override: Source | None = None,
) -> Result:
    """``source_override`` (tiered caches): the holder reads from this source (a slower tier's
    copy) instead of the URI's own provider; everything else — key, lease, marker — stays the
    URI's."""
    if uri.kind == "model-mount":
        assert dest is not None
        prepare_dir(dest, "destination")
        log.info("%s is the model mount directory: nothing to download", uri.redacted)
        return Result(uri.redacted, str(dest), "no-op")
    if uri.kind == "pvc":
        from storage_initializer.pulling.pvc import link_pvc  # not on a warm start

        assert dest is not None
        return link_pvc(uri, dest, settings, started)
    entry = entry_for(uri, dest or Path("."), settings)
    if entry.mode == EntryMode.DIRECT:
        assert dest is not None  # without a destination the entry is a cache entry
        prepare_dir(dest, "destination")
    else:
        prepare_dir(entry.root, "cache entry")
    checking = time.monotonic()
    model, current = published(entry)
    if valid(model, current, settings) and not settings.revalidate:
        assert current is not None
        checked = {"verify": time.monotonic() - checking}  # the marker check: stat sizes
        with contextlib.suppress(EntryVanished):  # evicted this instant: the slow path
            finish(model, dest, current, settings)
            elapsed = time.monotonic() - started
            return found(uri, dest, entry, current, "complete", elapsed, phases=checked)
    from storage_initializer.pulling.claim import claim_or_wait  # a warm start stops above

    return claim_or_wait(uri, entry, dest, settings, started, source_override)
