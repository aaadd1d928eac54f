"""Disk budget: refuse a download that cannot fit, before fetching a byte.

Sizes are known from the listing. A single archive needs room for itself and for what it
expands to, which we cannot know in advance: we ask for twice its size (the archive is deleted
after extraction) and rely on the ENOSPC handling for the rest. Bytes already staged by a
previous owner count as present.

Messages name the destination and the mount point of its volume (what an operator can resize),
never our state directory below it.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from storage_initializer.errors import DestinationError
from storage_initializer.report import human_bytes

#: Free space kept for the filesystem's own needs and our state files.
MARGIN = 16 << 20
ARCHIVE_FACTOR = 2


def free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def mount_point(path: Path) -> Path:
    """The mount point of the filesystem that holds ``path`` (or would, once created): the
    volume an operator knows by its ``mountPath``."""
    current = Path(os.path.abspath(path))
    while not current.exists() and current != current.parent:
        current = current.parent
    device = current.stat().st_dev
    while current != current.parent and current.parent.stat().st_dev == device:
        current = current.parent
    return current


@dataclass(frozen=True)
class Usage:
    """What a tree holds: ``bytes`` as file sizes add up (what quotas and markers count),
    ``allocated`` as the filesystem charges it (blocks, what ``du`` shows)."""

    bytes: int
    allocated: int
    files: int


def usage(root: Path, skip: str = "") -> Usage:
    """Walk ``root`` without following links, counting each inode once. ``skip`` names a
    top-level directory to leave out (our state directory: a lease or staging area is not part
    of the model). Unreadable parts are skipped: this is a report, not a proof."""
    seen: set[tuple[int, int]] = set()
    total = allocated = files = 0
    for dirpath, dirnames, filenames in os.walk(root):
        if skip and dirpath == str(root):
            dirnames[:] = [d for d in dirnames if d != skip]
        for name in filenames:
            try:
                info = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if not stat.S_ISREG(info.st_mode):
                continue
            if info.st_nlink > 1:
                inode = (info.st_dev, info.st_ino)
                if inode in seen:
                    continue
                seen.add(inode)
            total += info.st_size
            allocated += info.st_blocks * 512
            files += 1
    return Usage(total, allocated, files)


def check(
    staging_dir: Path, needed: int, is_archive: bool, max_size: int = 0, *, dest: Path
) -> None:
    """Refuse ``needed`` bytes into ``dest`` (staged in ``staging_dir``) when over the per-entry
    quota or when the volume cannot hold them. ``needed`` counts only bytes still to be
    written: nothing left to fetch (a run after a disk-full commit, every file verified and on
    disk) demands no space, not even the margin — the marker is a few kilobytes."""
    check_quota(needed, max_size)
    if needed <= 0:
        return
    wanted = needed * (ARCHIVE_FACTOR if is_archive else 1) + MARGIN
    available = free_bytes(staging_dir)
    if wanted > available:
        raise DestinationError(
            f"not enough space on the volume mounted at {mount_point(dest)} for {dest}: "
            f"{human_bytes(wanted)} needed, {human_bytes(available)} free",
            "Free space on the volume, use a larger one, or download fewer files (--include)",
        )


def check_quota(size: int, max_size: int) -> None:
    """Refuse a model of ``size`` bytes over the per-entry quota (--max-size). Only the size
    of the model counts here, not the free space: bytes already staged are on the volume."""
    if max_size and size > max_size:
        raise DestinationError(
            f"the model is {human_bytes(size)}, more than the {human_bytes(max_size)} "
            "allowed per entry (--max-size)",
            "Raise --max-size (STORAGE_INITIALIZER_MAX_SIZE) or filter files with --include",
        )


class FullAtCommit(DestinationError):
    """The volume filled up after every file was verified (writing the commit journal or the
    marker): the staged files are kept, so the next run after space is freed fetches nothing."""

    keep_staging = True


def full_at_commit(exc: OSError, dest: Path, files: int) -> FullAtCommit:
    assert exc.errno == errno.ENOSPC
    mount = mount_point(dest)
    return FullAtCommit(
        f"the volume mounted at {mount} filled up while committing the verified model into "
        f"{dest} ({human_bytes(free_bytes(mount))} free now)",
        f"Free some space on the volume and run again: the {files} verified file(s) are kept "
        "and will not be downloaded again",
    )


def describe_enospc(
    exc: OSError, dest: Path, needed: int | None, staging_dir: Path | None = None
) -> DestinationError:
    """The error for a volume that filled up while writing into ``dest``. ``needed`` is None
    when the source did not announce every size (or an archive was expanding): then the bytes
    already written to ``staging_dir`` are the best lower bound we have."""
    assert exc.errno == errno.ENOSPC
    if needed:
        amount = f"{human_bytes(needed)} needed"
    else:
        written = usage(staging_dir).allocated if staging_dir is not None else 0
        amount = f"size not announced, at least {human_bytes(written)} written so far"
    mount = mount_point(dest)
    return DestinationError(
        f"the volume mounted at {mount} filled up during the download into {dest} "
        f"({amount}, {human_bytes(free_bytes(mount))} free now)",
        "Free space on the volume or use a larger one; the partial download was removed",
    )
