"""One pull: source URI → destination directory, downloaded at most once per shared volume.

1. Fast path, no lock, no cloud SDK import: a valid marker for this source → done.
2. Otherwise wait for, or claim, the entry's lease (store.lease). Waiters log the holder's
   progress and re-check the marker.
3. The holder lists the source, downloads into private staging (resuming a dead owner's),
   extracts a single archive, verifies, commits (marker last) and releases the lease.
4. In cache mode the destination is then populated from the entry (store.links).

This module is the entry point: :func:`pull`, and the result and failure reports of a pull.
The steps live in :mod:`storage_initializer.pulling`, one job per module.
"""

from __future__ import annotations

import time
from pathlib import Path

from storage_initializer.errors import UsageError
from storage_initializer.pulling.one import after_pull, pull_one
from storage_initializer.pulling.outcome import Result, describe_failure, failure_stats
from storage_initializer.settings import Settings
from storage_initializer.uri import parse

__all__ = ["Result", "describe_failure", "failure_stats", "pull"]


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
        from storage_initializer.cache.tiers import pull_tiered  # not on a warm start

        return pull_tiered(uri, None if dest is None else Path(dest).absolute(), settings)
    result = pull_one(uri, None if dest is None else Path(dest).absolute(), settings, started)
    if result.key:
        after_pull(uri, result, settings)
    return result
