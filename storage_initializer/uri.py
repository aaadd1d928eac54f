"""Parsing source URIs: which provider, the canonical form (the cache key) and the redacted form.

Credentials in a URI (``user:password@``, an Azure SAS query) are not part of its identity: a
rotated SAS token must not make a cached model look like a different one, and must never be
written to a marker. So the canonical form drops them and the redacted form masks them.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from storage_initializer.errors import UsageError
from storage_initializer.redact import redact_url, register_secret

MODEL_MOUNT_DIR = "/mnt/models"
PVC_PREFIX = "/mnt/pvc"

AZURE_BLOB_RE = re.compile(
    r"^https://(?P<account>[^./]+)\.(?:blob\.core\.windows\.net|z\d+\.blob\.storage\.azure\.net)/",
    re.IGNORECASE,
)
AZURE_FILE_RE = re.compile(
    r"^https://(?P<account>[^./]+)\.(?:file\.core\.windows\.net|z\d+\.file\.storage\.azure\.net)/",
    re.IGNORECASE,
)
GIT_RE = re.compile(r"^(?:https?|git|ssh)://[^?#]+?\.git(?:@[^?#]+)?/?$|^git@", re.IGNORECASE)
_SCHEME_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


@dataclass(frozen=True)
class SourceUri:
    raw: str
    #: Provider kind: local, pvc, model-mount, s3, gs, hf, azure-blob, azure-file, http, ...
    kind: str
    #: Identity of the source: credentials removed. Hashed into the cache key.
    canonical: str
    #: Safe to print.
    redacted: str

    def key(self, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> str:
        """Cache key: first 16 hex of sha256(canonical), extended with the filters when set."""
        text = self.canonical
        if include or exclude:
            text += "\0include=" + ",".join(include) + "\0exclude=" + ",".join(exclude)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _strip_credentials(uri: str, drop_query: bool) -> str:
    parts = urlsplit(uri)
    netloc = parts.netloc.rpartition("@")[2]
    query = "" if drop_query else parts.query
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def kind_of(uri: str) -> str:
    """Which provider serves ``uri``, in the order KServe's initializer decides it."""
    if uri.startswith(MODEL_MOUNT_DIR) and (len(uri) == len(MODEL_MOUNT_DIR) or uri[11] == "/"):
        return "model-mount"
    if uri.startswith(PVC_PREFIX + "/"):
        return "pvc"
    match = _SCHEME_RE.match(uri)
    if not match:
        if uri.startswith(("/", "./", "../")) or uri in (".", ".."):
            return "local"
        # Shown with any user:password@ or ?query masked: a URL typed without its scheme
        # (acct.blob.core.windows.net/c/m?sv=…&sig=…) still holds its credentials.
        shown = redact_url("//" + uri)[2:]
        raise UsageError(
            f"{shown!r} is not a URI: it has no scheme and is not an absolute path",
            "Use a URI such as s3://bucket/model, gs://bucket/model, hf://owner/model, "
            "https://host/model.tar.gz or an absolute path",
        )
    scheme = match.group(1).lower()
    if scheme == "file":
        return "local"
    if scheme in ("https", "http"):
        if AZURE_BLOB_RE.match(uri):
            return "azure-blob"
        if AZURE_FILE_RE.match(uri):
            return "azure-file"
        if GIT_RE.match(uri):
            return "git"
        return "http"
    if scheme in ("s3", "hf", "hdfs", "webhdfs", "oci", "modelscope"):
        return scheme
    if scheme == "gs":
        return "gs"
    if scheme in ("git", "ssh") and GIT_RE.match(uri):
        return "git"
    raise UsageError(
        f"unsupported storage scheme {scheme + '://'!r} in {redact_url(uri)}",
        "Supported: s3://, gs://, hf://, http(s)://, Azure Blob and File URLs, hdfs://, "
        "webhdfs://, oci://, modelscope://, git repositories (….git), file:// and local paths",
    )


def parse(uri: str) -> SourceUri:
    uri = uri.strip()
    if not uri:
        raise UsageError("the source URI is empty", "Pass a URI such as s3://bucket/model")
    if "\0" in uri:
        raise UsageError("the source URI contains a NUL byte", "Check how the URI was templated")
    kind = kind_of(uri)
    if kind in ("local", "pvc", "model-mount"):
        # The whole text is the path (identity); a file:// authority is masked when shown.
        return SourceUri(uri, kind, uri, redact_url(uri) if "://" in uri else uri)
    try:
        parts = urlsplit(uri)
    except ValueError as exc:
        raise UsageError(f"malformed URI {redact_url(uri)}: {exc}") from exc
    if kind not in ("hf", "modelscope", "oci") and not parts.netloc:
        raise UsageError(
            f"malformed URI {redact_url(uri)}: no host or bucket",
            "Write it as scheme://bucket/path",
        )
    # A library may quote the password without the URL around it (urllib3's "user:pw@host"):
    # masked wherever it appears, not only inside URLs.
    register_secret(parts.password)
    canonical = _strip_credentials(uri, drop_query=kind in ("azure-blob", "azure-file"))
    return SourceUri(uri, kind, canonical, redact_url(uri))
