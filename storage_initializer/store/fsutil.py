"""Filesystem helpers shared by the store: removal of read-only trees, permissions, fsync."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from pathlib import Path

READ_ONLY_FILE = 0o444
READ_ONLY_DIR = 0o555
#: Writable mode is group-writable, so a model server with another UID of the pod's group
#: (fsGroup) can write next to the model (caches, compiled kernels).
WRITABLE_FILE = 0o664
WRITABLE_DIR = 0o2775


def remove_tree(path: Path) -> None:
    """Remove a tree even when we made it read-only."""

    def make_writable_and_retry(func, target, _exc):  # type: ignore[no-untyped-def]
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
        for root, dirs, _files in os.walk(path):
            for name in dirs:
                with contextlib.suppress(OSError):
                    os.chmod(os.path.join(root, name), 0o700)
        with contextlib.suppress(OSError):
            os.chmod(path, 0o700)
        shutil.rmtree(path, onerror=make_writable_and_retry)


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        remove_tree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def set_file_modes(root: Path, read_only: bool) -> None:
    """Files first (in staging, before they become visible)."""
    mode = READ_ONLY_FILE if read_only else WRITABLE_FILE
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                os.chmod(full, mode)


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
