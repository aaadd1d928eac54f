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
from storage_initializer.schemes import BY_KIND, MODEL_MOUNT_DIR, PVC_PREFIX, for_scheme, supported

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
    """Which backend serves ``uri`` (a row of :data:`~storage_initializer.schemes.BACKENDS`).

    The path conventions come first, in the order KServe's initializer decides them; a URI with
    a scheme is then looked up in the table.
    """
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
    backend = for_scheme(scheme, uri)
    if backend is None:
        raise UsageError(
            f"unsupported storage scheme {scheme + '://'!r} in {redact_url(uri)}", supported()
        )
    return backend.kind


def parse(uri: str) -> SourceUri:
    uri = uri.strip()
    if not uri:
        raise UsageError("the source URI is empty", "Pass a URI such as s3://bucket/model")
    if "\0" in uri:
        raise UsageError("the source URI contains a NUL byte", "Check how the URI was templated")
    kind = kind_of(uri)
    backend = BY_KIND[kind]
    if backend.is_path:
        # The whole text is the path (identity); a file:// authority is masked when shown.
        return SourceUri(uri, kind, uri, redact_url(uri) if "://" in uri else uri)
    try:
        parts = urlsplit(uri)
    except ValueError as exc:
        raise UsageError(f"malformed URI {redact_url(uri)}: {exc}") from exc
    if backend.needs_host and not parts.netloc:
        raise UsageError(
            f"malformed URI {redact_url(uri)}: no host or bucket",
            "Write it as scheme://bucket/path",
        )
    # A library may quote the password without the URL around it (urllib3's "user:pw@host"):
    # masked wherever it appears, not only inside URLs.
    register_secret(parts.password)
    canonical = _strip_credentials(uri, drop_query=backend.query_is_credential)
    return SourceUri(uri, kind, canonical, redact_url(uri))
