"""The provider interface: what a storage backend must offer to the engine and the store.

A provider knows one kind of URI. It lists what the URI names, as :class:`RemoteFile` items with
relative paths, sizes and whatever checksums the backend keeps, and it streams byte ranges of
those files. It knows nothing of locks, staging or markers (the store) and nothing of threads
and retries (the engine): it raises :class:`~storage_initializer.errors.TransientError` for
failures worth retrying and another :class:`~storage_initializer.errors.InitializerError` for
the rest.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from storage_initializer import cpus
from storage_initializer.blocks import BLOCK

if TYPE_CHECKING:
    from storage_initializer.settings import Settings
    from storage_initializer.uri import SourceUri


@dataclass(frozen=True)
class RemoteFile:
    """One file of the model as the source describes it."""

    #: Relative POSIX path inside the model directory ("config.json", "shards/00001.bin").
    path: str
    #: Size in bytes; ``None`` only when the source cannot tell (then no ranged/parallel reads).
    size: int | None
    #: Algorithm -> lowercase hex digest, as announced by the source (see checksums.PREFERENCE).
    checksums: Mapping[str, str] = field(default_factory=dict)
    #: What changes when the content changes: ETag, generation, LFS oid, Last-Modified.
    version: str = ""
    #: Provider-private reference (object key, blob name, URL); never logged.
    handle: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Listing:
    files: list[RemoteFile]
    #: The version of the whole source: a commit, or a digest over the files' versions.
    fingerprint: str


def read_local_range(path: str, start: int, end: int | None, block: int = BLOCK) -> Iterator[bytes]:
    """Bytes ``[start, end)`` of a local file in bounded blocks (local sources, offline caches)."""
    with open(path, "rb") as handle:
        handle.seek(start)
        left = None if end is None else end - start
        while left is None or left > 0:
            data = handle.read(block if left is None else min(block, left))
            if not data:
                return
            if left is not None:
                left -= len(data)
            yield data


def is_true(value: str | None) -> bool:
    """A boolean environment variable as the hub clients read theirs (huggingface_hub,
    modelscope): ``1``, ``true``, ``yes``, ``on`` or ``y``, any case. (The stock initializer's
    own S3 flags accept exactly ``true``: see providers/s3.py.)"""
    return (value or "").strip().lower() in ("1", "true", "yes", "on", "y")


def fingerprint_of(files: list[RemoteFile]) -> str:
    """A stable digest of a listing: changes when any path, size or version changes."""
    digest = hashlib.sha256()
    for item in sorted(files, key=lambda f: f.path):
        digest.update(f"{item.path}\0{item.size}\0{item.version}\n".encode())
    return "sha256:" + digest.hexdigest()[:32]


class Source(ABC):
    """A model source for one URI."""

    #: Parallel requests that suit this backend when the user does not say (--workers). A class
    #: attribute, which an instance may replace (HDFS's configured n_threads).
    default_workers: int = 8
    #: Whether :meth:`read` honours ``start``/``end`` (enables chunked parallel reads and resume).
    supports_ranges: ClassVar[bool] = True
    #: Whether a source holding one archive is extracted (the stock initializer does it for
    #: object stores, HTTP and local paths; never for repositories such as Hugging Face).
    extract_single_archive: ClassVar[bool] = True

    def __init__(self, uri: SourceUri, settings: Settings) -> None:
        self.uri = uri
        self.settings = settings

    @abstractmethod
    def list(self) -> Listing:
        """Everything the URI names, with paths relative to the model directory."""

    @abstractmethod
    def read(self, file: RemoteFile, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Stream bytes ``[start, end)`` of ``file`` (``end=None``: to the end)."""

    def workers(self) -> int:
        """Parallel requests for this pull: ``--workers``, else the backend's default capped by
        the CPUs this process may use (see :mod:`storage_initializer.cpus`)."""
        chosen = getattr(getattr(self, "settings", None), "workers", 0)
        return chosen or cpus.default_workers(self.default_workers)

    def local_path(self) -> str | None:
        """For sources already on a mounted volume: the path to link instead of copying."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook, most providers hold nothing
        """Release connections; called once when the pull is over."""
