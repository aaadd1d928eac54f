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

A layer is an archive like any other, under the policy of :mod:`storage_initializer.archive`: its
members and expanded bytes (every member's, kept or not: decompressing is the cost) count against
the same budget as a downloaded ``.tar.gz`` (``STORAGE_INITIALIZER_ARCHIVE_*``, ``--max-size``),
and every member kept passes the standard library's tar ``data`` filter.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import platform
import posixpath
import re
import shutil
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar
from urllib.parse import urlencode

import requests

from storage_initializer import archive, tls
from storage_initializer.blocks import BLOCK
from storage_initializer.errors import (
    AccessDeniedError,
    InitializerError,
    IntegrityError,
    NotFoundError,
    SourceError,
    TransientError,
    UsageError,
)
from storage_initializer.paths import UnsafePathError, safe_relpath
from storage_initializer.providers import httpcommon
from storage_initializer.providers.base import Listing, RemoteFile, Source, read_local_range
from storage_initializer.redact import register_secret

log = logging.getLogger(__name__)

DOCKER_CONFIG_ENV = "KSERVE_OCI_DOCKER_CONFIG"
DEFAULT_DOCKER_CONFIG = "/mnt/oci-fetch-auth/config.json"
INSECURE_ENV = "KSERVE_OCI_INSECURE_REGISTRY"
MODELS_PREFIX = "models/"

INDEX_TYPES = frozenset(
    {
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
)
MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
#: Layer media type → tarfile streaming mode (as in the stock initializer).
LAYER_MODES = {
    "application/vnd.oci.image.layer.v1.tar+gzip": "r|gz",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "r|gz",
    "application/vnd.oci.image.layer.v1.tar": "r|",
}
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
MAX_MANIFEST = 4 << 20
TIMEOUT = (15, 60)
#: Attempts per layer when the transfer breaks or the digest does not match.
ATTEMPTS = 3
MAX_LINK_HOPS = 40
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_CHALLENGE_RE = re.compile(r'(\w+)="([^"]*)"')


def detect_goarch() -> str:
    """GOARCH of this machine, as OCI index platforms name it (the stock mapping)."""
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        machine, machine
    )


def pick_platform(manifests: list[Any], arch: str, os_name: str = "linux") -> dict[str, Any] | None:
    """The first index entry for ``os_name/arch`` (attestations say "unknown" and never match)."""
    for entry in manifests:
        if not isinstance(entry, dict):
            continue
        info = entry.get("platform") or {}
        if info.get("architecture") == arch and info.get("os") == os_name:
            return entry
    return None


@dataclass(frozen=True)
class Reference:
    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def reference(self) -> str:
        return self.digest or self.tag or "latest"


def parse_reference(raw: str) -> Reference:
    """``oci://host[:port]/repo/path[:tag][@sha256:…]`` → its parts (Docker Hub names too)."""
    target = raw[len("oci://") :] if raw.lower().startswith("oci://") else raw
    if not target:
        raise UsageError("the OCI reference is empty", "Write oci://registry/repository:tag")
    digest = None
    if "@" in target:
        target, _, digest = target.partition("@")
        if not _DIGEST_RE.match(digest):
            raise UsageError(
                f"oci://{target}@{digest}: the digest must be sha256:<64 lowercase hex>"
            )
    registry, sep, rest = target.partition("/")
    if not sep or not rest:
        raise UsageError(
            f"oci://{target} names no registry",
            "Write oci://registry.example.com/repository:tag (docker.io/library/x for Hub)",
        )
    # The first segment is always the registry, as in the stock initializer (a cluster-local
    # "registry/model" is not a Docker Hub name); docker.io is mapped to Hub's API host.
    tag = None
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        rest, _, tag = rest.rpartition(":")
    if registry == "docker.io":
        registry = "registry-1.docker.io"
        if "/" not in rest:
            rest = "library/" + rest
    if not re.match(r"^[a-z0-9]+(?:[._-]+[a-z0-9]+)*(?:/[a-z0-9]+(?:[._-]+[a-z0-9]+)*)*$", rest):
        raise UsageError(f"oci://{target}: {rest!r} is not a valid repository name")
    return Reference(registry, rest, tag, digest)


def docker_credentials(registry: str, path: str | None = None) -> tuple[str, str] | None:
    """(user, password) for ``registry`` from a docker config.json, or None (anonymous).

    Lookup keys as in the stock initializer (``host:port``, ``https://host:port``, ``host``),
    plus Docker Hub's historical key. A credential helper cannot run here: anonymous, as stock.
    """
    path = path or os.environ.get(DOCKER_CONFIG_ENV) or DEFAULT_DOCKER_CONFIG
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return None
    auths = config.get("auths") if isinstance(config, dict) else None
    if not isinstance(auths, dict):
        return None
    keys = [registry, f"https://{registry}", registry.split(":", 1)[0], f"http://{registry}"]
    if registry == "registry-1.docker.io":
        keys += ["docker.io", "https://index.docker.io/v1/", "index.docker.io"]
    entry = next((auths[k] for k in keys if isinstance(auths.get(k), dict)), None)
    if entry is None:
        return None
    user, password = entry.get("username"), entry.get("password")
    encoded = entry.get("auth")
    if isinstance(encoded, str) and encoded:
        try:
            user, _, password = base64.b64decode(encoded).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
    if not isinstance(user, str) or not isinstance(password, str) or not user:
        return None
    register_secret(password)
    register_secret(encoded if isinstance(encoded, str) else None)
    return user, password


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
class _Node:
    """One path of the merged models/ tree."""

    kind: str  # "file", "dir", "symlink", "hardlink"
    layer: int
    size: int = 0
    sha256: str = ""
    local: str = ""
    target: str = ""


@dataclass
class _Tree:
    nodes: dict[str, _Node] = field(default_factory=dict)

    def remove(self, path: str, below_only: bool = False) -> None:
        prefix = path + "/" if path else ""
        for name in [
            n for n in self.nodes if n.startswith(prefix) or (n == path and not below_only)
        ]:
            del self.nodes[name]


def _verify(session: requests.Session) -> None:
    session.verify = tls.requests_verify()


class OciSource(Source):
    """The ``models/`` tree of an image's layers, extracted once into local scratch space."""

    default_workers: ClassVar[int] = 4
    supports_ranges: ClassVar[bool] = True

    def __init__(self, uri: Any, settings: Any) -> None:
        super().__init__(uri, settings)
        self.ref = parse_reference(uri.raw)
        insecure = os.environ.get(INSECURE_ENV, "").strip().lower() in ("1", "true", "yes")
        self.base = f"{'http' if insecure else 'https'}://{self.ref.registry}/v2/"
        self.credentials = docker_credentials(self.ref.registry)
        self._sessions = httpcommon.SessionPool(_verify)
        self._auth: str | None = None
        self._lock = threading.Lock()
        self._scratch: Path | None = None

    # -- HTTP and authentication --------------------------------------------------------------

    def _send(self, url: str, headers: Mapping[str, str], what: str) -> requests.Response:
        try:
            return self._sessions.get().get(
                url, headers=dict(headers), stream=True, timeout=TIMEOUT, allow_redirects=True
            )
        except requests.exceptions.SSLError as exc:
            raise SourceError(
                f"{what}: TLS verification failed ({_reason(exc)})",
                "Trust the registry's CA with the global CA bundle (CA_BUNDLE_CONFIGMAP_NAME), "
                f"or set {INSECURE_ENV}=true for a plain-HTTP registry",
            ) from None
        except requests.exceptions.ConnectionError as exc:
            text = repr(exc)
            if any(m in text for m in ("refused", "Name or service", "NameResolution", "Errno -")):
                raise SourceError(
                    f"{what}: cannot connect to the registry {self.ref.registry} ({_reason(exc)})",
                    "Check the registry host and port, the network policy, and "
                    f"{INSECURE_ENV} for a plain-HTTP registry",
                ) from None
            raise TransientError(f"{what}: connection failed ({_reason(exc)})") from None
        except requests.exceptions.Timeout:
            raise TransientError(f"{what}: the registry did not answer in time") from None
        except requests.exceptions.RequestException as exc:
            raise SourceError(f"{what}: request failed ({_reason(exc)})") from None

    def _get(self, path: str, headers: Mapping[str, str], what: str) -> requests.Response:
        """GET below /v2/, answering a 401 challenge once (basic or bearer)."""
        url = self.base + path
        sent = dict(headers)
        if self._auth:
            sent["Authorization"] = self._auth
        response = self._send(url, sent, what)
        if response.status_code == 401:
            challenge = response.headers.get("WWW-Authenticate", "")
            response.close()
            with self._lock:
                self._auth = self._authorize(challenge, what)
            sent["Authorization"] = self._auth
            response = self._send(url, sent, what)
        self._raise_for_status(response, what)
        return response

    def _authorize(self, challenge: str, what: str) -> str:
        scheme, _, params_text = challenge.partition(" ")
        params = dict(_CHALLENGE_RE.findall(params_text))
        if scheme.lower() == "basic":
            if self.credentials is None:
                raise self._denied(what, 401)
            token = base64.b64encode(":".join(self.credentials).encode()).decode()
            register_secret(token)
            return f"Basic {token}"
        if scheme.lower() != "bearer" or "realm" not in params:
            raise SourceError(f"{what}: unsupported registry authentication {scheme!r}")
        query = {"service": params.get("service", "")}
        query["scope"] = params.get("scope") or f"repository:{self.ref.repository}:pull"
        url = params["realm"] + ("&" if "?" in params["realm"] else "?") + urlencode(query)
        auth = self.credentials
        try:
            response = self._sessions.get().get(url, auth=auth, timeout=TIMEOUT)
        except requests.exceptions.RequestException as exc:
            raise TransientError(f"{what}: the token service failed ({_reason(exc)})") from None
        with response:
            if response.status_code in (401, 403):
                raise self._denied(what, response.status_code)
            if response.status_code != 200:
                message = f"{what}: the token service answered {response.status_code}"
                raise httpcommon.status_error(response, message) or SourceError(message)
            try:
                body = response.json()
                token = body.get("token") or body.get("access_token")
            except (ValueError, AttributeError):
                token = None
        if not isinstance(token, str) or not token:
            raise SourceError(f"{what}: the token service sent no token")
        register_secret(token)
        return f"Bearer {token}"

    def _denied(self, what: str, code: int) -> AccessDeniedError:
        if self.credentials is None:
            return AccessDeniedError(
                f"{what}: the registry requires credentials ({code}) and none were found for "
                f"{self.ref.registry}",
                f"Mount a docker config.json with an 'auths' entry for {self.ref.registry} and "
                f"name it in {DOCKER_CONFIG_ENV} (KServe mounts it at {DEFAULT_DOCKER_CONFIG})",
            )
        return AccessDeniedError(
            f"{what}: the registry refused the credentials for {self.ref.registry} ({code})",
            f"Check the docker config.json named by {DOCKER_CONFIG_ENV} and the account's pull "
            "permission",
        )

    def _raise_for_status(self, response: requests.Response, what: str) -> None:
        code = response.status_code
        if code < 400:
            return
        detail = _registry_errors(response)
        response.close()
        if code in (401, 403):
            raise self._denied(what, code)
        if code == 404:
            raise NotFoundError(f"{what}: not found in {self.ref.registry}{detail}")
        message = f"{what}: the registry answered {code}{detail}"
        raise httpcommon.status_error(response, message) or SourceError(message)

    # -- manifests ----------------------------------------------------------------------------

    def _manifest(self, reference: str) -> tuple[dict[str, Any], str]:
        """The manifest, asked again on a transient failure (list() itself runs once)."""
        return httpcommon.with_backoff(lambda: self._fetch_manifest(reference), ATTEMPTS)

    def _fetch_manifest(self, reference: str) -> tuple[dict[str, Any], str]:
        what = f"{self.uri.redacted}: manifest {reference}"
        path = f"{self.ref.repository}/manifests/{reference}"
        response = self._get(path, {"Accept": ", ".join(MANIFEST_TYPES)}, what)
        with response:
            body = response.raw.read(MAX_MANIFEST + 1, decode_content=True)
            content_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        if len(body) > MAX_MANIFEST:
            raise SourceError(f"{what}: the manifest is larger than {MAX_MANIFEST} bytes")
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise IntegrityError(f"{what}: the registry sent a manifest whose digest is {digest}")
        try:
            manifest = json.loads(body)
        except ValueError:
            raise SourceError(f"{what}: the manifest is not JSON") from None
        if not isinstance(manifest, dict):
            raise SourceError(f"{what}: the manifest is not a JSON object")
        manifest.setdefault("mediaType", content_type)
        return manifest, digest

    def _resolve(self) -> tuple[dict[str, Any], str]:
        manifest, digest = self._manifest(self.ref.reference)
        if manifest.get("mediaType") in INDEX_TYPES or (
            "manifests" in manifest and "layers" not in manifest
        ):
            arch = detect_goarch()
            entry = pick_platform(manifest.get("manifests") or [], arch)
            if entry is None or not _DIGEST_RE.match(str(entry.get("digest", ""))):
                platforms = [
                    e.get("platform") or {}
                    for e in manifest.get("manifests") or []
                    if isinstance(e, dict)
                ]
                found = sorted(f"{p.get('os')}/{p.get('architecture')}" for p in platforms)
                raise NotFoundError(
                    f"{self.uri.redacted}: the image index has no manifest for linux/{arch}",
                    f"Platforms in the index: {', '.join(found) or 'none'}; push an image for "
                    f"linux/{arch}",
                )
            log.info("%s: index resolved to linux/%s %s", self.uri.redacted, arch, entry["digest"])
            manifest, digest = self._manifest(entry["digest"])
        return manifest, digest

    # -- layers -------------------------------------------------------------------------------

    def _extract_layer(self, index: int, layer: Mapping[str, Any], tree: _Tree, seen: set[str]):
        digest = str(layer.get("digest", ""))
        size = layer.get("size")
        mode = LAYER_MODES[str(layer.get("mediaType"))]
        if not _DIGEST_RE.match(digest) or not isinstance(size, int) or size < 0:
            raise SourceError(f"{self.uri.redacted}: layer {index} has no valid digest or size")
        what = f"{self.uri.redacted}: layer {digest}"
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
                log.warning("%s; retrying the layer (attempt %d of %d)", exc, attempt + 1, ATTEMPTS)
                time.sleep(httpcommon.backoff_delay(exc, attempt))  # the registry's Retry-After
        for path, opaque in whiteouts:
            tree.remove(path, below_only=opaque)
        for path, node in entries:
            if node.kind != "dir" or tree.nodes.get(path, _Node("x", -1)).kind != "dir":
                tree.remove(path)
            for parent in _parents(path):
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
    ) -> tuple[list[tuple[str, _Node]], list[tuple[str, bool]]]:
        """Stream one blob through tar, verifying its digest; write models/ files to ``root``."""
        entries: list[tuple[str, _Node]] = []
        whiteouts: list[tuple[str, bool]] = []
        response = self._get(f"{self.ref.repository}/blobs/{digest}", {}, what)
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
                raise TransientError(f"{what}: the transfer broke ({_reason(exc)})") from None
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
        entries: list[tuple[str, _Node]],
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
        archive.check_tar_member(member, root, self.uri.redacted)
        if member.isdir():
            entries.append((rel, _Node("dir", index)))
        elif member.isreg():
            target = root / rel
            if target.is_dir():
                raise UnsafePathError(
                    f"{self.uri.redacted}: {rel!r} is both a file and a directory"
                )
            target.unlink(missing_ok=True)  # a path may occur twice in a layer: the last wins
            stream = tar.extractfile(member)
            assert stream is not None
            with stream:
                done = archive.write_member(stream, target, None, sync=False)
            entries.append((rel, _Node("file", index, done.size, done.sha256, str(target))))
        elif member.issym():
            if member.linkname.startswith("/"):
                raise UnsafePathError(
                    f"{self.uri.redacted}: the link models/{rel} points to the absolute path "
                    f"{member.linkname!r}"
                )
            entries.append((rel, _Node("symlink", index, target=member.linkname)))
        elif member.islnk():
            linked = _normalise(member.linkname)
            if not linked.startswith(MODELS_PREFIX):
                raise UnsafePathError(
                    f"{self.uri.redacted}: the hard link models/{rel} points outside models/"
                )
            entries.append((rel, _Node("hardlink", index, target=linked[len(MODELS_PREFIX) :])))
        else:
            raise UnsafePathError(
                f"{self.uri.redacted}: models/{rel} is a device, FIFO or other special file"
            )

    # -- Source -------------------------------------------------------------------------------

    def list(self) -> Listing:
        self.close()
        manifest, digest = self._resolve()
        layers = manifest.get("layers")
        if not isinstance(layers, list):
            raise SourceError(f"{self.uri.redacted}: the manifest {digest} lists no layers")
        self._scratch = Path(tempfile.mkdtemp(prefix="storage-initializer-oci-"))
        try:
            return self._extract_all(layers, digest)
        except BaseException:
            self.close()  # a failed listing leaves nothing behind in $TMPDIR
            raise

    def _extract_all(self, layers: list[Any], digest: str) -> Listing:
        tree = _Tree()
        seen: set[str] = set()
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
            self._extract_layer(index, layer, tree, seen)
        files = self._files(tree)
        if not files:
            raise NotFoundError(
                f"{self.uri.redacted}: the image has no files under /models/ (this source expects "
                f"a modelcar layout); top-level entries across all layers: {sorted(seen)[:10]}"
            )
        log.info("%s is %s: %d files under models/", self.uri.redacted, digest, len(files))
        return Listing(files, digest)

    def _files(self, tree: _Tree) -> list[RemoteFile]:
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

    def _follow(self, path: str, node: _Node, tree: _Tree) -> dict[str, RemoteFile]:
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

    def read(self, file: RemoteFile, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        try:
            yield from read_local_range(file.handle, start, end, BLOCK)
        except FileNotFoundError:
            raise TransientError(
                f"{self.uri.redacted}: the local copy of {file.path} disappeared"
            ) from None

    def close(self) -> None:
        self._sessions.close()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None


def _parents(rel: str) -> Iterator[str]:
    parts = rel.split("/")[:-1]
    for index in range(1, len(parts) + 1):
        yield "/".join(parts[:index])


def _normalise(name: str) -> str:
    """Tar member names as a path: no leading "./" or "/", no trailing "/"."""
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/").rstrip("/")


def _registry_errors(response: requests.Response) -> str:
    """The registry's own error codes (MANIFEST_UNKNOWN, NAME_UNKNOWN, DENIED…), if any."""
    try:
        body = json.loads(response.raw.read(65536, decode_content=True) or b"{}")
        codes = [str(e.get("code")) for e in body.get("errors", []) if isinstance(e, dict)]
    except (ValueError, AttributeError, OSError, requests.exceptions.RequestException):
        return ""
    return f" ({', '.join(codes)})" if codes else ""


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 200 else text[:200] + "…"


__all__ = [
    "InitializerError",
    "OciSource",
    "detect_goarch",
    "docker_credentials",
    "parse_reference",
    "pick_platform",
]
