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
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import quote, unquote

import requests

from storage_initializer import tls
from storage_initializer.blocks import BLOCK
from storage_initializer.errors import (
    AccessDeniedError,
    InitializerError,
    NotFoundError,
    SourceError,
    TransientError,
    UsageError,
)
from storage_initializer.paths import safe_relpath
from storage_initializer.providers import httpcommon
from storage_initializer.providers.base import (
    Listing,
    RemoteFile,
    Source,
    is_true,
    read_local_range,
)
from storage_initializer.providers.ranged import stream_range
from storage_initializer.redact import redact, register_secret

if TYPE_CHECKING:
    from storage_initializer.settings import Settings
    from storage_initializer.uri import SourceUri

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_REVISION = "main"
#: Bytes per yielded block: bounds memory per worker whatever the chunk size.
#: Attempts for the metadata calls, which the engine does not retry (list() runs once).
METADATA_ATTEMPTS = 3
#: Repository kinds the URI may name with a prefix, as in huggingface_hub's ``hf://`` paths.
REPO_TYPES = {"datasets": "dataset", "spaces": "space"}
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def ensure_writable_hf_home() -> None:
    """Give huggingface_hub a writable home before it is imported.

    KServe runs the init container as an arbitrary UID with a read-only root filesystem, where
    ``~/.cache/huggingface`` cannot be created. huggingface_hub computes its paths (token file,
    caches) from ``HF_HOME`` at import time, so this must run first. An explicit ``HF_HOME`` or
    ``XDG_CACHE_HOME`` is left alone: the user chose it.
    """
    if os.environ.get("HF_HOME") or os.environ.get("XDG_CACHE_HOME"):
        return
    home = os.path.expanduser("~")
    cache = os.path.join(home, ".cache")
    probe = cache if os.path.isdir(cache) else home
    if os.path.isdir(probe) and os.access(probe, os.W_OK | os.X_OK):
        return
    os.environ["HF_HOME"] = os.path.join(tempfile.gettempdir(), "storage-initializer-hf-home")


ensure_writable_hf_home()


def _hub_cache() -> str:
    """huggingface_hub's cache directory, from the environment as it is now (its constants were
    computed at import, possibly before the caller changed the environment)."""
    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return os.path.expanduser(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"])
    if env.get("HF_HOME"):
        return os.path.join(os.path.expanduser(env["HF_HOME"]), "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


@dataclass(frozen=True)
class HubRef:
    """What an ``hf://`` URI names."""

    repo_type: str  # "model", "dataset" or "space"
    repo_id: str  # "owner/name"
    revision: str  # as written (branch, tag or commit); "main" when absent
    subpath: str  # "" for the whole repository


def parse_hf_uri(raw: str, redacted: str) -> HubRef:
    """Split ``hf://[datasets/|spaces/]owner/name[:revision][/sub/dir]``.

    The stock initializer accepts exactly ``owner/name[:revision]``; that form means the same
    here. The sub-directory is our extension. A revision holding a slash (``refs/pr/1``) is
    written URL-encoded (``refs%2Fpr%2F1``), as huggingface_hub itself encodes it in URLs.
    """
    rest = raw.strip()
    if not rest.lower().startswith("hf://"):
        raise UsageError(f"{redacted} is not an hf:// URI")
    rest = rest[len("hf://") :].split("?", 1)[0].split("#", 1)[0]
    parts = rest.split("/")
    repo_type = "model"
    if parts and parts[0] in REPO_TYPES and len(parts) >= 3:
        repo_type = REPO_TYPES[parts.pop(0)]
    form = "hf://owner/model[:revision][/sub/dir]"
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise UsageError(
            f"invalid Hugging Face URI {redacted}: expected {form}",
            "Name the repository as owner/model, e.g. hf://google-bert/bert-base-uncased",
        )
    owner, model_part = parts[0], parts[1]
    model, colon, revision = model_part.partition(":")
    revision = unquote(revision)
    for label, value in (("owner", owner), ("model name", model)):
        if not _NAME_RE.match(value) or ".." in value:
            raise UsageError(
                f"invalid Hugging Face URI {redacted}: bad {label} {value!r}",
                f"Expected {form}",
            )
    if colon and not revision:
        raise UsageError(
            f"invalid Hugging Face URI {redacted}: empty revision after ':'",
            "Write hf://owner/model:<branch, tag or commit>, or drop the ':'",
        )
    sub = "/".join(part for part in parts[2:] if part)
    subpath = safe_relpath(unquote(sub), "sub-directory") if sub else ""
    return HubRef(repo_type, f"{owner}/{model}", revision or DEFAULT_REVISION, subpath)


_TLS_VERIFY_REASON = re.compile(r"certificate verify failed: ([^'\"()\]\[]+)")
_TLS_SSL_REASON = re.compile(r"\[SSL: ([A-Z_]+)\]")
_CONNECT_REASONS = (
    ("Connection refused", "connection refused"),
    ("Name or service not known", "unknown host"),
    ("Failed to resolve", "unknown host"),
    ("NameResolutionError", "unknown host"),
    ("No route to host", "no route to host"),
    ("timed out", "timed out"),
    ("Connection reset", "connection reset"),
    ("RemoteDisconnected", "the connection closed without an answer"),
)


def _tls_reason(exc: BaseException) -> str:
    """The short reason of a requests SSLError ("certificate verify failed: self-signed
    certificate")."""
    text = str(exc)
    verify = _TLS_VERIFY_REASON.search(text)
    if verify:
        return "certificate verify failed: " + verify.group(1).strip()
    other = _TLS_SSL_REASON.search(text)
    return other.group(1) if other else "TLS handshake failed"


def _connect_reason(exc: BaseException) -> str:
    text = str(exc)
    for marker, reason in _CONNECT_REASONS:
        if marker in text:
            return reason
    return type(exc).__name__


class HfSource(Source):
    """A Hub repository at one commit, read with parallel ranged GETs."""

    #: A repository is served as it is: the stock initializer never extracts Hub files.
    extract_single_archive: ClassVar[bool] = False

    default_workers: ClassVar[int] = 8
    supports_ranges: ClassVar[bool] = True

    def __init__(self, uri: SourceUri, settings: Settings) -> None:
        super().__init__(uri, settings)
        self.ref = parse_hf_uri(uri.raw, uri.redacted)
        # Read the environment now, not at huggingface_hub's import: the value in force when the
        # pull starts is the one the user set (the same, in a fresh process, as hf would see).
        self.endpoint = self._endpoint()
        self.offline = is_true(os.environ.get("HF_HUB_OFFLINE")) or is_true(
            os.environ.get("TRANSFORMERS_OFFLINE")
        )
        self.token = self._token()
        register_secret(self.token)
        self.commit: str | None = None
        self._connect_timeout = 10.0
        self._read_timeout = float(os.environ.get("HF_HUB_DOWNLOAD_TIMEOUT") or 30)
        self._sessions = httpcommon.SessionPool(self._configure)
        #: Set when serving from huggingface_hub's cache (offline): the snapshot directory.
        self._snapshot_dir: str | None = None

    # -- configuration, as huggingface_hub reads it -------------------------------------------

    @staticmethod
    def _endpoint() -> str:
        endpoint = os.environ.get("HF_ENDPOINT")
        if not endpoint:
            try:
                from huggingface_hub import constants

                endpoint = constants.ENDPOINT
            except ImportError:
                endpoint = DEFAULT_ENDPOINT
        return endpoint.rstrip("/")

    @staticmethod
    def _token() -> str | None:
        """``HF_TOKEN`` (or legacy ``HUGGING_FACE_HUB_TOKEN``), else huggingface_hub's token file,
        unless ``HF_HUB_DISABLE_IMPLICIT_TOKEN`` forbids the implicit one."""
        token = (
            os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or ""
        ).strip()
        if token:
            return token
        if is_true(os.environ.get("HF_HUB_DISABLE_IMPLICIT_TOKEN")):
            return None
        try:
            from huggingface_hub.utils._headers import get_token_to_send

            return get_token_to_send(None) or None
        except ImportError:
            return None
        except Exception as exc:  # an OIDC exchange or token refresh failed: say so, go anonymous
            log.warning("could not read the Hugging Face token: %s", type(exc).__name__)
            return None

    @property
    def _api_prefix(self) -> str:
        return f"{self.endpoint}/api/{self.ref.repo_type}s/{self.ref.repo_id}"

    @property
    def _resolve_prefix(self) -> str:
        kind = "" if self.ref.repo_type == "model" else f"{self.ref.repo_type}s/"
        return f"{self.endpoint}/{kind}{self.ref.repo_id}/resolve"

    def _configure(self, session: requests.Session) -> None:
        session.headers["Accept-Encoding"] = "identity"  # sizes and ranges are of raw bytes
        if self.token:
            # A session-level header is removed by requests on a redirect to another host
            # (Session.rebuild_auth), so the token never reaches the CDN.
            session.headers["Authorization"] = f"Bearer {self.token}"

    def _session(self) -> requests.Session:
        return self._sessions.get()

    def close(self) -> None:
        self._sessions.close()

    # -- errors -------------------------------------------------------------------------------

    def _describe_repo(self) -> str:
        return f"{self.ref.repo_id}@{self.ref.revision}"

    def _http_error(self, response: requests.Response, what: str) -> InitializerError:
        status = response.status_code
        code = response.headers.get("X-Error-Code", "")
        server_message = response.headers.get("X-Error-Message", "")
        where = f"{self.uri.redacted}: {what}"
        if status == 401:
            if self.token:
                if server_message == "Invalid credentials in Authorization header":
                    return AccessDeniedError(
                        f"{where}: the Hub rejected the token (HTTP 401, invalid credentials)",
                        "HF_TOKEN is not a valid token; create a read token and update the secret",
                    )
                return AccessDeniedError(
                    f"{where}: the Hub refused access (HTTP 401): the repository does not exist "
                    "or the token cannot read it",
                    "Check the repository name, and that the account of HF_TOKEN has access to it",
                )
            return AccessDeniedError(
                f"{where}: the Hub refused access (HTTP 401): the repository is private or "
                "gated, or does not exist",
                "Set HF_TOKEN (e.g. from a secret) to a token that can read the repository, "
                "and check the repository name",
            )
        if status == 403:
            if code == "GatedRepo":
                return AccessDeniedError(
                    f"{where}: the repository is gated and the token's account has not been "
                    "granted access (HTTP 403)",
                    "Accept the model's conditions on its Hub page with the account of HF_TOKEN",
                )
            return AccessDeniedError(
                f"{where}: access forbidden (HTTP 403)",
                "Check that HF_TOKEN has read permission on this repository",
            )
        if status == 404:
            if code == "RevisionNotFound":
                return NotFoundError(
                    f"{where}: revision {self.ref.revision!r} not found in {self.ref.repo_id}",
                    "Check the branch, tag or commit after ':' in the URI",
                )
            if code == "EntryNotFound":
                return NotFoundError(f"{where}: not found at commit {self.commit or '?'}")
            return NotFoundError(f"{where}: repository {self.ref.repo_id} not found (HTTP 404)")
        if status == 429:
            message = f"{where}: the Hub is rate-limiting requests (HTTP 429)"
        elif status >= 500:
            message = f"{where}: the Hub answered HTTP {status}"
        elif status == 416:
            message = f"{where}: range not satisfiable (HTTP 416): the file changed?"
        else:
            message = f"{where}: unexpected HTTP {status} from the Hub"
        error = httpcommon.status_error(response, message)
        return error or SourceError(message)

    def _transport_error(self, exc: Exception, what: str) -> InitializerError:
        """A requests failure before any answer. The exception text may hold a URL but never
        our header; only a short reason from it is shown."""
        where = f"{self.uri.redacted}: {what}"
        endpoint = redact(self.endpoint)
        if isinstance(exc, requests.exceptions.SSLError):
            # An untrusted certificate is not a blip: asking again will not help.
            return SourceError(
                f"{where}: TLS verification of {endpoint} failed ({_tls_reason(exc)})",
                "Add the CA that signed the Hub's certificate to the global CA bundle "
                f"(CA_BUNDLE_CONFIGMAP_NAME) or REQUESTS_CA_BUNDLE, and check HF_ENDPOINT "
                f"({endpoint})",
            )
        if isinstance(exc, requests.exceptions.ConnectionError):
            return TransientError(
                f"{where}: cannot connect to the Hub at {endpoint} ({_connect_reason(exc)})",
                f"Check HF_ENDPOINT ({endpoint}), DNS, the egress network policy and proxies",
            )
        return TransientError(f"{where}: {type(exc).__name__}")

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
            try:
                response = self._session().get(
                    url,
                    params=params,
                    timeout=(self._connect_timeout, self._read_timeout),
                    verify=tls.requests_verify(),
                )
            except requests.RequestException as exc:
                raise self._transport_error(exc, what) from None
            if response.status_code != 200:
                raise self._http_error(response, what)
            return response

        return httpcommon.with_backoff(attempt, METADATA_ATTEMPTS, self._give_up)

    @staticmethod
    def _give_up(error: TransientError, attempts: int) -> TransientError:
        return TransientError(
            f"{error} (gave up after {attempts} attempt{'s' if attempts > 1 else ''})",
            error.hint
            or "The Hub kept refusing or failing; wait and run again (a token, HF_TOKEN, "
            "raises the Hub's rate limits)",
        )

    def resolve_commit(self) -> str:
        """The commit the revision points at now (a commit sha is taken as it is)."""
        ref = self.ref
        url = f"{self._api_prefix}/revision/{quote(ref.revision, safe='')}"
        info = self._get_json(url, f"resolving revision {ref.revision!r}")
        sha = info.get("sha") if isinstance(info, dict) else None
        if not isinstance(sha, str) or not _COMMIT_RE.match(sha):
            raise SourceError(
                f"{self.uri.redacted}: the Hub did not return a commit for revision "
                f"{ref.revision!r}",
                f"Check that HF_ENDPOINT ({self.endpoint}) points at a Hugging Face Hub",
            )
        return sha

    def _tree(self, commit: str, path: str, recursive: bool) -> Iterator[dict[str, Any]]:
        url: str | None = f"{self._api_prefix}/tree/{commit}"
        if path:
            url += "/" + quote(path, safe="")
        params: dict[str, str] | None = {"recursive": "true" if recursive else "false"}
        what = f"listing {path or 'the repository'} at {commit[:12]}"
        while url:
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
        headers: dict[str, str] = {}
        ranged = start > 0 or end is not None
        if ranged:
            headers["Range"] = f"bytes={start}-" + ("" if end is None else str(end - 1))
        what = f"downloading {file.path}"
        try:
            response = self._session().get(
                url,
                headers=headers,
                stream=True,
                allow_redirects=True,
                timeout=(self._connect_timeout, self._read_timeout),
                verify=tls.requests_verify(),
            )
        except requests.RequestException as exc:
            raise self._transport_error(exc, what) from None
        with response:
            if response.status_code not in (200, 206):
                raise self._http_error(response, what)
            yield from stream_range(
                response,
                start,
                end,
                label=f"{self.uri.redacted}: {what}",
                ranged=ranged,
                file_size=file.size,
                block=BLOCK,
            )

    # -- offline: huggingface_hub's cache -----------------------------------------------------

    def _list_offline(self) -> Listing:
        cache = _hub_cache()
        folder = os.path.join(
            cache, f"{self.ref.repo_type}s--" + self.ref.repo_id.replace("/", "--")
        )
        revision = self.ref.revision
        commit = revision if _COMMIT_RE.match(revision) else None
        if commit is None:
            try:
                with open(os.path.join(folder, "refs", revision), encoding="utf-8") as handle:
                    commit = handle.read().strip()
            except OSError:
                commit = None
        snapshot = os.path.join(folder, "snapshots", commit) if commit else ""
        base = os.path.join(snapshot, self.ref.subpath) if self.ref.subpath else snapshot
        if not commit or not os.path.isdir(snapshot) or not os.path.exists(base):
            raise SourceError(
                f"{self.uri.redacted}: HF_HUB_OFFLINE is set and revision {revision!r} is not in "
                f"the local Hugging Face cache {cache}",
                "Unset HF_HUB_OFFLINE to download it, or pre-populate HF_HUB_CACHE",
            )
        files: list[RemoteFile] = []
        if os.path.isfile(base):
            files.append(self._cached_file(base, os.path.basename(base)))
        for root, _dirs, names in os.walk(base, followlinks=True):
            for name in names:
                full = os.path.join(root, name)
                files.append(self._cached_file(full, os.path.relpath(full, base)))
        self.commit = commit
        self._snapshot_dir = base if os.path.isdir(base) else os.path.dirname(base)
        return Listing(files=files, fingerprint=commit)

    @staticmethod
    def _cached_file(full: str, relative: str) -> RemoteFile:
        # Cache entries are symlinks to blobs named after the ETag: the sha256 of LFS files.
        blob = os.path.basename(os.path.realpath(full))
        checksums = {"sha256": blob} if re.fullmatch(r"[0-9a-f]{64}", blob) else {}
        relative = relative.replace(os.sep, "/")
        return RemoteFile(
            path=safe_relpath(relative, "cached file"),
            size=os.path.getsize(full),
            checksums=checksums,
            version=blob,
            handle=relative,
        )

    def _read_cached(self, file: RemoteFile, start: int, end: int | None) -> Iterator[bytes]:
        assert self._snapshot_dir is not None
        path = os.path.join(self._snapshot_dir, file.handle)
        return read_local_range(path, start, end, BLOCK)
