"""Hugging Face Hub models: ``hf://owner/model[:revision][/sub/dir]``.

Why not ``snapshot_download``: it writes into huggingface_hub's own cache layout with its own
locks (which wait forever on a stale lock, huggingface_hub#2543) and cannot resume across runs.
Here the Hub is just another ranged-read source for our engine, and huggingface_hub is used only
for what it defines: the endpoint, the token and the offline switch, read exactly as it reads them.

The protocol, and why each step is there:

1. ``GET {endpoint}/api/models/{repo}/revision/{rev}`` → ``sha``. A branch or tag moves; resolving
   it once to a commit makes every later request address the same immutable snapshot, so files
   from two commits can never be mixed, and the commit is the listing's fingerprint.
2. ``GET {endpoint}/api/models/{repo}/tree/{sha}[/{sub}]?recursive=true`` (paginated with a
   ``Link: <…>; rel="next"`` header): paths, sizes, git blob ids and, for LFS files, the sha256.
3. ``GET {endpoint}/{repo}/resolve/{sha}/{path}`` with ``Range``: the Hub answers small files
   itself and redirects LFS/Xet files to a CDN that honours ranges. The bearer token is sent to
   the Hub only: requests drops ``Authorization`` on a redirect to another host.

With ``HF_HUB_OFFLINE=1`` nothing is requested: the model is served from huggingface_hub's cache
(``HF_HUB_CACHE``) when a snapshot for the revision is there, which is what huggingface_hub does.

This module is the online client (resolution, listing, reads); the URI grammar is in
:mod:`.hf_uri`, the environment in :mod:`.hf_env`, error wording in :mod:`.hf_errors`, the
offline cache in :mod:`.hf_cache`, and what ModelScope does the same way in :mod:`.hub_common`.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import ssl
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import quote

import requests

from storage_initializer import tls
from storage_initializer.errors import (
    NotFoundError,
    SourceError,
    UsageError,
)
from storage_initializer.paths import safe_relpath
from storage_initializer.providers import hf_lean, httpcommon, lean_http
from storage_initializer.providers.base import (
    Listing,
    RemoteFile,
    Source,
    is_true,
)
from storage_initializer.providers.hf_cache import HfCache
from storage_initializer.providers.hf_env import hub_endpoint, hub_token
from storage_initializer.providers.hf_errors import HfErrors
from storage_initializer.providers.hf_uri import COMMIT_RE, parse_hf_uri
from storage_initializer.providers.hub_common import (
    download,
    get_ok,
    range_headers,
    raw_bytes,
)
from storage_initializer.providers.page_trail import PageTrail
from storage_initializer.redact import register_secret

if TYPE_CHECKING:
    from storage_initializer.settings import Settings
    from storage_initializer.uri import SourceUri

log = logging.getLogger(__name__)

#: Attempts for the metadata calls, which the engine does not retry (list() runs once).
METADATA_ATTEMPTS = 3


class HfSource(HfErrors, HfCache, Source):
    """A Hub repository at one commit, read with parallel ranged GETs."""

    #: A repository is served as it is: the stock initializer never extracts Hub files.
    extract_single_archive: ClassVar[bool] = False

    default_workers = 8
    supports_ranges: ClassVar[bool] = True

    def __init__(self, uri: SourceUri, settings: Settings) -> None:
        super().__init__(uri, settings)
        self.ref = parse_hf_uri(uri.raw, uri.redacted)
        # Read the environment now, not at huggingface_hub's import: the value in force when the
        # pull starts is the one the user set (the same, in a fresh process, as hf would see).
        self.endpoint = hub_endpoint()
        self.offline = is_true(os.environ.get("HF_HUB_OFFLINE")) or is_true(
            os.environ.get("TRANSFORMERS_OFFLINE")
        )
        self.token = hub_token()
        register_secret(self.token)
        self.commit: str | None = None
        self._connect_timeout = 10.0
        self._read_timeout = float(os.environ.get("HF_HUB_DOWNLOAD_TIMEOUT") or 30)
        self._sessions = httpcommon.SessionPool(self._configure)
        #: Set when serving from huggingface_hub's cache (offline): the snapshot directory.
        self._snapshot_dir: str | None = None
        #: File reads over plain connections (hf_lean); None behind a proxy or switched off.
        self._lean: hf_lean.HubReader | None = None
        if hf_lean.wanted(self.endpoint):
            timeouts = (self._connect_timeout, self._read_timeout)
            self._lean = hf_lean.HubReader(
                self.endpoint, self.token, tls.requests_verify(), timeouts
            )

    # -- configuration, as huggingface_hub reads it -------------------------------------------

    @property
    def _api_prefix(self) -> str:
        return f"{self.endpoint}/api/{self.ref.repo_type}s/{self.ref.repo_id}"

    @property
    def _resolve_prefix(self) -> str:
        kind = "" if self.ref.repo_type == "model" else f"{self.ref.repo_type}s/"
        return f"{self.endpoint}/{kind}{self.ref.repo_id}/resolve"

    def _configure(self, session: requests.Session) -> None:
        raw_bytes(session)
        if self.token:
            # A session-level header is removed by requests on a redirect to another host
            # (Session.rebuild_auth), so the token never reaches the CDN.
            session.headers["Authorization"] = f"Bearer {self.token}"

    def _session(self) -> requests.Session:
        return self._sessions.get()

    def close(self) -> None:
        self._sessions.close()
        if self._lean is not None:
            self._lean.close()

    # -- errors -------------------------------------------------------------------------------
    # -- metadata -----------------------------------------------------------------------------

    def _get_json(self, url: str, what: str, params: Mapping[str, str] | None = None) -> Any:
        """GET a Hub API URL as JSON, retrying transient failures a few times."""
        response = self._get_api(url, what, params)
        try:
            return response.json()
        except ValueError as exc:
            raise SourceError(
                f"{self.uri.redacted}: {what}: the Hub answered something that is not JSON",
                f"Check that HF_ENDPOINT ({self.endpoint}) points at a Hugging Face Hub",
            ) from exc

    def _get_api(
        self, url: str, what: str, params: Mapping[str, str] | None = None
    ) -> requests.Response:
        def attempt() -> requests.Response:
            return get_ok(
                self._session(),
                url,
                params=params,
                timeout=(self._connect_timeout, self._read_timeout),
                transport_error=lambda exc: self._transport_error(exc, what),
                http_error=lambda response: self._http_error(response, what),
                where=f"{self.uri.redacted}: {what}",
            )

        return httpcommon.with_backoff(attempt, METADATA_ATTEMPTS, self._give_up)

    def resolve_commit(self) -> str:
        """The commit the revision points at now (a commit sha is taken as it is)."""
        ref = self.ref
        url = f"{self._api_prefix}/revision/{quote(ref.revision, safe='')}"
        info = self._get_json(url, f"resolving revision {ref.revision!r}")
        sha = info.get("sha") if isinstance(info, dict) else None
        if not isinstance(sha, str) or not COMMIT_RE.match(sha):
            raise SourceError(
                f"{self.uri.redacted}: the Hub did not return a commit for revision "
                f"{ref.revision!r}",
                f"Check that HF_ENDPOINT ({self.endpoint}) points at a Hugging Face Hub",
            )
        return sha

    def _tree(self, commit: str, path: str, recursive: bool) -> Iterator[dict[str, Any]]:
        first = f"{self._api_prefix}/tree/{commit}"
        if path:
            first += "/" + quote(path, safe="")
        url: str | None = first
        params: dict[str, str] | None = {"recursive": "true" if recursive else "false"}
        what = f"listing {path or 'the repository'} at {commit[:12]}"
        trail = PageTrail(
            f"{self.uri.redacted}: {what}",
            "Check the Hub endpoint (HF_ENDPOINT): a mirror's pagination is broken",
        )
        while url:
            trail.follow(url)
            response = self._get_api(url, what, params)
            try:
                page = response.json()
            except ValueError as exc:
                raise SourceError(f"{self.uri.redacted}: {what}: not JSON") from exc
            if not isinstance(page, list):
                raise SourceError(f"{self.uri.redacted}: {what}: expected a JSON list")
            yield from page
            # Cursor pagination: the next URL carries its own query string.
            url = response.links.get("next", {}).get("url")
            params = None

    def _remote_file(self, entry: dict[str, Any], relative: str) -> RemoteFile:
        repo_path = entry["path"]
        size = int(entry["size"])
        checksums: dict[str, str] = {}
        lfs = entry.get("lfs")
        version = str(entry.get("oid", ""))
        if isinstance(lfs, dict) and lfs.get("oid"):
            sha256 = str(lfs["oid"]).lower()
            checksums["sha256"] = sha256
            version = sha256
            size = int(lfs.get("size", size))
        # The git blob id ("oid") is sha1("blob <size>\0" + content), not a sha1 of the content:
        # it is kept as the version, never announced as a "sha1" checksum.
        # It does identify the content, as "gitsha1" (store.content), for reuse on the volume.
        if not checksums and re.fullmatch(r"[0-9a-f]{40}", version):
            checksums["gitsha1"] = version
        return RemoteFile(
            path=safe_relpath(relative, "Hub file"),
            size=size,
            checksums=checksums,
            version=version,
            handle=quote(repo_path),
        )

    def list(self) -> Listing:
        if self.offline:
            return self._list_offline()
        commit = self.resolve_commit()
        self.commit = commit
        sub = self.ref.subpath
        files: list[RemoteFile] = []
        try:
            entries = [
                e for e in self._tree(commit, sub, recursive=True) if e.get("type") == "file"
            ]
        except NotFoundError:
            if not sub:
                raise
            entries = []
        prefix = sub + "/" if sub else ""
        for entry in entries:
            path = entry.get("path", "")
            if path.startswith(prefix):
                files.append(self._remote_file(entry, path[len(prefix) :]))
        if sub and not files:
            single = self._single_file(commit, sub)
            if single is None:
                raise NotFoundError(
                    f"{self.uri.redacted}: {sub!r} is neither a directory nor a file in "
                    f"{self.ref.repo_id} at commit {commit}",
                    "Check the path after the revision in the URI",
                )
            files.append(single)
        if not files:
            raise NotFoundError(
                f"{self.uri.redacted}: the repository has no files at commit {commit}",
                "Check the revision, or the repository on the Hub",
            )
        log.info(
            "%s: revision %s is commit %s, %d files",
            self.uri.redacted,
            self.ref.revision,
            commit,
            len(files),
        )
        return Listing(files=files, fingerprint=commit)

    def _single_file(self, commit: str, sub: str) -> RemoteFile | None:
        """``sub`` names a file: download it under its base name, as S3 keys are."""
        parent, _, name = sub.rpartition("/")
        try:
            for entry in self._tree(commit, parent, recursive=False):
                if entry.get("type") == "file" and entry.get("path") == sub:
                    return self._remote_file(entry, name)
        except NotFoundError:
            return None
        return None

    # -- reading ------------------------------------------------------------------------------

    def read(self, file: RemoteFile, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        if self._snapshot_dir is not None:
            yield from self._read_cached(file, start, end)
            return
        if end is not None and end <= start:
            return
        if self.commit is None:
            raise UsageError(f"{self.uri.redacted}: read() before list()")
        url = f"{self._resolve_prefix}/{self.commit}/{file.handle}"
        if self._lean is not None:
            yield from self._read_lean(self._lean, url, start, end, f"downloading {file.path}")
            return
        yield from download(
            self,
            lambda: self._session().get(
                url,
                headers=range_headers(start, end),
                stream=True,
                allow_redirects=True,
                timeout=(self._connect_timeout, self._read_timeout),
                verify=tls.requests_verify(),
            ),
            file,
            start,
            end,
        )

    def _read_lean(
        self, lean: hf_lean.HubReader, url: str, start: int, end: int | None, what: str
    ) -> Iterator[bytes]:
        """Bytes ``[start, end)`` of ``url`` through hf_lean, checked as ``checked_body``
        checks the requests path's answer; failures mapped by the same HfErrors."""
        label = f"{self.uri.redacted}: {what}"
        try:
            answer = lean.get(url, range_headers(start, end), label)
        except ssl.SSLError as exc:
            tls_error = requests.exceptions.SSLError(str(exc))
            raise self._transport_error(tls_error, what) from None
        except (OSError, http.client.HTTPException) as exc:
            failed = requests.exceptions.ConnectionError(f"{type(exc).__name__}: {exc}")
            raise self._transport_error(failed, what) from None
        if answer.status not in (200, 206):
            raise self._http_error(hf_lean.as_response(answer), what)
        block = self.settings.read_size
        whole = start == 0 and end is None
        yield from lean_http.ranged_body(answer, start, end, whole, block, label, eager=True)
