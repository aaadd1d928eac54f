"""Which image manifest an ``oci://`` reference names: fetch it, check it, resolve an index.

One job: from a tag or digest to the image manifest whose layers hold the model, as the stock
initializer does (an image index resolves to its first ``linux/<GOARCH>`` entry), checking a
manifest fetched by digest against that digest and bounding what is read. The manifest's digest
is the source's fingerprint. Split out of :mod:`.oci` (the source) so that each part has one job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from typing import Any

from storage_initializer.errors import IntegrityError, NotFoundError, SourceError
from storage_initializer.providers import httpcommon
from storage_initializer.providers.oci_registry import ATTEMPTS, DIGEST_RE, RegistryClient

log = logging.getLogger(__name__)

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
MAX_MANIFEST = 4 << 20


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


def fetch_manifest(
    registry: RegistryClient, reference: str, redacted: str
) -> tuple[dict[str, Any], str]:
    """The manifest, asked again on a transient failure (list() itself runs once)."""
    return httpcommon.with_backoff(lambda: _fetch_manifest(registry, reference, redacted), ATTEMPTS)


def _fetch_manifest(
    registry: RegistryClient, reference: str, redacted: str
) -> tuple[dict[str, Any], str]:
    what = f"{redacted}: manifest {reference}"
    path = f"{registry.ref.repository}/manifests/{reference}"
    response = registry.get(path, {"Accept": ", ".join(MANIFEST_TYPES)}, what)
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


def resolve(registry: RegistryClient, redacted: str) -> tuple[dict[str, Any], str]:
    """The image manifest (and its digest) for the reference, through an index if need be."""
    manifest, digest = fetch_manifest(registry, registry.ref.reference, redacted)
    if manifest.get("mediaType") in INDEX_TYPES or (
        "manifests" in manifest and "layers" not in manifest
    ):
        arch = detect_goarch()
        entry = pick_platform(manifest.get("manifests") or [], arch)
        if entry is None or not DIGEST_RE.match(str(entry.get("digest", ""))):
            platforms = [
                e.get("platform") or {}
                for e in manifest.get("manifests") or []
                if isinstance(e, dict)
            ]
            found = sorted(f"{p.get('os')}/{p.get('architecture')}" for p in platforms)
            raise NotFoundError(
                f"{redacted}: the image index has no manifest for linux/{arch}",
                f"Platforms in the index: {', '.join(found) or 'none'}; push an image for "
                f"linux/{arch}",
            )
        log.info("%s: index resolved to linux/%s %s", redacted, arch, entry["digest"])
        manifest, digest = fetch_manifest(registry, entry["digest"], redacted)
    return manifest, digest
