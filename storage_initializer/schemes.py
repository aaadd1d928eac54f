"""The table of backends: which URIs each one serves, where its code lives, what it needs.

One row per backend drives three things that used to be three hand-kept lists: how a URI is
classified (:func:`storage_initializer.uri.kind_of`), how it is parsed (host required? is the
query a credential?) and which provider module is imported for it
(:func:`storage_initializer.providers.open_source`). Adding a backend is one provider module and
one row here (see docs/providers/adding-a-backend.md).

This module imports nothing heavy: :mod:`storage_initializer.uri` reads it on every start,
including the warm start that must not import any cloud SDK.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: The ``/mnt/models`` mount KServe gives the model server (the ``model-mount`` kind: no-op).
MODEL_MOUNT_DIR = "/mnt/models"
#: The legacy PVC source: KServe rewrites ``pvc://claim/path`` to ``/mnt/pvc/path``.
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


@dataclass(frozen=True)
class Backend:
    """One kind of source URI and the provider that serves it."""

    #: The kind recorded in :class:`~storage_initializer.uri.SourceUri` and shown in messages.
    kind: str
    #: URI schemes (lower case, without ``://``) this backend may serve. Empty for the kinds
    #: recognised by their path (``/mnt/pvc/…``, ``/mnt/models``).
    schemes: tuple[str, ...]
    #: Provider module under ``storage_initializer.providers`` and its ``Source`` class; None
    #: for a kind that needs no download (``/mnt/models``).
    module: str | None
    source_class: str | None
    #: How the "Supported:" hint names it; empty to leave it out (shown by another row).
    label: str
    #: ``pip install 'storage-initializer[extra]'`` provides its dependencies; None: the core.
    extra: str | None = None
    #: When set, the URI must also match it: several backends share ``https://``, and the
    #: first row that matches wins (so the specific rows come before plain HTTP).
    pattern: re.Pattern[str] | None = None
    #: A URI without a host (``scheme:///path``) is refused as malformed.
    needs_host: bool = True
    #: The query string is a credential (an Azure SAS): dropped from the identity (the cache
    #: key) so a rotated token does not look like another model, and masked when shown.
    query_is_credential: bool = False
    #: The whole text is a filesystem path: it is its own identity, no credentials to strip.
    is_path: bool = False


#: In matching order: for a given scheme the first row whose pattern matches (or that has none)
#: wins. The order of the specific https rows is KServe's initializer's order.
BACKENDS: tuple[Backend, ...] = (
    Backend(
        "azure-blob",
        ("https", "http"),
        "azure_blob",
        "AzureBlobSource",
        "Azure Blob URLs",
        pattern=AZURE_BLOB_RE,
        query_is_credential=True,
    ),
    Backend(
        "azure-file",
        ("https", "http"),
        "azure_file",
        "AzureFileSource",
        "Azure File URLs",
        pattern=AZURE_FILE_RE,
        query_is_credential=True,
    ),
    Backend(
        "git",
        ("https", "http", "git", "ssh"),
        "git",
        "GitSource",
        "git repositories (….git)",
        pattern=GIT_RE,
    ),
    Backend("http", ("https", "http"), "http", "HttpSource", "http(s)://"),
    Backend("s3", ("s3",), "s3", "S3Source", "s3://"),
    Backend("gs", ("gs",), "gcs", "GcsSource", "gs://"),
    Backend("hf", ("hf",), "hf", "HfSource", "hf://", needs_host=False),
    Backend("hdfs", ("hdfs",), "hdfs", "HdfsSource", "hdfs://", extra="hdfs"),
    Backend("webhdfs", ("webhdfs",), "hdfs", "HdfsSource", "webhdfs://", extra="hdfs"),
    Backend("oci", ("oci",), "oci", "OciSource", "oci://", extra="oci", needs_host=False),
    Backend(
        "modelscope",
        ("modelscope",),
        "modelscope",
        "ModelScopeSource",
        "modelscope://",
        extra="modelscope",
        needs_host=False,
    ),
    Backend("local", ("file",), "local", "LocalSource", "file:// and local paths", is_path=True),
    Backend("pvc", (), "local", "LocalSource", "", is_path=True),
    Backend("model-mount", (), None, None, "", is_path=True),
)

BY_KIND: dict[str, Backend] = {backend.kind: backend for backend in BACKENDS}


def for_scheme(scheme: str, uri: str) -> Backend | None:
    """The backend serving ``uri`` whose scheme is ``scheme`` (lower case), or None."""
    for backend in BACKENDS:
        if scheme in backend.schemes and (backend.pattern is None or backend.pattern.match(uri)):
            return backend
    return None


def supported() -> str:
    """The "Supported: …" hint of an unknown scheme, in table order."""
    return "Supported: " + ", ".join(b.label for b in BACKENDS if b.label)
