"""Local paths and ``file://`` URIs: copy a file or a directory tree.

Unlike the stock initializer, which symlinks local sources, we copy them (verified, read-only,
behind a marker) so that the result does not change when the source does. ``/mnt/pvc/...`` keeps
the stock behaviour (links; see pulling.pvc.link_pvc).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from storage_initializer.blocks import BLOCK
from storage_initializer.errors import AccessDeniedError, NotFoundError
from storage_initializer.providers.base import (
    Listing,
    RemoteFile,
    Source,
    fingerprint_of,
    read_local_range,
)


class LocalSource(Source):
    default_workers = 4

    @property
    def path(self) -> Path:
        raw = self.uri.raw
        return Path(raw[len("file://") :] if raw.startswith("file://") else raw).absolute()

    def list(self) -> Listing:
        root = self.path
        if not root.exists():
            raise NotFoundError(f"local path {self.uri.redacted} does not exist")
        if not os.access(root, os.R_OK):
            raise AccessDeniedError(f"local path {self.uri.redacted} is not readable")
        if root.is_file():
            files = [self._file(root, root.name)]
        else:
            files = []
            for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
                dirnames.sort()
                for name in sorted(filenames):
                    full = Path(dirpath) / name
                    if full.is_file():
                        files.append(self._file(full, full.relative_to(root).as_posix()))
        return Listing(files, fingerprint_of(files))

    @staticmethod
    def _file(full: Path, relative: str) -> RemoteFile:
        st = full.stat()
        return RemoteFile(relative, st.st_size, {}, f"{st.st_mtime_ns}:{st.st_size}", str(full))

    def read(self, file: RemoteFile, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        try:
            yield from read_local_range(file.handle, start, end, BLOCK)
        except FileNotFoundError:
            raise NotFoundError(f"{file.path} disappeared from {self.uri.redacted}") from None
