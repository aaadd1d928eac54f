"""``verify --repair``: re-download only the files of an entry that fail verification.

No new machinery: under the entry's lease, the files that still verify are hard-linked (or
copied) into a staging area and journalled as verified, exactly as a dead owner's staging area
would look, and the damaged marker is taken down so that no replica trusts the entry any more.
An ordinary pull then adopts that staging area and fetches only what is missing — in cache mode
it publishes a new version, in direct mode it commits in place.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path

from storage_initializer import checksums
from storage_initializer.errors import DestinationError, UsageError
from storage_initializer.pull import pull
from storage_initializer.settings import Settings
from storage_initializer.store import layout
from storage_initializer.store import marker as marker_io
from storage_initializer.store.layout import EntryMode
from storage_initializer.store.lease import LeaseState, Owner, current, glance, try_claim
from storage_initializer.store.staging import Staging
from storage_initializer.uri import parse

log = logging.getLogger(__name__)


def bad_files(entry: layout.Entry, marker: marker_io.Marker) -> set[str]:
    bad = set()
    for item in marker.files:
        full = entry.root / item.path
        try:
            if full.stat().st_size != item.size:
                bad.add(item.path)
                continue
        except OSError:
            bad.add(item.path)
            continue
        algorithm = checksums.choose(item.checksums)
        if algorithm and checksums.file_digest(str(full), algorithm) != item.checksums[algorithm]:
            bad.add(item.path)
    return bad


def _place(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        shutil.copyfile(source, target)


def repair(source: str, entry: layout.Entry, settings: Settings) -> tuple[set[str], object]:
    """Repair ``entry`` (a direct entry or a cache version) from ``source``; returns the bad
    files and the pull's result (None when nothing was bad)."""
    marker = marker_io.read(entry)
    if marker is None:
        raise DestinationError(f"{entry.root} has no marker: nothing to repair against")
    uri = parse(source)
    if uri.key(tuple(marker.include), tuple(marker.exclude)) != marker.key:
        raise UsageError(
            f"{uri.redacted} is not the source of {entry.root} ({marker.source})",
            "Give the URI the entry was downloaded from, with its credentials",
        )
    bad = bad_files(entry, marker)
    if not bad:
        return bad, None
    keyed = (
        layout.Entry(entry.root.parent, marker.key, EntryMode.CACHE)
        if entry.mode == EntryMode.VERSION
        else entry
    )
    layout.ensure_state_dir(keyed)
    generation, data = current(keyed)
    # One look, judged like gc's (a watcher's first look calls every live-looking lease held).
    if glance(keyed, generation, data, settings.stale_after) == LeaseState.HELD:
        raise DestinationError(
            f"a replica is downloading {uri.redacted} into {keyed.root} right now",
            "Try again when it has finished",
        )
    owner = Owner.this_process()
    lease = try_claim(keyed, owner, generation, {"source": uri.redacted, "phase": "repair"})
    if lease is None:
        raise DestinationError(f"another replica took the lease of {keyed.root}; try again")
    try:
        staging = Staging.prepare(
            keyed, owner.id, marker.key, marker.fingerprint, made_by="verify --repair"
        )
        for item in marker.files:
            if item.path in bad:
                continue
            _place(entry.root / item.path, staging.data / item.path)
            staging.record(item.path, item.size, dict(item.checksums))
        marker_io.remove(entry)  # from now on no replica trusts the damaged tree
    finally:
        lease.release("repair staged")
    log.info("repairing %d file(s) of %s: %s", len(bad), entry.root, ", ".join(sorted(bad)))
    fixed = replace(
        _signed_as_before(marker, settings),
        include=tuple(marker.include),
        exclude=tuple(marker.exclude),
        replace=True,
        revalidate=False,
        cache_dirs=(str(keyed.root.parent),) if entry.mode == EntryMode.VERSION else (),
    )
    dest = None if entry.mode == EntryMode.VERSION else entry.root
    return bad, pull(source, dest, fixed)


def _signed_as_before(marker: marker_io.Marker, settings: Settings) -> Settings:
    """A model verified against ``model.sig`` at download stays verified through a repair
    (signing.py): the repairing pull requires the trust the marker recorded, unless one is
    given."""
    signed = marker.signature or {}
    if settings.require_signature or signed.get("signature") != "model.sig":
        return settings
    return replace(
        settings,
        require_signature=str(signed.get("trust", "")),
        signature_trust_root=str(signed.get("trust_root", "")),
    )
