"""Filesystem helpers shared by the store: removal of read-only trees, permissions, fsync."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

READ_ONLY_FILE = 0o444
READ_ONLY_DIR = 0o555
#: Writable mode is group-writable, so a model server with another UID of the pod's group
#: (fsGroup) can write next to the model (caches, compiled kernels).
WRITABLE_FILE = 0o664
WRITABLE_DIR = 0o2775


def remove_tree(path: Path) -> None:
    """Remove a tree even when we made it read-only."""

    def make_writable_and_retry(func: Callable[[str], object], target: str, _exc: object) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(target), 0o700)
            # Never a file: it may be hard-linked from other versions and entries (content
            # reuse), which would change mode with it; unlinking needs only the directory.
            if os.path.isdir(target) and not os.path.islink(target):
                os.chmod(target, 0o700)
        func(target)

    if path.is_symlink() or path.is_file():
        with contextlib.suppress(OSError):
            os.chmod(path.parent, 0o700)
        path.unlink()
        return
    if path.exists():
        # os.walk lists a link to a directory among ``dirs`` (without descending into it):
        # chmod would follow it and change the mode of a directory outside the tree.
        for root, dirs, _files in os.walk(path):
            for name in dirs:
                full = os.path.join(root, name)
                if not os.path.islink(full):
                    with contextlib.suppress(OSError):
                        os.chmod(full, 0o700)
        with contextlib.suppress(OSError):
            os.chmod(path, 0o700)
        shutil.rmtree(path, onerror=make_writable_and_retry)


def read_state_text(path: Path) -> str:
    """Read one of our state files without following a symbolic link (``ELOOP`` when it is
    one): the state directory is group-writable, so a link there is planted, not ours."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, encoding="utf-8", errors="replace") as handle:
        return handle.read()


def append_state_line(path: Path, line: str) -> None:
    """Append one line to a state journal, never through a symbolic link planted in its
    place (it would append to whatever file the link names, with our privileges)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o664)
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)


def unlink_planted_link(
    path: Path, what: str, why: str = "which storage-initializer never creates"
) -> bool:
    """Remove ``path`` when it is a symbolic link (the link itself, never what it names),
    saying what was found; True when it was one. Our state files and directories are never
    links: one there was planted by another process of the pod's group."""
    try:
        target = os.readlink(path)
    except OSError:
        return False  # absent, or not a link
    log.warning(
        "%s %s is a symbolic link to %s, %s; removing the link, not its target. If this "
        "repeats, find what writes there and delete %s",
        what,
        path,
        target,
        why,
        path,
    )
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return True


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        remove_tree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def set_file_modes(root: Path, read_only: bool) -> None:
    """Files first (in staging, before they become visible). Links are left alone and not
    followed; the directory listing says what each entry is, so a model of many files costs
    one ``chmod`` a file, not an ``lstat`` as well."""
    mode = READ_ONLY_FILE if read_only else WRITABLE_FILE
    pending = [str(root)]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                elif not entry.is_symlink():
                    os.chmod(entry.path, mode)


def set_dir_modes(paths: list[Path], read_only: bool) -> None:
    """Directories last (a read-only directory cannot be renamed into place)."""
    mode = READ_ONLY_DIR if read_only else WRITABLE_DIR
    for top in paths:
        if not top.is_dir() or top.is_symlink():
            continue
        for dirpath, _dirs, _files in os.walk(top, topdown=False):
            with contextlib.suppress(PermissionError):
                os.chmod(dirpath, mode)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_writable_dir(path: Path) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and os.access(path, os.W_OK | os.X_OK)
