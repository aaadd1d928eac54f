"""Content identity: when a file already on the volume *is* the file a source announces.

Reuse must never serve other bytes than the source's, so "same" is decided by a checksum the
source announced, together with the size, and only by kinds that pin the content:

* ``sha256``, ``md5`` and ``gitsha1`` (a git blob id: sha1 over ``blob <size>\\0`` + content)
  count **across sources**. Nobody can make a file match a digest someone else published
  (no second-preimage attack is known on any of them), so a model pulled by another tenant
  cannot pose as a file of yours.
* ``crc32c``, ``crc32`` and ``crc64nvme`` count only **within one source** (the same redacted
  URI: earlier versions, other filters of it). A CRC is linear: anyone can append four or eight
  bytes to any file to give it a chosen CRC and size, so across sources it would let one model
  poison another. Within one source, whoever could forge it controls the source anyway.
* Weak identities never count: an S3 multipart ETag (a digest of part digests, which the
  provider never announces as ``md5``), a Last-Modified, a GCS generation, any ``version``.

The index is built from the markers already on the volume: each lists every file with its size
and the checksums verified when it was written, so no extra state exists that could disagree
with them. Markers are input, not truth: a candidate is always re-hashed after it has been
linked (see :mod:`storage_initializer.store.reuse`).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from storage_initializer import checksums as sums
from storage_initializer.paths import safe_relpath
from storage_initializer.store import layout
from storage_initializer.store import marker as marker_io
from storage_initializer.store.layout import EntryMode

#: Digests that identify content across sources (see the module docstring for why).
CROSS_SOURCE = ("sha256", "md5", "gitsha1")
#: Checksums that identify content only within one source (forgeable by design).
SAME_SOURCE_ONLY = ("crc64nvme", "crc32c", "crc32")
#: A git blob id is not recorded in markers: it is computed on demand, for small files only.
GITSHA1_MAX = 64 << 20
#: …and for at most this many files of the right size, so a cache of many same-sized files
#: cannot turn one lookup into a scan of the volume.
GITSHA1_TRIES = 8


@dataclass(frozen=True)
class Candidate:
    """A file already on the volume, as its marker describes it."""

    path: Path
    size: int
    checksums: Mapping[str, str]
    #: The redacted source of the marker it comes from (the scope of CRC identities).
    source: str
    #: Its entry is read-only: its files never change, so a hard link to them is safe.
    read_only: bool
    #: True for a file of the very directory the pull replaces (direct mode ``--revalidate``):
    #: the old path disappears at commit, so the inode becomes the new version's alone.
    replaced: bool = False


_HEX = re.compile(r"[0-9a-f]+")


def identities(checksums: Mapping[str, str], same_source: bool) -> list[tuple[str, str]]:
    """The (kind, value) pairs of ``checksums`` strong enough to identify content, strongest
    first; CRCs only when both sides come from the same source."""
    kinds = CROSS_SOURCE + (SAME_SOURCE_ONLY if same_source else ())
    found = []
    for kind in kinds:
        value = str(checksums.get(kind, "")).strip().lower()
        if value and _HEX.fullmatch(value):
            found.append((kind, value))
    return found


def git_blob_hasher(size: int) -> hashlib._Hash:
    """sha1 as git names a blob: over ``blob <size>\\0`` and then the content."""
    hasher = hashlib.sha1(usedforsecurity=False)
    hasher.update(f"blob {size}\0".encode())
    return hasher


def new_hasher(kind: str, size: int) -> sums.Hasher:
    return git_blob_hasher(size) if kind == "gitsha1" else sums.new_hasher(kind)


def hashable(kind: str) -> bool:
    return kind == "gitsha1" or sums.available(kind)


def _version_markers(entry: layout.Entry) -> Iterator[tuple[layout.Entry, marker_io.Marker]]:
    if entry.mode == EntryMode.CACHE:
        # A cache written before versions existed keeps its model in the entry itself.
        places = [entry.version(name) for name in entry.versions()] + [entry]
    else:
        places = [entry]
    for place in places:
        found = marker_io.read(place)
        if found is not None:
            yield place, found


def candidates_of(
    places: Iterable[tuple[layout.Entry, marker_io.Marker]], replaced: bool = False
) -> Iterator[Candidate]:
    for place, found in places:
        for item in found.files:
            try:
                relative = safe_relpath(str(item.path), "file")
                size = int(item.size)
            except Exception:
                continue
            if size < 0 or not isinstance(item.checksums, dict):
                continue
            yield Candidate(
                place.root / relative,
                size,
                dict(item.checksums),
                str(found.source),
                bool(found.read_only),
                replaced,
            )


class Index:
    """Every candidate on the volume by (size, kind, value), and by size for git blob ids."""

    def __init__(self, candidates: Iterable[Candidate]) -> None:
        self._by_digest: dict[tuple[int, str, str], list[Candidate]] = {}
        self._by_size: dict[int, list[Candidate]] = {}
        for candidate in candidates:
            for kind, value in identities(candidate.checksums, same_source=True):
                self._by_digest.setdefault((candidate.size, kind, value), []).append(candidate)
            if candidate.size <= GITSHA1_MAX:
                self._by_size.setdefault(candidate.size, []).append(candidate)

    @property
    def empty(self) -> bool:
        """No candidate at all (a first pull into a fresh volume): nothing can match."""
        return not self._by_digest and not self._by_size

    def matches(
        self, size: int, checksums: Mapping[str, str], source: str, path: str = ""
    ) -> Iterator[tuple[Candidate, str, str]]:
        """Candidates that may hold exactly this content, each with the identity (kind, value)
        to confirm by hashing; files of the replaced directory and read-only ones first
        (they can be linked rather than copied). ``path``: the file's own path, whose earlier
        versions are the likeliest holders of a git blob id."""
        seen: set[tuple[Path, str]] = set()
        for kind, value in identities(checksums, same_source=True):
            if kind == "gitsha1":
                # Computed on demand: try a few files of that size, this source's first.
                pool = self._by_size.get(size, []) if size <= GITSHA1_MAX else []
                pool = sorted(
                    pool, key=lambda c: (c.source != source, not str(c.path).endswith("/" + path))
                )[:GITSHA1_TRIES]
            else:
                pool = self._by_digest.get((size, kind, value), [])
            for candidate in sorted(pool, key=lambda c: (not c.replaced, not c.read_only)):
                if kind in SAME_SOURCE_ONLY and candidate.source != source:
                    continue  # a CRC is no identity across sources
                if (candidate.path, kind) in seen:
                    continue
                seen.add((candidate.path, kind))
                yield candidate, kind, value
        yield from self._crc_hinted(size, checksums, source, seen)

    def _crc_hinted(
        self,
        size: int,
        checksums: Mapping[str, str],
        source: str,
        seen: set[tuple[Path, str]],
    ) -> Iterator[tuple[Candidate, str, str]]:
        """Files of *other* sources whose recorded CRC equals the one this source announces,
        to be confirmed by a strong digest this source also announces (an S3 object with a
        CRC and an MD5 ETag, verified and recorded by its CRC alone). The CRC only picks the
        file worth hashing; what decides is the strong digest computed over the linked file,
        so a CRC forged by another tenant buys nothing."""
        proof = next(
            ((k, v) for k, v in identities(checksums, same_source=False) if k != "gitsha1"), None
        )
        if proof is None:
            return
        for kind, value in identities(checksums, same_source=True):
            if kind not in SAME_SOURCE_ONLY:
                continue
            for candidate in self._by_digest.get((size, kind, value), []):
                if candidate.source == source or (candidate.path, proof[0]) in seen:
                    continue
                seen.add((candidate.path, proof[0]))
                yield candidate, proof[0], proof[1]


def volume_index(entry: layout.Entry) -> Index:
    """The candidates a pull into ``entry`` may reuse: in cache mode every version of every
    entry of the same cache directory (same filesystem, so hard links work); in direct mode the
    destination's own complete model, which a ``--revalidate`` is about to replace."""
    if entry.mode == EntryMode.DIRECT:
        return Index(candidates_of(_version_markers(entry), replaced=True))
    cache_dir = entry.root.parent
    places: list[tuple[layout.Entry, marker_io.Marker]] = []
    try:
        names = sorted(os.listdir(cache_dir))
    except OSError:
        names = []
    for name in names:
        if name.startswith("."):
            continue
        other = layout.cached(cache_dir, name)
        if other.root.is_symlink() or other.state.is_symlink() or not other.state.is_dir():
            continue
        places.extend(_version_markers(other))
    return Index(candidates_of(places))
