"""Cache mode: populating a pod's destination from a cache entry.

``symlink`` (default) links each top-level item of the entry: instant, and the model server
must mount the cache volume at the same path. ``hardlink`` rebuilds the directories and links
each file: the destination must be on the same filesystem. ``copy`` copies: for a destination
on another volume (emptyDir) when the server cannot see the cache.

A ``--writable`` destination (``private=True``) always gets private copies (a reflink where the
filesystem shares extents, else the bytes), whatever the link mode: a symlink or a hard link
would let a replica that rewrites a file change the bytes every other pod, every other entry
sharing that file, and ``verify`` of the cache see. The cache itself stays read-only.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from pathlib import Path

from storage_initializer.errors import DestinationError
from storage_initializer.paths import STATE_DIR_NAME
from storage_initializer.store.fsutil import (
    READ_ONLY_DIR,
    WRITABLE_FILE,
    read_state_text,
    remove_path,
    unlink_planted_link,
)
from storage_initializer.store.layout import Entry
from storage_initializer.store.marker import write_atomic
from storage_initializer.store.reuse import reflink_or_copy

log = logging.getLogger(__name__)


def _points_into(link: Path, directory: Path) -> bool:
    try:
        target = os.readlink(link)
    except OSError:
        return False
    return os.path.dirname(os.path.normpath(target)) == str(directory.parent) or target.startswith(
        str(directory.parent) + os.sep
    )


POINTER_NAME = "link.json"


def pointer(dest: Path) -> Path:
    """DEST's note of which cache entry it was populated from: with hard links or copies
    nothing else in DEST leads back to the entry (``status`` and ``verify`` need it)."""
    return dest / STATE_DIR_NAME / POINTER_NAME


def read_pointer(dest: Path) -> dict[str, str] | None:
    """DEST's note, or None when there is none or it is not one we wrote. It sits in DEST's
    group-writable state directory and tells ``status`` and ``verify --repair`` which entry to
    work on, so it must name an absolute, normalised directory path; a link in its place is
    not read."""
    try:
        data = json.loads(read_state_text(pointer(dest)))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as exc:
        log.warning("ignoring %s: %s (delete it)", pointer(dest), _why(exc))
        return None
    entry = data.get("entry") if isinstance(data, dict) else None
    fields_ok = isinstance(data, dict) and all(
        isinstance(data.get(name, ""), str) for name in ("key", "link_mode")
    )
    if (
        not fields_ok
        or not isinstance(entry, str)
        or not entry.startswith("/")
        or os.path.normpath(entry) != entry
        or "\0" in entry
    ):
        log.warning("ignoring %s: it does not name a cache entry (delete it)", pointer(dest))
        return None
    return data


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return "it is a symbolic link" if exc.errno == errno.ELOOP else str(exc.strerror)
    return "it is not valid JSON"


def populate(
    entry: Entry, dest: Path, items: list[str], mode: str, replace: bool, private: bool = False
) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    if private:
        mode = "private"
    wanted = set(items)
    for name in sorted(os.listdir(dest)):
        if name in wanted or name in (STATE_DIR_NAME, "lost+found"):
            continue
        path = dest / name
        # Links into the same cache from an earlier version are ours to remove.
        if (path.is_symlink() and _points_into(path, entry.root)) or replace:
            remove_path(path)
        else:
            raise DestinationError(
                f"{dest} already holds {name!r}, which is not part of the model",
                "Use an empty destination, or pass --replace to remove what is there",
            )
    for name in sorted(wanted):
        source = entry.root / name
        target = dest / name
        if mode != "symlink" and target.is_symlink():
            # A link into the cache from an earlier symlink-mode pull: copying or linking
            # *through* it would write into the cache itself.
            target.unlink()
        if mode == "symlink":
            _symlink(source, target, replace)
        elif source.is_dir():
            _tree(source, target, mode)
        else:
            _file(source, target, mode)
    note = {"entry": str(entry.root), "key": entry.key, "link_mode": mode}
    if read_pointer(dest) != note:
        unlink_planted_link(pointer(dest).parent, "the state directory")
        pointer(dest).parent.mkdir(exist_ok=True)
        write_atomic(pointer(dest), json.dumps(note) + "\n")


def _symlink(source: Path, target: Path, replace: bool) -> None:
    if target.is_symlink() and os.readlink(target) == str(source):
        return
    if (target.exists() or target.is_symlink()) and not (target.is_symlink() or replace):
        raise DestinationError(
            f"{target} exists and is not a link to the cached model",
            "Use an empty destination, or pass --replace",
        )
    tmp = target.with_name(f".{target.name}.{os.getpid()}.link")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(source, tmp)
    if target.is_dir() and not target.is_symlink():
        remove_path(target)
    os.replace(tmp, target)


_warned_copy = False


def _file(source: Path, target: Path, mode: str) -> None:
    global _warned_copy
    if target.exists() and not target.is_symlink():
        same = os.stat(source)
        have = os.stat(target)
        if (mode == "hardlink" and same.st_ino == have.st_ino) or (
            mode in ("copy", "private")
            and same.st_size == have.st_size
            and same.st_ino != have.st_ino
        ):
            return
        remove_path(target)
    if mode == "private":
        if target.is_symlink():
            target.unlink()
        reflink_or_copy(source, target)
        os.chmod(target, WRITABLE_FILE)
        return
    if mode == "hardlink":
        try:
            os.link(source, target)
            return
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            if not _warned_copy:
                log.warning(
                    "cannot hard-link from the cache into %s (%s); copying instead",
                    target.parent,
                    exc.strerror,
                )
                _warned_copy = True
    shutil.copyfile(source, target)
    shutil.copymode(source, target)


def _tree(source: Path, target: Path, mode: str) -> None:
    for dirpath, dirnames, filenames in os.walk(source):
        relative = os.path.relpath(dirpath, source)
        out_dir = target / relative if relative != "." else target
        out_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(PermissionError):
            os.chmod(out_dir, 0o2775 if mode == "private" else 0o755)
        for name in filenames:
            _file(Path(dirpath) / name, out_dir / name, mode)
        dirnames.sort()
    read_only = (os.stat(source).st_mode & 0o222) == 0
    if read_only and mode != "private":
        for dirpath, _d, _f in os.walk(target, topdown=False):
            with contextlib.suppress(PermissionError):
                os.chmod(dirpath, READ_ONLY_DIR)
