"""Sources whose files are made locally first, in a private scratch directory under ``$TMPDIR``.

git and ``oci://`` cannot read a byte range of one remote file: git receives a pack, an image a
tar layer. Both write the model's files into a scratch directory while listing (hashing each),
list those copies, and read them back from there; the directory goes on :meth:`close`. This
module is that shared part, so the two providers do not each carry a copy of it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from storage_initializer.blocks import BLOCK
from storage_initializer.errors import TransientError
from storage_initializer.providers.base import RemoteFile, Source, read_local_range

#: Links (symbolic, or hard in a layer) followed in a row before we call it a loop.
MAX_LINK_HOPS = 40


class ScratchSource(Source):
    """A source whose listed files' handles are paths of local copies under ``_scratch``."""

    def __init__(self, uri: Any, settings: Any) -> None:
        super().__init__(uri, settings)
        self._scratch: Path | None = None

    def read(self, file: RemoteFile, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        try:
            yield from read_local_range(file.handle, start, end, BLOCK)
        except FileNotFoundError:
            raise TransientError(
                f"{self.uri.redacted}: the local copy of {file.path} disappeared"
            ) from None

    def close(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None


def parents(rel: str) -> Iterator[str]:
    """The directories above a relative path, outermost first (``a``, ``a/b`` for ``a/b/c``)."""
    parts = rel.split("/")[:-1]
    for index in range(1, len(parts) + 1):
        yield "/".join(parts[:index])
