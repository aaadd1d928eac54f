"""Disk budget: refuse a download that cannot fit, before fetching a byte.

Sizes are known from the listing. A single archive needs room for itself and for what it
expands to, which we cannot know in advance: we ask for twice its size (the archive is deleted
after extraction) and rely on the ENOSPC handling for the rest. Bytes already staged by a
previous owner count as present.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from storage_initializer.errors import DestinationError
from storage_initializer.report import human_bytes

#: Free space kept for the filesystem's own needs and our state files.
MARGIN = 16 << 20
ARCHIVE_FACTOR = 2


def free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def check(staging_dir: Path, needed: int, is_archive: bool, max_size: int = 0) -> None:
    if max_size and needed > max_size:
        raise DestinationError(
            f"the model is {human_bytes(needed)}, more than the {human_bytes(max_size)} "
            "allowed per entry (--max-size)",
            "Raise --max-size (STORAGE_INITIALIZER_MAX_SIZE) or filter files with --include",
        )
    wanted = needed * (ARCHIVE_FACTOR if is_archive else 1) + MARGIN
    available = free_bytes(staging_dir)
    if wanted > available:
        raise DestinationError(
            f"not enough space on the volume of {staging_dir.parent.parent.parent}: "
            f"{human_bytes(wanted)} needed, {human_bytes(available)} free",
            "Free space on the volume, use a larger one, or download fewer files (--include)",
        )


def describe_enospc(exc: OSError, volume: Path, needed: int) -> DestinationError:
    assert exc.errno == errno.ENOSPC
    return DestinationError(
        f"the volume of {volume} filled up during the download "
        f"({human_bytes(needed)} needed, {human_bytes(free_bytes(volume))} free now)",
        "Free space on the volume or use a larger one; the partial download was removed",
    )
