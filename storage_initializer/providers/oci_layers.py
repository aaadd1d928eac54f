"""The layers of an ``oci://`` image: stream each blob through tar into scratch, merge the tree.

One job: turn a tar layer of the registry into files under a private scratch directory and into
entries of the merged ``models/`` tree, applying layers in order as an overlay (whiteouts delete
what they name), verifying each blob's size and sha256 while it streams (a broken or corrupt
transfer is retried), and holding every member to the archive policy of
:mod:`storage_initializer.archive` (budget, ``data`` filter, no special files). Split out of
:mod:`.oci`, which decides which layers to read and lists the merged tree.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import shutil
import tarfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import requests

from storage_initializer import archive
from storage_initializer.blocks import BLOCK
from storage_initializer.errors import IntegrityError, SourceError, TransientError
from storage_initializer.paths import UnsafePathError, safe_relpath
from storage_initializer.providers import httpcommon
from storage_initializer.providers.oci_registry import (
    ATTEMPTS,
    DIGEST_RE,
    RegistryClient,
    reason,
)
from storage_initializer.providers.scratch import parents

log = logging.getLogger(__name__)

MODELS_PREFIX = "models/"
#: Layer media type → tarfile streaming mode (as in the stock initializer).
LAYER_MODES = {
    "application/vnd.oci.image.layer.v1.tar+gzip": "r|gz",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "r|gz",
    "application/vnd.oci.image.layer.v1.tar": "r|",
}
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


class _HashingReader:
    """A file object over a response body that hashes and counts what passes through it."""

    def __init__(self, raw: IO[bytes], limit: int) -> None:
        self.raw = raw
        self.digest = hashlib.sha256()
        self.count = 0
        self.limit = limit

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = BLOCK
        data = self.raw.read(size)
        if data:
            self.count += len(data)
            if self.count > self.limit:
                raise _Oversized()
            self.digest.update(data)
        return data

    def drain(self) -> None:
        while self.read(BLOCK):
            pass


class _Oversized(Exception):
    pass


@dataclass
class Node:
    """One path of the merged models/ tree."""

    kind: str  # "file", "dir", "symlink", "hardlink"
    layer: int
    size: int = 0
    sha256: str = ""
    local: str = ""
    target: str = ""


@dataclass
class Tree:
    nodes: dict[str, Node] = field(default_factory=dict)

    def remove(self, path: str, below_only: bool = False) -> None:
        prefix = path + "/" if path else ""
        for name in [
            n for n in self.nodes if n.startswith(prefix) or (n == path and not below_only)
        ]:
            del self.nodes[name]


class LayerExtractor:
    """Extracts the layers of one image into ``scratch`` (``layer-<index>/`` each)."""

    def __init__(self, registry: RegistryClient, settings: Any, redacted: str, scratch: Path):
        self.registry = registry
        self.settings = settings
        self.redacted = redacted
        self._scratch = scratch

    def extract(self, index: int, layer: Mapping[str, Any], tree: Tree, seen: set[str]):
        """Fetch and unpack one tar layer (retried whole), then apply it over ``tree``."""
        digest = str(layer.get("digest", ""))
        size = layer.get("size")
        mode = LAYER_MODES[str(layer.get("mediaType"))]
        if not DIGEST_RE.match(digest) or not isinstance(size, int) or size < 0:
            raise SourceError(f"{self.redacted}: layer {index} has no valid digest or size")
        what = f"{self.redacted}: layer {digest}"
        assert self._scratch is not None
        root = self._scratch / f"layer-{index}"
        for attempt in range(1, ATTEMPTS + 1):
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            try:
                entries, whiteouts = self._stream_layer(digest, size, mode, index, root, seen, what)
                break
            except (TransientError, IntegrityError) as exc:
                if attempt == ATTEMPTS:
                    raise
                delay = httpcommon.backoff_delay(exc, attempt)  # the registry's Retry-After
                log.warning(
                    "%s; retrying the layer in %.1fs (attempt %d of %d)",
                    exc,
                    delay,
                    attempt + 1,
                    ATTEMPTS,
                )
                time.sleep(delay)
        for path, opaque in whiteouts:
            tree.remove(path, below_only=opaque)
        for path, node in entries:
            if node.kind != "dir" or tree.nodes.get(path, Node("x", -1)).kind != "dir":
                tree.remove(path)
            for parent in parents(path):
                if parent in tree.nodes and tree.nodes[parent].kind != "dir":
                    del tree.nodes[parent]  # a file of a lower layer replaced by a directory
            tree.nodes[path] = node

    def _stream_layer(
        self,
        digest: str,
        size: int,
        mode: str,
        index: int,
        root: Path,
        seen: set[str],
        what: str,
    ) -> tuple[list[tuple[str, Node]], list[tuple[str, bool]]]:
        """Stream one blob through tar, verifying its digest; write models/ files to ``root``."""
        entries: list[tuple[str, Node]] = []
        whiteouts: list[tuple[str, bool]] = []
        response = self.registry.get(f"{self.registry.ref.repository}/blobs/{digest}", {}, what)
        with response:
            reader = _HashingReader(response.raw, size)
            budget = archive.Budget(size, archive.Limits.from_settings(self.settings), what)
            try:
                with tarfile.open(fileobj=reader, mode=mode) as tar:  # type: ignore[call-overload]
                    for member in tar:
                        budget.member()
                        if member.isreg():
                            # A tar member is exactly its announced size, so it is counted
                            # before it is read, and a bomb refused before a byte is written.
                            budget.spend(member.size)
                        self._member(tar, member, index, root, seen, entries, whiteouts)
                reader.drain()
            except _Oversized:
                raise IntegrityError(f"{what}: the blob is larger than its {size} bytes") from None
            except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
                if isinstance(exc, OSError) and exc.errno is not None:
                    raise
                if reader.count < size:
                    raise TransientError(f"{what}: the transfer broke ({exc})") from None
                raise IntegrityError(f"{what}: the layer is not a valid tar ({exc})") from None
            except requests.exceptions.RequestException as exc:
                raise TransientError(f"{what}: the transfer broke ({reason(exc)})") from None
        got = "sha256:" + reader.digest.hexdigest()
        if reader.count != size:
            raise TransientError(f"{what}: got {reader.count} of {size} bytes")
        if got != digest:
            raise IntegrityError(f"{what}: the blob's sha256 is {got}, not the manifest's digest")
        return entries, whiteouts

    def _member(
        self,
        tar: tarfile.TarFile,
        member: tarfile.TarInfo,
        index: int,
        root: Path,
        seen: set[str],
        entries: list[tuple[str, Node]],
        whiteouts: list[tuple[str, bool]],
    ) -> None:
        name = _normalise(member.name)
        if not name:
            return
        seen.add(name.split("/", 1)[0])
        base = posixpath.basename(name)
        parent = posixpath.dirname(name)
        if base.startswith(WHITEOUT):
            # A whiteout hides a path of the layers below; an opaque one, a directory's content.
            hidden = parent if base == OPAQUE else posixpath.join(parent, base[len(WHITEOUT) :])
            if hidden in ("", "models") or "models".startswith(hidden + "/"):
                whiteouts.append(("", base == OPAQUE and hidden == "models"))
            elif hidden.startswith(MODELS_PREFIX):
                whiteouts.append((safe_relpath(hidden[len(MODELS_PREFIX) :]), base == OPAQUE))
            return
        if not name.startswith(MODELS_PREFIX):
            return
        rel = safe_relpath(name[len(MODELS_PREFIX) :], "image file")
        archive.check_tar_member(member, root, self.redacted)
        if member.isdir():
            entries.append((rel, Node("dir", index)))
        elif member.isreg():
            target = root / rel
            if target.is_dir():
                raise UnsafePathError(f"{self.redacted}: {rel!r} is both a file and a directory")
            target.unlink(missing_ok=True)  # a path may occur twice in a layer: the last wins
            stream = tar.extractfile(member)
            assert stream is not None
            with stream:
                done = archive.write_member(stream, target, None, sync=False)
            entries.append((rel, Node("file", index, done.size, done.sha256, str(target))))
        elif member.issym():
            if member.linkname.startswith("/"):
                raise UnsafePathError(
                    f"{self.redacted}: the link models/{rel} points to the absolute path "
                    f"{member.linkname!r}"
                )
            entries.append((rel, Node("symlink", index, target=member.linkname)))
        elif member.islnk():
            linked = _normalise(member.linkname)
            if not linked.startswith(MODELS_PREFIX):
                raise UnsafePathError(
                    f"{self.redacted}: the hard link models/{rel} points outside models/"
                )
            entries.append((rel, Node("hardlink", index, target=linked[len(MODELS_PREFIX) :])))
        else:
            raise UnsafePathError(
                f"{self.redacted}: models/{rel} is a device, FIFO or other special file"
            )


def _normalise(name: str) -> str:
    """Tar member names as a path: no leading "./" or "/", no trailing "/"."""
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/").rstrip("/")
