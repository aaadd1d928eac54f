"""HDFS through WebHDFS: ``hdfs://path/to/model`` and ``webhdfs://path/to/model``.

Configuration is what KServe's stock initializer reads (``_load_hdfs_configuration``): one file
per setting in ``HDFS_SECRET_DIR`` (default ``/var/secrets/kserve-hdfscreds``, the mounted
``hdfscreds`` secret), or the ``type: hdfs|webhdfs`` entry of ``STORAGE_CONFIG``, which
:mod:`storage_initializer.storage_config` writes into such a directory first (base64-decoding the
keytab and TLS files), exactly as the stock one does.

- ``HDFS_NAMENODE``: the WebHDFS base URL (``https://nn:9871``); several separated by ``;`` for
  an HA pair (the hdfs package's convention, which the stock passes through): a standby or
  unreachable namenode is skipped.
- ``HDFS_ROOTPATH``: prefix for the path; when absent the path is absolute.
- ``USER_PROXY``: sent as ``doas=`` (the stock's ``Client(proxy=...)``).
- ``TLS_CERT``/``TLS_KEY`` (client certificate), ``TLS_CA`` (CA file), ``TLS_SKIP_VERIFY``
  (``true`` disables verification; nothing else does).
- ``HEADERS``: JSON object of extra headers (e.g. a Knox gateway's Authorization).
- ``N_THREADS``: parallel requests (the stock's per-file thread count, default 2 there).
- ``KERBEROS_PRINCIPAL`` + ``KERBEROS_KEYTAB``: SPNEGO, from the ``kerberos`` extra.

The URI's "host" is not the namenode: as in the stock initializer, everything after the scheme
is the HDFS path, so ``hdfs://user/me/model`` is ``/user/me/model`` (or ``<root>/user/me/model``).

Why plain requests and not the ``hdfs`` package the stock uses: WebHDFS is three GET operations,
and we need what that client hides: the HTTP status and the RemoteException class (to tell a
standby namenode or a 5xx, worth retrying, from a missing file or a denial, which are not), one
session per thread for parallel ranged reads, and control of the datanode redirect (OPEN answers
307 to a datanode; we follow it ourselves so that a datanode failure is not mistaken for a dead
namenode, and so that an ``Authorization`` header never leaves the namenode's host). This also
keeps the ``hdfs`` extra free of third-party code; only Kerberos needs one (``kerberos``).

Protocol:
1. ``GETFILESTATUS`` of the path: a FILE is downloaded under its base name (as the stock does);
   a DIRECTORY is walked with ``LISTSTATUS``, keeping relative paths.
2. ``OPEN&offset=&length=`` on the namenode, a 307 to a datanode that streams exactly that range.
Sizes come from FileStatus ``length``; HDFS checksums (MD5 of MD5s of CRC32Cs per block) are not
a digest of the content we can recompute, so files are verified by size, and the fingerprint is a
digest over paths, sizes, modification times and file ids.
"""

from __future__ import annotations

import logging
import posixpath
import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import quote, urlsplit

import requests

from storage_initializer import tls
from storage_initializer.blocks import BLOCK
from storage_initializer.errors import (
    InitializerError,
    NotFoundError,
    SourceChangedError,
    SourceError,
    TransientError,
)
from storage_initializer.paths import is_plain_name, safe_relpath
from storage_initializer.providers import httpcommon
from storage_initializer.providers.base import Listing, RemoteFile, Source, fingerprint_of
from storage_initializer.providers.hdfs_config import (  # noqa: F401 (load_config: tests)
    HdfsConfig,
    _kerberos_auth,
    load_config,
    uri_path,
)
from storage_initializer.providers.hdfs_errors import WebHdfsErrors
from storage_initializer.providers.ranged import stream_range

if TYPE_CHECKING:
    from storage_initializer.settings import Settings
    from storage_initializer.uri import SourceUri

log = logging.getLogger(__name__)

DEFAULT_WORKERS = 4
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0
#: The hdfs package's marker for "the newest entry here", optionally N levels deep.
_LATEST_RE = re.compile(r"/?#LATEST(?:\{(\d+)\})?(?=/|$)")


class HdfsSource(WebHdfsErrors, Source):
    """A file or directory tree on HDFS, read with ranged WebHDFS OPENs."""

    default_workers = DEFAULT_WORKERS
    supports_ranges: ClassVar[bool] = True

    def __init__(self, uri: SourceUri, settings: Settings) -> None:
        super().__init__(uri, settings)
        self.config = load_config()
        if self.config.n_threads:
            self.default_workers = self.config.n_threads
        self._auth = (
            _kerberos_auth(
                self.config.kerberos_principal, self.config.kerberos_keytab, uri.redacted
            )
            if self.config.kerberos_principal
            else None
        )
        self._relative = uri_path(uri.raw)
        self._path: str | None = None
        self._active = 0  # index of the namenode that answered last
        self._sessions = httpcommon.SessionPool(self._configure)

    # -- sessions and TLS ---------------------------------------------------------------------

    def _verify(self) -> bool | str:
        """TLS_SKIP_VERIFY=true, else TLS_CA, else the global bundle / default trust store.

        Passed on every request: requests lets REQUESTS_CA_BUNDLE override a session-level
        ``verify`` but not a per-request one, so the HDFS settings always win (the stock skips
        the global bundle for HDFS for the same reason)."""
        if self.config.tls_skip_verify:
            return False
        if self.config.tls_ca:
            return self.config.tls_ca
        return tls.requests_verify()

    def _configure(self, session: requests.Session) -> None:
        session.headers.update(self.config.headers)
        if self.config.tls_cert:
            session.cert = (
                (self.config.tls_cert, self.config.tls_key)
                if self.config.tls_key
                else self.config.tls_cert
            )
        if self._auth is not None:
            session.auth = self._auth

    def _session(self) -> requests.Session:
        return self._sessions.get()

    def close(self) -> None:
        self._sessions.close()

    # -- paths --------------------------------------------------------------------------------

    def hdfs_path(self) -> str:
        """The absolute HDFS path the URI names (resolving a relative HDFS_ROOTPATH against the
        user's home directory, as the hdfs package does)."""
        if self._path is not None:
            return self._path
        root = self.config.root
        if root:
            if not root.startswith("/"):
                home = self._json("GETHOMEDIRECTORY", "/", "finding the home directory")
                root = posixpath.join(str(home.get("Path") or "/"), root)
            joined = posixpath.join(root, self._relative)
        else:
            joined = "/" + self._relative
        path = "/" + posixpath.normpath(joined).lstrip("/")
        self._path = _LATEST_RE.sub(lambda m: self._expand_latest(m), path)
        return self._path

    def _expand_latest(self, match: re.Match[str]) -> str:
        """The hdfs package's ``#LATEST[{N}]`` marker (which the stock resolves through it): the
        most recently modified entry of the directory before it, N levels deep."""
        prefix = match.string[: match.start()] or "/"
        for _ in range(int(match.group(1) or 1)):
            entries = self._children(prefix)
            if not entries or (len(entries) == 1 and not entries[0].get("pathSuffix")):
                raise NotFoundError(
                    f"{self.uri.redacted}: cannot expand #LATEST: {prefix} is empty or a file"
                )
            newest = min(
                entries, key=lambda e: (-int(e.get("modificationTime", 0)), e["pathSuffix"])
            )
            prefix = posixpath.join(prefix, str(newest["pathSuffix"]))
        return prefix[len(match.string[: match.start()]) :] if match.start() else prefix

    def _url(self, namenode: str, path: str) -> str:
        return f"{namenode}/webhdfs/v1{quote(path, safe='/')}"

    def _params(self, op: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"op": op}
        if self.config.user_proxy:
            params["doas"] = self.config.user_proxy
        params.update(extra or {})
        return params

    # -- namenode requests, with HA failover --------------------------------------------------

    def _namenode(
        self, op: str, path: str, what: str, extra: Mapping[str, Any] | None = None
    ) -> requests.Response:
        """One namenode operation (never following redirects), trying each configured namenode
        from the last one that answered: a standby or unreachable namenode is skipped."""
        namenodes = self.config.namenodes
        count = len(namenodes)
        last: InitializerError | None = None
        unreachable: list[str] = []
        transport: Exception | None = None
        for step in range(count):
            index = (self._active + step) % count
            namenode = namenodes[index]
            try:
                response = self._session().get(
                    self._url(namenode, path),
                    params=self._params(op, extra),
                    allow_redirects=False,
                    stream=True,
                    timeout=(CONNECT_TIMEOUT, READ_TIMEOUT),
                    verify=self._verify(),
                )
                if not (op == "OPEN" and response.status_code < 300):
                    # JSON (a listing, a status, an error): read now, bounded.
                    httpcommon.read_metadata(response, f"{self.uri.redacted}: {what}")
            except requests.RequestException as exc:
                unreachable.append(namenode)
                transport = exc
                continue
            if response.status_code < 400:
                self._active = index
                return response
            error = self._http_error(response, what)
            response.close()
            exception, _ = self._remote_exception(response)
            if exception == "StandbyException":
                last = error
                continue
            raise error
        if last is not None:
            raise last
        assert transport is not None
        if self._path is not None and op == "OPEN":
            # The namenode answered the listing: a failure now is worth a retry.
            raise TransientError(
                f"{self.uri.redacted}: {what}: namenode unreachable ({type(transport).__name__})"
            )
        raise self._unreachable(transport, unreachable)

    def _json(self, op: str, path: str, what: str) -> dict[str, Any]:
        response = self._namenode(op, path, what)
        with response:
            try:
                body = response.json()
            except ValueError:
                raise SourceError(
                    f"{self.uri.redacted}: {what}: the namenode answered something that is not "
                    "JSON",
                    "Check that HDFS_NAMENODE is the WebHDFS (HTTP) address of the namenode",
                ) from None
        if not isinstance(body, dict):
            raise SourceError(f"{self.uri.redacted}: {what}: unexpected answer")
        return body

    # -- listing ------------------------------------------------------------------------------

    def _status(self, path: str) -> dict[str, Any]:
        body = self._json("GETFILESTATUS", path, f"reading the status of {path}")
        status = body.get("FileStatus")
        if not isinstance(status, dict):
            raise SourceError(f"{self.uri.redacted}: GETFILESTATUS of {path}: no FileStatus")
        return status

    def _children(self, path: str) -> list[dict[str, Any]]:
        body = self._json("LISTSTATUS", path, f"listing {path}")
        statuses = body.get("FileStatuses", {})
        entries = statuses.get("FileStatus") if isinstance(statuses, dict) else None
        if not isinstance(entries, list):
            raise SourceError(f"{self.uri.redacted}: LISTSTATUS of {path}: no FileStatuses")
        return [e for e in entries if isinstance(e, dict)]

    def _remote_file(self, status: Mapping[str, Any], relative: str, full: str) -> RemoteFile:
        try:
            size = int(status["length"])
        except (KeyError, TypeError, ValueError):
            raise SourceError(
                f"{self.uri.redacted}: the FileStatus of {full} has no length"
            ) from None
        version = f"mtime={status.get('modificationTime', '')}"
        if status.get("fileId") is not None:
            version += f",id={status['fileId']}"
        return RemoteFile(
            path=safe_relpath(relative, "HDFS file"), size=size, version=version, handle=full
        )

    def workers(self) -> int:
        """``N_THREADS`` of the HDFS configuration is the user's own number: not capped."""
        if self.config.n_threads and not getattr(self.settings, "workers", 0):
            return self.config.n_threads
        return super().workers()

    def list(self) -> Listing:
        path = self.hdfs_path()
        status = self._status(path)
        files: list[RemoteFile] = []
        kind = str(status.get("type", "")).upper()
        if kind == "FILE":
            files.append(self._remote_file(status, posixpath.basename(path), path))
        elif kind == "DIRECTORY":
            pending = [(path, "")]
            while pending:
                directory, prefix = pending.pop()
                for entry in self._children(directory):
                    name = str(entry.get("pathSuffix", ""))
                    if not name:
                        continue
                    if not is_plain_name(name):
                        # Walked, "." or ".." lists a directory again, for ever; HDFS has no
                        # such names, so the namenode (or what answers for it) is broken.
                        raise SourceError(
                            f"{self.uri.redacted}: LISTSTATUS of {directory} names an entry "
                            f"{name!r}, which HDFS cannot hold",
                            "Check HDFS_NAMENODE: what answers there is not a sane namenode",
                        )
                    relative = f"{prefix}{name}"
                    full = posixpath.join(directory, name)
                    entry_type = str(entry.get("type", "")).upper()
                    if entry_type == "DIRECTORY":
                        pending.append((full, relative + "/"))
                    elif entry_type == "FILE":
                        files.append(self._remote_file(entry, relative, full))
                    else:
                        log.warning("%s: skipping %s (%s)", self.uri.redacted, full, entry_type)
        else:
            raise SourceError(f"{self.uri.redacted}: {path} is a {kind or 'thing'} of unknown type")
        files.sort(key=lambda f: f.path)
        log.info("%s: %s holds %d files", self.uri.redacted, path, len(files))
        return Listing(files=files, fingerprint=fingerprint_of(files))

    # -- reading ------------------------------------------------------------------------------

    def read(self, file: RemoteFile, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        if end is not None and end <= start:
            return
        extra: dict[str, Any] = {"offset": start}
        if end is not None:
            extra["length"] = end - start
        what = f"reading {file.path}"
        response = self._namenode("OPEN", file.handle, what, extra)
        if response.is_redirect:
            location = response.headers.get("Location", "")
            response.close()
            response = self._datanode(location, what)
        # OPEN's offset/length already select the range: the answer is the range itself.
        with response:
            yield from stream_range(
                response,
                start,
                end,
                label=f"{self.uri.redacted}: {what}",
                ranged=False,
                file_size=file.size or 0,
                block=BLOCK,
            )
        self._check_unchanged(file, what)

    def _check_unchanged(self, file: RemoteFile, what: str) -> None:
        """A datanode's answer carries no version of the file, so ask the namenode once the
        bytes are read: a file replaced since the listing (or during this read) must not have
        its bytes joined to the listed version's (the engine discards the file and lists
        again). One GETFILESTATUS per read, a small cost next to a chunk."""
        if not file.version:
            return
        try:
            status = self._status(file.handle)
        except NotFoundError:
            status = {}
        current = self._remote_file(status, file.path, file.handle).version if status else ""
        if current != file.version:
            raise SourceChangedError(
                f"{self.uri.redacted}: {what}: the file changed at the source since it was listed"
            )

    def _datanode(self, location: str, what: str) -> requests.Response:
        """Follow OPEN's redirect. An Authorization header (from HEADERS) goes only to the
        namenode's own host (a gateway such as Knox redirects to itself), as requests itself
        would do on a redirect; the datanode is authorised by the token in the URL."""
        if not location:
            raise SourceError(f"{self.uri.redacted}: {what}: redirect without a Location")
        namenode_host = urlsplit(self.config.namenodes[self._active]).netloc
        headers: dict[str, str | None] = {}
        if urlsplit(location).netloc != namenode_host:
            headers["Authorization"] = None
        try:
            response = self._session().get(
                location,
                # requests drops a session header whose per-request value is None (documented,
                # merge_setting); types-requests' Mapping[str, str | bytes] leaves None out.
                headers=headers,  # type: ignore[arg-type]
                stream=True,
                allow_redirects=False,
                timeout=(CONNECT_TIMEOUT, READ_TIMEOUT),
                verify=self._verify(),
            )
        except requests.RequestException as exc:
            raise TransientError(
                f"{self.uri.redacted}: {what}: datanode {urlsplit(location).netloc} "
                f"unreachable ({type(exc).__name__})"
            ) from None
        if response.status_code != 200:
            error = self._http_error(response, what + " from the datanode")
            response.close()
            raise error
        return response
