"""The OCI row of the conformance suite: an image on the real registry (CNCF distribution,
tests/servers/registry.py) behind the counting proxy (see :mod:`tests.conformance.backends` for
the interface).

Each file of the contract's set is its own gzip layer under ``models/``, so a fault can be aimed
at one file's content read: the GET of its layer blob. What does not carry over from the object
stores, and why, is in :attr:`Oci.content_in_listing` and :attr:`Oci.cannot_deny`.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from tests.conformance.backends import Backend, Published, error_headers
from tests.servers.proxy import CountingProxy, Fault, RequestRecord
from tests.servers.registry import TAR_GZ, Registry, digest_of, tar_layer

TAG = "v1"


@dataclass
class PublishedImage(Published):
    """An image: content reads are layer blob GETs, one layer per file (path → blob digest)."""

    layers: dict[str, str] = field(default_factory=dict)

    def reads_file(self, path: str) -> Callable[[RequestRecord], bool]:
        digest = self.layers[path]
        return lambda record: self.reads(record) and record.path.endswith(f"/blobs/{digest}")


class Oci(Backend):
    name = "oci"
    #: A tag moved to a new image after the listing: the listed manifest's blobs are immutable
    #: (addressed by digest) and already unpacked, so a read returns the listed bytes.
    pins = "commit"
    cannot_deny = (
        "the registry of this row is anonymous; refusals of the real htpasswd and token "
        "registries are proved in tests/test_oci.py"
    )
    content_in_listing = (
        "the listing itself downloads every layer whole (a tarball verified by its digest) and "
        "unpacks it into local scratch: reads after the listing never reach the registry, and "
        "the bytes a pull takes from it are tarballs, not the files"
    )
    CODES: ClassVar[Mapping[int, str]] = {
        401: "UNAUTHORIZED",
        403: "DENIED",
        404: "BLOB_UNKNOWN",
        429: "TOOMANYREQUESTS",
    }

    def __init__(self, server: Registry, proxy: CountingProxy, home: str) -> None:
        env = {
            "KSERVE_OCI_INSECURE_REGISTRY": "true",
            "KSERVE_OCI_DOCKER_CONFIG": os.path.join(home, "no-such-config.json"),
        }
        super().__init__(proxy, env)
        self.server = server
        self.host = proxy.url.split("://", 1)[1]

    def _push(self, repo: str, files: Mapping[str, bytes]) -> dict[str, str]:
        layers = [(tar_layer({f"models/{path}": data}), TAR_GZ) for path, data in files.items()]
        self.server.push_image(repo, TAG, layers)
        return {path: digest_of(layer) for path, (layer, _) in zip(files, layers, strict=True)}

    def publish(self, files: Mapping[str, bytes]) -> Published:
        repo = f"conform/m-{secrets.token_hex(5)}"
        current = dict(files)

        def replace(path: str, data: bytes) -> None:
            """A new image pushed under the same tag, with ``path`` changed."""
            current[path] = data
            self._push(repo, current)

        return PublishedImage(
            f"oci://{self.host}/{repo}:{TAG}",
            dict(files),
            f"/v2/{repo}/blobs/",
            replace,
            layers=self._push(repo, files),
        )

    def missing_uri(self, published: Published) -> str:
        return published.uri.rsplit(":", 1)[0] + ":no-such-tag"

    def error(self, status: int, retry_after: str | None = None, **match: object) -> Fault:
        code = self.CODES.get(status, "UNKNOWN")
        body = {"errors": [{"code": code, "message": f"injected {status}", "detail": None}]}
        more = {"Content-Type": "application/json"}
        if status == 401:
            more["WWW-Authenticate"] = 'Basic realm="conformance"'
        return Fault(
            status=status,
            body=json.dumps(body).encode(),
            headers=error_headers(retry_after, **more),
            **match,  # type: ignore[arg-type]
        )
