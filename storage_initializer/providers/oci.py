"""OCI images and artifacts in fetch mode (``oci://registry/repo[:tag|@sha256:…]``).

Why the registry HTTP API v2 through requests rather than oras-py: we need to tell a missing
image from refused credentials from an unreachable registry (oras-py turns most of these into
one generic error), to verify every blob's sha256 while it streams, to bound what we read, and to
keep credentials out of every message; the API is four requests (``/v2/`` challenge, token,
manifest, blob), and requests is already a core dependency, so the ``oci`` extra adds nothing.

Behaviour of the stock initializer kept here (kserve_storage ``_download_oci``):

* an image index (OCI index or Docker manifest list) resolves to the first manifest for
  ``linux/<GOARCH of this machine>``; none → an error naming the platform;
* layers whose media type is a tar (``…layer.v1.tar``, ``…tar+gzip``, Docker's
  ``rootfs.diff.tar.gzip``) are read as tar streams and only members under ``models/`` are kept,
  with that prefix removed; zstd layers are refused with an actionable message; other layers
  (configs, attestations, plain-file artifacts) are skipped; nothing under ``models/`` in any
  layer → an error listing the top-level entries found;
* credentials come from the docker ``config.json`` named by ``KSERVE_OCI_DOCKER_CONFIG``
  (default ``/mnt/oci-fetch-auth/config.json``; missing → anonymous), looked up by
  ``host:port``, ``https://host:port`` and ``host``; ``KSERVE_OCI_INSECURE_REGISTRY=true`` talks
  plain HTTP to the registry.

What we add: every blob's size and sha256 digest is checked against the manifest while it
streams (a mismatch is retried, then reported), a manifest fetched by digest is checked against
that digest, and the image manifest's digest is the source's fingerprint. Layers are applied in
order as an overlay: a later layer's file replaces an earlier one, and OCI whiteouts
(``.wh.<name>``, ``.wh..wh..opq``) delete what they name (the stock initializer writes them as
files). Links inside ``models/`` become copies of their target; links that leave it, devices and
FIFOs are refused. Bearer-token registries (``WWW-Authenticate: Bearer realm=…``) are handled
with the same credentials, as well as basic-auth ones.

How: each tar layer is streamed once, extracted on the fly into a private scratch directory under
``$TMPDIR`` (each file hashed with sha256 while written), and the merged tree is presented as the
listing with those checksums, so the engine copies and verifies it into staging like any source.
The scratch directory is removed on :meth:`close`.

Code layout, one job per module: :mod:`.oci_registry` (the reference, docker ``config.json``
credentials, the HTTP API with its basic/bearer challenge, error mapping), :mod:`.oci_manifest`
(manifest fetch and check, index → platform manifest), :mod:`.oci_layers` (stream, verify and
unpack each tar layer, whiteouts, the merged tree); this module picks the layers and lists the
merged tree (links become copies); :mod:`.scratch` reads the copies and removes them.

A layer is an archive like any other, under the policy of :mod:`storage_initializer.archive`: its
members and expanded bytes (every member's, kept or not: decompressing is the cost) count against
the same budget as a downloaded ``.tar.gz`` (``STORAGE_INITIALIZER_ARCHIVE_*``, ``--max-size``),
and every member kept passes the standard library's tar ``data`` filter.
"""

from __future__ import annotations

import builtins
import logging
import posixpath
import tempfile
from pathlib import Path
from typing import Any, ClassVar

from storage_initializer.errors import (
    InitializerError,
    NotFoundError,
    SourceError,
    UsageError,
)
from storage_initializer.paths import UnsafePathError
from storage_initializer.providers.base import Listing, RemoteFile
from storage_initializer.providers.oci_layers import LAYER_MODES, LayerExtractor, Node, Tree
from storage_initializer.providers.oci_manifest import detect_goarch, pick_platform, resolve
from storage_initializer.providers.oci_registry import (
    RegistryClient,
    docker_credentials,
    parse_reference,
)
from storage_initializer.providers.scratch import MAX_LINK_HOPS, ScratchSource

log = logging.getLogger(__name__)


class OciSource(ScratchSource):
    """The ``models/`` tree of an image's layers, extracted once into local scratch space."""

    default_workers = 4
    supports_ranges: ClassVar[bool] = True

    def __init__(self, uri: Any, settings: Any) -> None:
        super().__init__(uri, settings)
        self.ref = parse_reference(uri.raw)
        self.registry = RegistryClient(self.ref)

    # -- Source -------------------------------------------------------------------------------

    def list(self) -> Listing:
        self.close()
        manifest, digest = resolve(self.registry, self.uri.redacted)
        layers = manifest.get("layers")
        if not isinstance(layers, list):
            raise SourceError(f"{self.uri.redacted}: the manifest {digest} lists no layers")
        self._scratch = Path(tempfile.mkdtemp(prefix="storage-initializer-oci-"))
        try:
            return self._extract_all(layers, digest)
        except BaseException:
            self.close()  # a failed listing leaves nothing behind in $TMPDIR
            raise

    def _extract_all(self, layers: builtins.list[Any], digest: str) -> Listing:
        tree = Tree()
        seen: set[str] = set()
        assert self._scratch is not None
        extractor = LayerExtractor(self.registry, self.settings, self.uri.redacted, self._scratch)
        for index, layer in enumerate(layers):
            media_type = str(layer.get("mediaType", "")) if isinstance(layer, dict) else ""
            if media_type not in LAYER_MODES:
                if media_type.endswith("+zstd"):
                    raise UsageError(
                        f"{self.uri.redacted}: layer media type {media_type!r} is "
                        "zstd-compressed, which this initializer cannot decompress",
                        "Rebuild the model image with gzip-compressed (or uncompressed) layers",
                    )
                log.debug("%s: skipping layer %d of type %s", self.uri.redacted, index, media_type)
                continue
            log.info(
                "%s: fetching layer %d/%d %s (%s bytes)",
                self.uri.redacted,
                index + 1,
                len(layers),
                layer.get("digest"),
                layer.get("size"),
            )
            extractor.extract(index, layer, tree, seen)
        files = self._files(tree)
        if not files:
            raise NotFoundError(
                f"{self.uri.redacted}: the image has no files under /models/ (this source expects "
                f"a modelcar layout); top-level entries across all layers: {sorted(seen)[:10]}"
            )
        log.info("%s is %s: %d files under models/", self.uri.redacted, digest, len(files))
        return Listing(files, digest)

    def _files(self, tree: Tree) -> builtins.list[RemoteFile]:
        files: dict[str, RemoteFile] = {}
        for path, node in tree.nodes.items():
            if node.kind == "file":
                files[path] = RemoteFile(
                    path, node.size, {"sha256": node.sha256}, node.sha256, node.local
                )
        for path, node in sorted(tree.nodes.items()):
            if node.kind in ("symlink", "hardlink"):
                for name, found in self._follow(path, node, tree).items():
                    files.setdefault(
                        name,
                        RemoteFile(name, found.size, found.checksums, found.version, found.handle),
                    )
        return sorted(files.values(), key=lambda f: f.path)

    def _follow(self, path: str, node: Node, tree: Tree) -> dict[str, RemoteFile]:
        """Files a link stands for (one file, or a directory's files under the link's name)."""
        current, current_node = path, node
        for _hop in range(MAX_LINK_HOPS):
            if current_node.kind == "hardlink":
                joined = posixpath.normpath(current_node.target)
            else:
                joined = posixpath.normpath(
                    posixpath.join(posixpath.dirname(current), current_node.target)
                )
            if joined in ("..", ".") or joined.startswith("../"):
                raise UnsafePathError(
                    f"{self.uri.redacted}: the link models/{path} points outside models/"
                )
            target = tree.nodes.get(joined)
            if target is None:
                raise UnsafePathError(
                    f"{self.uri.redacted}: the link models/{path} points to models/{joined}, "
                    "which the image does not hold"
                )
            if target.kind == "file":
                return {
                    path: RemoteFile(
                        path, target.size, {"sha256": target.sha256}, target.sha256, target.local
                    )
                }
            if target.kind == "dir":
                prefix = joined + "/"
                return {
                    path + "/" + name[len(prefix) :]: RemoteFile(
                        path + "/" + name[len(prefix) :],
                        n.size,
                        {"sha256": n.sha256},
                        n.sha256,
                        n.local,
                    )
                    for name, n in tree.nodes.items()
                    if name.startswith(prefix) and n.kind == "file"
                }
            current, current_node = joined, target
        raise UnsafePathError(f"{self.uri.redacted}: the link models/{path} is a loop")

    def close(self) -> None:
        self.registry.close()
        super().close()


__all__ = [
    "InitializerError",
    "OciSource",
    "detect_goarch",
    "docker_credentials",
    "parse_reference",
    "pick_platform",
]
