"""Reuse by content: files the volume already holds are linked into staging, not fetched.

Before the engine is given the files to fetch, every file the source describes with a strong
identity (:mod:`storage_initializer.store.content`) is looked up among the files the markers on
the volume list: earlier versions of this entry, other entries of the cache (other models, other
sources, other filters), or the destination itself in direct mode. A match is brought into our
private staging area and **re-hashed there** before it counts:

* a **hard link** when the candidate can never change (a read-only entry, or the very directory
  this pull replaces) and our staging is on its filesystem: no bytes move, and the blob's link
  count is its reference count, so gc frees it exactly when the last version holding it goes;
* otherwise (a writable entry, another filesystem) a **reflink** where the filesystem offers
  one, else a copy — then the new version owns its own inode.

Linking first and hashing the link second is what makes this safe against gc and against
malformed markers: once linked, the inode is ours whatever happens to the candidate's path; if
gc removed it a moment before, the link fails and the file is simply fetched. A file whose
digest does not match (a rotted copy, a lying marker) is discarded and fetched from the origin.
The staging journal then records the file exactly as a download would have (size and the
checksum a download would have verified), so resume, commit and the marker need no change.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from storage_initializer import checksums as sums
from storage_initializer.blocks import BLOCK
from storage_initializer.report import human_bytes
from storage_initializer.store import content

if TYPE_CHECKING:
    from storage_initializer.progress import Progress
    from storage_initializer.providers.base import RemoteFile
    from storage_initializer.store.layout import Entry
    from storage_initializer.store.staging import Staging

log = logging.getLogger(__name__)

#: Linux FICLONE ioctl: share the extents of a file (btrfs, XFS, bcachefs); fails elsewhere.
FICLONE = 0x40049409


@dataclass
class Outcome:
    """What :func:`from_volume` did: the files still to fetch, and what it reused."""

    todo: list[RemoteFile]
    files: int = 0
    bytes: int = 0
    linked: int = 0


def from_volume(
    entry: Entry,
    source: str,
    files: list[RemoteFile],
    staging: Staging,
    progress: Progress,
    may_link: bool,
) -> Outcome:
    """Bring every file of ``files`` that the volume already holds into ``staging`` (verified,
    journalled, counted as reused) and return the rest. ``may_link``: the new version may share
    inodes with read-only entries (it is read-only itself)."""
    wanted = [f for f in files if f.size is not None and content.identities(f.checksums, True)]
    if not wanted:
        return Outcome(list(files))
    try:
        index = content.volume_index(entry)
    except OSError as exc:
        log.info("not looking for reusable files on the volume: %s", exc)
        return Outcome(list(files))
    if index.empty:  # a pool of threads and a lookup per file, for no candidate at all
        return Outcome(list(files))
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers, thread_name_prefix="reuse") as pool:
        taken = list(
            pool.map(lambda f: _take(f, index, source, staging, may_link, progress), wanted)
        )
    done: dict[str, tuple[int, bool]] = {}
    for item, how in zip(wanted, taken, strict=True):
        if how is not None:
            done[item.path] = (int(item.size or 0), how == "link")
    outcome = Outcome([f for f in files if f.path not in done])
    for size, linked in done.values():
        outcome.files += 1
        outcome.bytes += size
        outcome.linked += int(linked)
    if outcome.files:
        log.info(
            "%s: %d files (%s) already on the volume, reused (%d linked, %d copied); %d to fetch",
            source,
            outcome.files,
            human_bytes(outcome.bytes),
            outcome.linked,
            outcome.files - outcome.linked,
            len(outcome.todo),
        )
    return outcome


def _take(
    item: RemoteFile,
    index: content.Index,
    source: str,
    staging: Staging,
    may_link: bool,
    progress: Progress,
) -> str | None:
    """Try the candidates for ``item`` in turn; "link" or "copy" when one verified, else None."""
    size = int(item.size or 0)
    target = staging.data / item.path
    record_kind = sums.choose(item.checksums) or sums.local_default()
    for candidate, kind, value in index.matches(size, item.checksums, source, item.path):
        if not content.hashable(kind):
            continue
        how = _place(candidate, target, may_link and (candidate.read_only or candidate.replaced))
        if how is None:
            continue
        digests = _hash(target, size, {kind, record_kind})
        if digests is None or digests.get(kind) != value:
            if candidate.checksums.get(kind) == value:  # else only a hint (a size, a CRC)
                log.warning(
                    "%s on the volume does not hold the content its marker claims; not reused",
                    candidate.path,
                )
            with contextlib.suppress(OSError):
                target.unlink()
            continue
        expected = item.checksums.get(record_kind)
        if expected is not None and digests[record_kind] != str(expected).lower():
            with contextlib.suppress(OSError):
                target.unlink()
            continue  # the source announced two checksums that disagree: let the engine say so
        staging.record(item.path, size, {record_kind: digests[record_kind]})
        progress.reused(size)  # as it happens: waiters see the holder's progress move
        return how
    return None


def _place(candidate: content.Candidate, target: Path, link: bool) -> str | None:
    """Hard link (or copy) ``candidate`` to ``target``; None when it is gone or unusable."""
    with contextlib.suppress(FileNotFoundError):
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(candidate.path, target, follow_symlinks=False)
        except FileNotFoundError:
            return None  # removed meanwhile (gc, a replaced version): fetch instead
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                log.debug("cannot link %s: %s", candidate.path, exc)
                return None
        else:
            if _regular(target, candidate.size):
                return "link"
            with contextlib.suppress(OSError):
                target.unlink()
            return None
    try:
        _copy(candidate.path, target)
    except OSError as exc:
        log.debug("cannot copy %s: %s", candidate.path, exc)
        with contextlib.suppress(OSError):
            target.unlink()
        return None
    return "copy" if _regular(target, candidate.size) else None


def _regular(path: Path, size: int) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == size


def _copy(source: Path, target: Path) -> None:
    """A private copy: a reflink where the filesystem shares extents, else the bytes. The
    source is opened without following a symlink (markers are input, not truth)."""
    src = os.open(source, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            if not _reflink(src, dst):
                with os.fdopen(os.dup(src), "rb") as reader, os.fdopen(os.dup(dst), "wb") as out:
                    shutil.copyfileobj(reader, out, BLOCK)
            os.fsync(dst)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _reflink(src: int, dst: int) -> bool:
    try:
        import fcntl  # POSIX only: a failed import means no reflink

        fcntl.ioctl(dst, FICLONE, src)
    except (OSError, ImportError):
        return False
    return True


def _hash(path: Path, size: int, kinds: Iterable[str]) -> dict[str, str] | None:
    """Digests of the file at ``path`` in one read; None if it is not ``size`` bytes."""
    hashers = {kind: content.new_hasher(kind, size) for kind in kinds}
    seen = 0
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        while chunk := handle.read(BLOCK):
            seen += len(chunk)
            for hasher in hashers.values():
                hasher.update(chunk)
    if seen != size:
        return None
    return {kind: hasher.hexdigest() for kind, hasher in hashers.items()}


def reflink_or_copy(source: Path, target: Path) -> None:
    """A private copy of a cache file for a writable destination (see store.links)."""
    _copy(source, target)


def dedupe_fetched(
    entry: Entry, source: str, fetched: list[RemoteFile], staging: Staging, may_link: bool
) -> int:
    """Right before commit: a file we fetched that another pull committed meanwhile (two
    models sharing a file, pulled at the same time) is replaced by a link to that copy, so the
    volume stores it once. The other copy is linked to a temporary name first and hashed there,
    and only a verified link replaces ours. Returns the files replaced."""
    wanted = [f for f in fetched if f.size and content.identities(f.checksums, True)]
    if not wanted or not may_link:
        return 0
    try:
        index = content.volume_index(entry)
    except OSError:
        return 0
    if index.empty:
        return 0
    replaced = 0
    for item in wanted:
        size = int(item.size or 0)
        staged = staging.data / item.path
        for candidate, kind, value in index.matches(size, item.checksums, source, item.path):
            if not (candidate.read_only and content.hashable(kind)):
                continue
            spare = staged.with_name(f".{staged.name}.dedupe")
            if _place(candidate, spare, True) != "link":
                continue
            digests = _hash(spare, size, {kind})
            if digests is None or digests.get(kind) != value:
                with contextlib.suppress(OSError):
                    spare.unlink()
                continue
            os.replace(spare, staged)
            replaced += 1
            break
    if replaced:
        log.info(
            "%s: %d fetched files were committed meanwhile by another pull: linked",
            source,
            replaced,
        )
    return replaced
