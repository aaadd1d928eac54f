"""ModelScope models: ``modelscope://owner/model[:revision]``.

The stock initializer calls ``modelscope_hub``'s ``snapshot_download``, which writes into its
own cache layout with its own locks and parallelism. Here ModelScope is one more ranged-read
source for our engine, over plain requests: the protocol is three GETs of the Hub's ``/api/v1``
surface, the same ones the client sends (``modelscope_hub._legacy_api``), so no client library is
needed and the ``modelscope`` extra pulls in nothing:

1. ``GET {endpoint}/api/v1/models/{owner}/{name}/revisions`` → ``Data.RevisionMap.{Branches,
   Tags}`` of ``{"Revision", "CommitId"?, "CreatedAt"}``: checks the revision exists (as the
   old SDK's ``get_valid_revision_detail`` did, with the names of the valid ones in the error)
   and, when the Hub gives a ``CommitId``, that commit is the listing's fingerprint.
2. ``GET {endpoint}/api/v1/models/{repo}/repo/files?Revision={rev}&Recursive=True`` →
   ``Data.Files`` of ``{"Path", "Type": "blob"|"tree", "Size", "Sha256", "Revision"}``: sizes
   always, sha256 for every file (the engine verifies it), the per-file commit as its version.
3. ``GET {endpoint}/api/v1/models/{repo}/repo?Revision={rev}&FilePath={path}`` with ``Range``:
   small files are answered directly, large ones redirected to object storage (OSS). We follow
   the redirect ourselves and send the token only to the Hub, never to the storage host.

Downloads address the revision by name, as the client does (the Hub's download endpoint is not
documented to take a commit id). A branch that moves while we download cannot mix two snapshots:
every file is checked against the sha256 of the listing, and a mismatch fails the file.

Configuration, as ``modelscope_hub`` reads it: ``MODELSCOPE_API_TOKEN`` (sent as a bearer token
and as the ``m_session_id`` cookie, like the client), ``MODELSCOPE_ENDPOINT`` or the deprecated
``MODELSCOPE_DOMAIN`` (a bare host means https), else ``https://modelscope.cn`` with a fall-back
to ``https://www.modelscope.ai`` when the model is not there (``MODELSCOPE_PREFER_AI_SITE=true``
swaps the order), as the client's ``resolve_endpoint_for_read`` does. Allow/ignore patterns are
applied by the pipeline to the listed paths (fnmatch on the relative path).

This module is the client (revision, listing, reads); the URI grammar and endpoint settings are
in :mod:`.modelscope_uri`, error wording in :mod:`.modelscope_errors`, and what the Hugging Face
provider does the same way in :mod:`.hub_common`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

import requests

from storage_initializer import tls
from storage_initializer.errors import (
    AccessDeniedError,
    NotFoundError,
    SourceError,
)
from storage_initializer.paths import is_plain_name, safe_relpath
from storage_initializer.providers import httpcommon
from storage_initializer.providers.base import (
    Listing,
    RemoteFile,
    Source,
    fingerprint_of,
    is_true,
)
from storage_initializer.providers.hub_common import (
    download,
    get_ok,
    range_headers,
    raw_bytes,
)
from storage_initializer.providers.modelscope_errors import ModelScopeErrors
from storage_initializer.providers.modelscope_uri import (
    DEFAULT_ENDPOINT,
    INTL_ENDPOINT,
    configured_endpoint,
    parse_modelscope_uri,
)
from storage_initializer.redact import register_secret

if TYPE_CHECKING:
    from storage_initializer.settings import Settings
    from storage_initializer.uri import SourceUri

log = logging.getLogger(__name__)

#: ``repo/files`` silently truncates a listing at this many entries (modelscope_hub's
#: REPO_FILES_TRUNCATION_LIMIT); a listing that long is walked directory by directory.
TRUNCATION_LIMIT = 3000
METADATA_ATTEMPTS = 3
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0
_COMMIT_RE = re.compile(r"^[0-9a-f]{7,64}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class ModelScopeSource(ModelScopeErrors, Source):
    """A ModelScope model at one revision, read with parallel ranged GETs."""

    default_workers = 8
    supports_ranges: ClassVar[bool] = True
    #: A repository holding one archive is kept as it is, as snapshot_download keeps it.
    extract_single_archive: ClassVar[bool] = False

    def __init__(self, uri: SourceUri, settings: Settings) -> None:
        super().__init__(uri, settings)
        self.ref = parse_modelscope_uri(uri.raw, uri.redacted)
        self.token = (os.environ.get("MODELSCOPE_API_TOKEN") or "").strip() or None
        register_secret(self.token)
        explicit = configured_endpoint()
        if explicit:
            self.endpoints = [explicit]
        elif is_true(os.environ.get("MODELSCOPE_PREFER_AI_SITE")):
            self.endpoints = [INTL_ENDPOINT, DEFAULT_ENDPOINT]
        else:
            self.endpoints = [DEFAULT_ENDPOINT, INTL_ENDPOINT]
        self.endpoint = self.endpoints[0]
        self.commit: str | None = None
        self._sessions = httpcommon.SessionPool(raw_bytes)

    # -- sessions -----------------------------------------------------------------------------

    def _session(self) -> requests.Session:
        """One session per thread, without credentials: they are added per request to the Hub
        only, so that no redirect can carry them to the storage host."""
        return self._sessions.get()

    def _hub_headers(self) -> dict[str, str]:
        if not self.token:
            return {}
        return {"Authorization": f"Bearer {self.token}", "Cookie": f"m_session_id={self.token}"}

    def close(self) -> None:
        self._sessions.close()

    @property
    def _api(self) -> str:
        return f"{self.endpoint}/api/v1/models/{self.ref.repo_id}"

    # -- metadata -----------------------------------------------------------------------------

    def _get_json(self, url: str, what: str, params: Mapping[str, str] | None = None) -> Any:
        """GET a Hub API URL and return its ``Data``, retrying transient failures a few times
        (list() runs once; the engine retries reads, not listings)."""

        def attempt() -> Any:
            response = get_ok(
                self._session(),
                url,
                params=params,
                headers=self._hub_headers(),
                timeout=(CONNECT_TIMEOUT, READ_TIMEOUT),
                transport_error=lambda exc: self._transport_error(exc, what),
                http_error=lambda answer: self._http_error(answer, what),
                where=f"{self.uri.redacted}: {what}",
            )
            return self._data(response, what)

        return httpcommon.with_backoff(attempt, METADATA_ATTEMPTS)

    def _resolve_revision(self) -> str | None:
        """Check the revision exists; return its commit when the Hub tells it."""
        what = f"reading the revisions of {self.ref.repo_id}"
        data = self._get_json(f"{self._api}/revisions", what)
        revision_map = data.get("RevisionMap") if isinstance(data, dict) else None
        if not isinstance(revision_map, dict):
            raise SourceError(
                f"{self.uri.redacted}: {what}: no RevisionMap in the answer",
                f"Check that MODELSCOPE_ENDPOINT ({self.endpoint}) points at a ModelScope Hub",
            )
        branches = [b for b in revision_map.get("Branches") or [] if isinstance(b, dict)]
        tags = [t for t in revision_map.get("Tags") or [] if isinstance(t, dict)]
        wanted = self.ref.revision
        for item in [*tags, *branches]:
            if item.get("Revision") == wanted:
                commit = item.get("CommitId") or item.get("Sha") or item.get("CommitSha")
                return str(commit) if commit else None
        if _COMMIT_RE.match(wanted):
            return wanted  # a commit id is not listed as a branch or tag
        names = ", ".join(str(i.get("Revision")) for i in [*branches, *tags])
        raise NotFoundError(
            f"{self.uri.redacted}: {self.ref.repo_id} has no revision {wanted!r}",
            f"Use one of its branches or tags: {names or '(none listed)'}",
        )

    def _files_page(self, root: str | None, recursive: bool) -> list[dict[str, Any]]:
        params = {"Revision": self.ref.revision, "Recursive": str(recursive)}
        if root:
            params["Root"] = root
        what = f"listing {root or 'the model'} at {self.ref.revision}"
        data = self._get_json(f"{self._api}/repo/files", what, params)
        files = data.get("Files") if isinstance(data, dict) else data
        if files is None:
            return []
        if not isinstance(files, list):
            raise SourceError(f"{self.uri.redacted}: {what}: Files is not a list")
        return [f for f in files if isinstance(f, dict)]

    def _all_entries(self) -> list[dict[str, Any]]:
        """The recursive listing; past the Hub's silent truncation, walk directory by
        directory (as modelscope_hub's _walk_repo_files does)."""
        entries = self._files_page(None, recursive=True)
        if len(entries) < TRUNCATION_LIMIT:
            return entries
        log.info("%s: listing truncated by the Hub; walking directories", self.uri.redacted)
        found: dict[str, dict[str, Any]] = {}
        pending: list[str | None] = [None]
        queued: set[str] = set()
        while pending:
            root = pending.pop()
            shallow = self._files_page(root, recursive=False)
            if len(shallow) >= TRUNCATION_LIMIT:
                raise SourceError(
                    f"{self.uri.redacted}: directory {root or '/'} holds more entries than the "
                    "Hub lists; the model cannot be listed completely"
                )
            for entry in shallow:
                path = str(entry.get("Path") or entry.get("Name") or "")
                if (entry.get("Type") or "blob") == "tree":
                    self._check_subdirectory(root, path, queued)
                    queued.add(path)
                    pending.append(path)
                elif path:
                    found[path] = entry
        return list(found.values())

    def _check_subdirectory(self, root: str | None, path: str, queued: set[str]) -> None:
        """Refuse a directory the listing of ``root`` names that is not a new directory below
        it: walked, one listed twice, or ".", "..", or ``root`` itself, would never end."""
        below = path[len(root) + 1 :] if root and path.startswith(root + "/") else path
        if (
            path in queued
            or (root and below == path)
            or not all(is_plain_name(segment) for segment in below.split("/"))
        ):
            raise SourceError(
                f"{self.uri.redacted}: the Hub's listing of {root or '/'} names the directory "
                f"{path!r}, which is not a new directory below it (a listing that would never "
                "end)",
                "Check MODELSCOPE_ENDPOINT (or MODELSCOPE_DOMAIN): what answers there is not "
                "a sane ModelScope Hub",
            )

    def _remote_file(self, entry: Mapping[str, Any]) -> RemoteFile:
        path = str(entry.get("Path") or entry.get("path") or entry.get("Name") or "")
        raw_size = entry.get("Size", entry.get("size"))
        try:
            size = int(raw_size) if raw_size is not None else None
        except (TypeError, ValueError):
            size = None
        sha256 = str(entry.get("Sha256") or entry.get("sha256") or "").lower()
        checksums = {"sha256": sha256} if _SHA256_RE.match(sha256) else {}
        version = str(entry.get("Revision") or entry.get("CommitId") or sha256)
        return RemoteFile(
            path=safe_relpath(path, "ModelScope file"),
            size=size,
            checksums=checksums,
            version=version,
            handle=path,
        )

    def list(self) -> Listing:
        commit: str | None = None
        for index, endpoint in enumerate(self.endpoints):
            self.endpoint = endpoint
            try:
                commit = self._resolve_revision()
                break
            except (NotFoundError, AccessDeniedError) as exc:
                if index + 1 == len(self.endpoints) or "no revision" in str(exc):
                    raise
                log.info("%s not on %s, trying %s", self.ref.repo_id, endpoint, self.endpoints[-1])
        entries = self._all_entries()
        files = [
            self._remote_file(entry)
            for entry in entries
            if (entry.get("Type") or entry.get("type") or "blob") != "tree"
        ]
        if not files:
            raise NotFoundError(
                f"{self.uri.redacted}: the model has no files at revision {self.ref.revision}"
            )
        files.sort(key=lambda f: f.path)
        self.commit = commit
        fingerprint = commit or fingerprint_of(files)
        log.info(
            "%s: revision %s%s, %d files",
            self.uri.redacted,
            self.ref.revision,
            f" is commit {commit}" if commit else "",
            len(files),
        )
        return Listing(files=files, fingerprint=fingerprint)

    # -- reading ------------------------------------------------------------------------------

    def read(self, file: RemoteFile, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        if end is not None and end <= start:
            return
        yield from download(self, lambda: self._open(file, start, end), file, start, end)

    def _open(self, file: RemoteFile, start: int, end: int | None) -> requests.Response:
        """The answer to a file's GET, following the Hub's redirects by hand: the Hub's headers
        (the token) go to the Hub's own host only."""
        headers = range_headers(start, end)
        url = f"{self._api}/repo"
        params = {"Revision": self.ref.revision, "FilePath": file.handle}
        response = self._session().get(
            url,
            params=params,
            headers={**headers, **self._hub_headers()},
            stream=True,
            allow_redirects=False,
            timeout=(CONNECT_TIMEOUT, READ_TIMEOUT),
            verify=tls.requests_verify(),
        )
        hops = 0
        while response.is_redirect and hops < 5:
            location = response.headers.get("Location", "")
            response.close()
            if not location:
                raise SourceError(
                    f"{self.uri.redacted}: downloading {file.path}: redirect without Location"
                )
            location = requests.compat.urljoin(response.url, location)
            same_host = urlsplit(location).netloc == urlsplit(self.endpoint).netloc
            response = self._session().get(
                location,
                headers={**headers, **(self._hub_headers() if same_host else {})},
                stream=True,
                allow_redirects=False,
                timeout=(CONNECT_TIMEOUT, READ_TIMEOUT),
                verify=tls.requests_verify(),
            )
            hops += 1
        return response
