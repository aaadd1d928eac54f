"""Tiered caches: ``--cache-dir`` given several times, fastest first.

Typical KServe set-up: a node-local tier (hostPath or a LocalModelCache PV) in front of the
shared RWX PVC. A replica looks in the fastest tier first; a hit in a slower tier is *copied
up*, verified file by file against that tier's marker, without touching the origin; a miss
everywhere downloads once into the last (shared) tier — under that tier's lease, so the nodes
download once between them — and then copies up. Every tier is an ordinary cache with its own
lease, marker and access log — a copy-up counts as a use of the slower tier's entry, so the
shared PVC's LRU sees the models that nodes use — so a tier can be inspected, verified and
collected on its own; each may have its own size limit (``cache_max_size`` as a list, one value
per tier), enforced by the automatic gc after the pull that filled it.

The fast path of the fastest tier checks sizes only (a replica must start in well under a
second), so a same-size corruption there is not noticed at start: ``verify --cache-dir`` on that
tier re-hashes and finds it, and ``verify --repair`` replaces the bad files.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from storage_initializer.providers.base import Listing, RemoteFile, Source, read_local_range
from storage_initializer.pulling.one import after_pull, pull_one
from storage_initializer.pulling.published import published, valid
from storage_initializer.store import access, layout
from storage_initializer.store import marker as marker_io

if TYPE_CHECKING:
    from storage_initializer.pulling.outcome import Result
    from storage_initializer.settings import Settings
    from storage_initializer.uri import SourceUri

log = logging.getLogger(__name__)


class TierSource(Source):
    """A complete version in a slower tier, read as a source: the listing is its marker (so
    every file is verified against the checksum recorded when it came from the origin), the
    fingerprint is the origin's."""

    default_workers = 4
    extract_single_archive: ClassVar[bool] = False  # already extracted when it was stored

    def __init__(self, version: layout.Entry, marker: marker_io.Marker) -> None:
        self.version = version
        self.marker = marker

    def list(self) -> Listing:
        files = [
            RemoteFile(f.path, f.size, dict(f.checksums), "", str(self.version.root / f.path))
            for f in self.marker.files
        ]
        return Listing(files, self.marker.fingerprint)

    def read(self, file: RemoteFile, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        return read_local_range(file.handle, start, end)


def _complete(tier: Path, key: str) -> tuple[layout.Entry, marker_io.Marker] | None:
    model, marker = published(layout.cached(tier, key))
    if valid(model, marker):
        assert marker is not None
        return model, marker
    return None


def _use_slower(tier: Path, key: str) -> tuple[layout.Entry, marker_io.Marker] | None:
    """A complete version in a slower tier, our use of it recorded there first.

    Recorded so that the shared tier's LRU/LFU counts the models used through node tiers (a
    copy-up is a use of the shared copy even though no pod links to it), and recorded *before*
    reading: gc hides an entry before its last look at the access log, so after our record
    either gc sees the use and keeps the entry, or we see ``current`` moved and treat the tier
    as a miss instead of copying files that are being removed."""
    found = _complete(tier, key)
    if found is None:
        return None
    keyed = layout.cached(tier, key)
    access.record(keyed, "copy-up")
    if keyed.current_version() != found[0].root.name:
        return None
    return found


def _tier_settings(settings: Settings, index: int) -> Settings:
    tier = settings.cache_dirs[index]
    limits = settings.cache_max_sizes
    limit = limits[min(index, len(limits) - 1)] if limits else 0
    return replace(settings, cache_dirs=(tier,), cache_max_size=limit)


def pull_tiered(uri: SourceUri, dest: Path | None, settings: Settings) -> Result:
    started = time.monotonic()
    tiers = [Path(d).absolute() for d in settings.cache_dirs]
    key = uri.key(settings.include, settings.exclude)
    fastest = _tier_settings(settings, 0)
    if _complete(tiers[0], key) is not None and not settings.revalidate:
        result = pull_one(uri, dest, fastest, started)
        after_pull(uri, result, fastest)
        return result
    origin_bytes = 0
    found = None
    for tier in tiers[1:]:
        found = _use_slower(tier, key)
        if found is not None:
            log.info("%s: found in the cache tier %s; copying it up", uri.redacted, tier)
            break
    if found is None or settings.revalidate:
        shared = _tier_settings(settings, len(tiers) - 1)
        stored = pull_one(uri, None, shared, started)
        after_pull(uri, stored, shared)
        origin_bytes = stored.bytes_from_origin
        found = _complete(tiers[-1], key)
        if found is None:  # pragma: no cover - the pull above just completed it
            raise RuntimeError(f"{uri.redacted}: the shared tier is incomplete after a pull")
    version, marker = found
    copy_up = TierSource(version, marker)
    result = pull_one(uri, dest, replace(fastest, revalidate=False), started, copy_up)
    after_pull(uri, result, fastest)
    # From the origin's point of view, only the shared tier's download counts.
    result.bytes_reused += result.bytes_from_origin
    result.bytes_from_origin = origin_bytes
    if result.outcome == "downloaded" and not origin_bytes:
        result.outcome = "copied-up"
    return result
