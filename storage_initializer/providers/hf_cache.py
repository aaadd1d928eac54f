"""Offline (``HF_HUB_OFFLINE=1``): a model served from huggingface_hub's own cache.

One job: list and read a snapshot of ``HF_HUB_CACHE`` (``models--owner--name/snapshots/<commit>``,
whose files are symlinks to blobs named after their sha256 or git blob id) without a request, as
huggingface_hub does offline. Mixed into :class:`~storage_initializer.providers.hf.HfSource`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

from storage_initializer.blocks import BLOCK
from storage_initializer.errors import SourceError
from storage_initializer.paths import safe_relpath
from storage_initializer.providers.base import Listing, RemoteFile, read_local_range
from storage_initializer.providers.hf_uri import COMMIT_RE

if TYPE_CHECKING:
    from storage_initializer.providers.hf_uri import HubRef
    from storage_initializer.uri import SourceUri


def _hub_cache() -> str:
    """huggingface_hub's cache directory, from the environment as it is now (its constants were
    computed at import, possibly before the caller changed the environment)."""
    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return os.path.expanduser(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"])
    if env.get("HF_HOME"):
        return os.path.join(os.path.expanduser(env["HF_HOME"]), "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


class HfCache:
    """Listing and reading huggingface_hub's cache, for
    :class:`~storage_initializer.providers.hf.HfSource`."""

    uri: SourceUri
    ref: HubRef
    commit: str | None
    #: Set when serving from huggingface_hub's cache (offline): the snapshot directory.
    _snapshot_dir: str | None

    def _list_offline(self) -> Listing:
        cache = _hub_cache()
        folder = os.path.join(
            cache, f"{self.ref.repo_type}s--" + self.ref.repo_id.replace("/", "--")
        )
        revision = self.ref.revision
        commit = revision if COMMIT_RE.match(revision) else None
        if commit is None:
            try:
                with open(os.path.join(folder, "refs", revision), encoding="utf-8") as handle:
                    commit = handle.read().strip()
            except OSError:
                commit = None
        snapshot = os.path.join(folder, "snapshots", commit) if commit else ""
        base = os.path.join(snapshot, self.ref.subpath) if self.ref.subpath else snapshot
        if not commit or not os.path.isdir(snapshot) or not os.path.exists(base):
            raise SourceError(
                f"{self.uri.redacted}: HF_HUB_OFFLINE is set and revision {revision!r} is not in "
                f"the local Hugging Face cache {cache}",
                "Unset HF_HUB_OFFLINE to download it, or pre-populate HF_HUB_CACHE",
            )
        files: list[RemoteFile] = []
        if os.path.isfile(base):
            files.append(self._cached_file(base, os.path.basename(base)))
        for root, _dirs, names in os.walk(base, followlinks=True):
            for name in names:
                full = os.path.join(root, name)
                files.append(self._cached_file(full, os.path.relpath(full, base)))
        self.commit = commit
        self._snapshot_dir = base if os.path.isdir(base) else os.path.dirname(base)
        return Listing(files=files, fingerprint=commit)

    @staticmethod
    def _cached_file(full: str, relative: str) -> RemoteFile:
        # Cache entries are symlinks to blobs named after the ETag: the sha256 of LFS files.
        blob = os.path.basename(os.path.realpath(full))
        checksums = {"sha256": blob} if re.fullmatch(r"[0-9a-f]{64}", blob) else {}
        relative = relative.replace(os.sep, "/")
        return RemoteFile(
            path=safe_relpath(relative, "cached file"),
            size=os.path.getsize(full),
            checksums=checksums,
            version=blob,
            handle=relative,
        )

    def _read_cached(self, file: RemoteFile, start: int, end: int | None) -> Iterator[bytes]:
        assert self._snapshot_dir is not None
        path = os.path.join(self._snapshot_dir, file.handle)
        return read_local_range(path, start, end, BLOCK)
