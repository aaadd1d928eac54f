"""A protocol-faithful ModelScope Hub test server, for the endpoints ``modelscope_hub`` (the stock
KServe initializer's client) and our provider call.

Why a server of our own: ModelScope publishes no server, and none is packaged in the registries
this project can reach. This one answers the ``/api/v1`` requests of ``modelscope_hub`` 0.5
(``_legacy_api.LegacyClient`` and ``_download.DownloadManager``) with the Hub's envelope
``{"Code": 200, "Data": ..., "Message": "success", "RequestId": ..., "Success": true}``:

- ``GET /api/v1/models/{owner}/{name}`` → repository info.
- ``GET /api/v1/models/{owner}/{name}/revisions`` → ``Data.RevisionMap.{Branches,Tags}`` of
  ``{"Revision", "CommitId", "CreatedAt"}``.
- ``GET /api/v1/models/{owner}/{name}/repo/files?Revision=&Recursive=True|False[&Root=]`` →
  ``Data.Files`` of ``{"Name", "Path", "Type": "blob"|"tree", "Size", "Sha256", "Revision",
  "IsLFS", "Mode", "CommitId", ...}``.
- ``GET``/``HEAD /api/v1/models/{owner}/{name}/repo?Revision=&FilePath=`` with ``Range``: regular
  files are served by the Hub (206 for a range); LFS files are a 302 to an "OSS" URL on another
  host name (``http://localhost:{port}/oss/{sha256}?Expires=...&Signature=...``), which serves the
  blob with ranges and records any credential (Authorization, Cookie) it receives.
- ``GET /api/v1/repos/internalAccelerationInfo`` (the client's region probe) → no region.

Access: a private model answers 401 without a token, 403 to a valid token without access, and
an unknown token gets 401; the token is accepted as ``Authorization: Bearer`` or as the
``m_session_id`` cookie, as the Hub does. Errors carry the envelope with ``Success: false``.
Faults can be injected, bodies cut short, and every request is counted thread-safely (method,
path and FilePath) for the download-once tests.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, quote, unquote, urlsplit

from tests.servers.repo_hub import CountingHub, HubHandler, requested_range


@dataclass(frozen=True)
class MsFile:
    """One file; ``lfs`` files are served from object storage through a redirect."""

    data: bytes
    lfs: bool = False

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass
class MsRepo:
    repo_id: str
    commits: dict[str, dict[str, MsFile]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    readers: frozenset[str] = frozenset()

    def add_commit(
        self,
        files: Mapping[str, bytes | MsFile],
        branches: tuple[str, ...] = ("master",),
        tags: tuple[str, ...] = (),
    ) -> str:
        normalised = {p: v if isinstance(v, MsFile) else MsFile(v) for p, v in files.items()}
        digest = hashlib.sha1(self.repo_id.encode())
        for path in sorted(normalised):
            digest.update(f"{path}\0{normalised[path].sha256}\n".encode())
        digest.update(str(len(self.commits)).encode())
        sha = digest.hexdigest()
        self.commits[sha] = normalised
        for name in branches:
            self.branches[name] = sha
        for name in tags:
            self.tags[name] = sha
        return sha

    def resolve(self, revision: str) -> str | None:
        return (
            self.tags.get(revision)
            or self.branches.get(revision)
            or (revision if revision in self.commits else None)
        )


class _Error(Exception):
    def __init__(self, status: int, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message = status, message
        self.code = code if code is not None else status


class ModelScopeHub(CountingHub):
    """The server, its models and its counters (:class:`CountingHub`; faults match the request
    key "path?FilePath=…")."""

    name = "modelscope-hub"

    def __init__(self) -> None:
        self.repos: dict[str, MsRepo] = {}
        self.valid_tokens: set[str] = set()
        self.oss_credentials_seen = 0
        #: Listings hold at most this many entries, cut silently (the real Hub stops at 3000).
        self.list_limit: int | None = None
        #: Hostile listings: "tree" entries with these paths every non-recursive listing adds.
        self.phantom_trees: list[str] = []
        super().__init__(self._handler())
        #: Object storage: another host name for the same socket.
        self.oss_url = f"http://localhost:{self.port}"

    def add_repo(self, repo_id: str, readers: tuple[str, ...] = ()) -> MsRepo:
        repo = MsRepo(repo_id, readers=frozenset(readers))
        with self._lock:
            self.repos[repo_id] = repo
            self.valid_tokens.update(readers)
        return repo

    def add_token(self, token: str) -> None:
        with self._lock:
            self.valid_tokens.add(token)

    def reset_counts(self) -> None:
        super().reset_counts()
        with self._lock:
            self.oss_credentials_seen = 0

    def env(self) -> dict[str, str]:
        return {
            "MODELSCOPE_ENDPOINT": self.url,
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }

    # -- request handling ---------------------------------------------------------------------

    def _access(self, repo: MsRepo | None, token: str | None) -> MsRepo:
        if token is not None and token not in self.valid_tokens:
            raise _Error(401, "AccessToken is invalid or expired", 10010103009)
        if repo is None:
            raise _Error(404, "The model does not exist", 10010205001)
        if repo.readers and token not in repo.readers:
            if token is None:
                raise _Error(401, "Login required to access this private model")
            raise _Error(403, "No permission to access this model")
        return repo

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(HubHandler):
            def _token(self) -> str | None:
                auth = self.headers.get("Authorization") or ""
                if auth.startswith("Bearer "):
                    return auth[len("Bearer ") :]
                cookie = SimpleCookie(self.headers.get("Cookie") or "")
                if "m_session_id" in cookie:
                    return cookie["m_session_id"].value
                return None

            def _dispatch(self, head: bool) -> None:
                parts = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
                key = parts.path + (f"?FilePath={query['FilePath']}" if "FilePath" in query else "")
                fault = self._claim(server, key)
                try:
                    if fault is not None:
                        raise _Error(fault.status, "injected fault")
                    self._route(parts.path, query, head)
                except _Error as error:
                    self._send_error(error, head, dict(fault.headers) if fault else {})
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _send_error(self, error: _Error, head: bool, headers: dict[str, str]) -> None:
                body = json.dumps(
                    {
                        "Code": error.code,
                        "Message": error.message,
                        "RequestId": uuid.uuid4().hex,
                        "Success": False,
                    }
                ).encode()
                self.send_response(error.status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self._finish_json(body, head)

            def _json(self, data: object, head: bool) -> None:
                body = json.dumps(
                    {
                        "Code": 200,
                        "Data": data,
                        "Message": "success",
                        "RequestId": uuid.uuid4().hex,
                        "Success": True,
                    }
                ).encode()
                self.send_response(200)
                self._finish_json(body, head)

            def _route(self, path: str, query: dict[str, str], head: bool) -> None:
                segments = [unquote(s) for s in path.split("/")[1:]]
                if segments[:1] == ["oss"] and len(segments) == 2:
                    if self.headers.get("Authorization") or self.headers.get("Cookie"):
                        with server._lock:
                            server.oss_credentials_seen += 1
                    return self._oss(segments[1], head)
                if segments[:4] == ["api", "v1", "repos", "internalAccelerationInfo"]:
                    return self._json({"InternalRegionQueryAddress": ""}, head)
                if segments[:3] == ["api", "v1", "models"] and len(segments) >= 5:
                    repo_id = f"{segments[3]}/{segments[4]}"
                    with server._lock:
                        repo = server.repos.get(repo_id)
                    repo = server._access(repo, self._token())
                    rest = segments[5:]
                    if not rest:
                        return self._json({"Id": 1, "Path": repo_id, "Name": segments[4]}, head)
                    if rest == ["revisions"]:
                        return self._revisions(repo, head)
                    if rest == ["repo", "files"]:
                        return self._files(repo, query, head)
                    if rest == ["repo"]:
                        return self._download(repo, query, head)
                raise _Error(404, "no such API")

            def _commit(self, repo: MsRepo, revision: str) -> str:
                sha = repo.resolve(revision)
                if sha is None:
                    raise _Error(404, f"Revision {revision} does not exist", 10010205002)
                return sha

            def _revisions(self, repo: MsRepo, head: bool) -> None:
                def detail(name: str, sha: str) -> dict[str, object]:
                    return {
                        "Revision": name,
                        "CommitId": sha,
                        "CreatedAt": 1700000000,
                        "CreatedBy": "test",
                        "Message": "",
                    }

                data = {
                    "RevisionMap": {
                        "Branches": [detail(n, s) for n, s in sorted(repo.branches.items())],
                        "Tags": [detail(n, s) for n, s in sorted(repo.tags.items())] or None,
                    }
                }
                return self._json(data, head)

            def _files(self, repo: MsRepo, query: dict[str, str], head: bool) -> None:
                sha = self._commit(repo, query.get("Revision", "master"))
                recursive = query.get("Recursive", "False").lower() == "true"
                root = query.get("Root", "").strip("/")
                prefix = root + "/" if root else ""
                entries: list[dict[str, object]] = []
                dirs: set[str] = set()
                for path in sorted(repo.commits[sha]):
                    if not path.startswith(prefix):
                        continue
                    parts = path[len(prefix) :].split("/")
                    for depth in range(1, len(parts)):
                        if depth > 1 and not recursive:
                            break
                        dirs.add(prefix + "/".join(parts[:depth]))
                    if recursive or len(parts) == 1:
                        item = repo.commits[sha][path]
                        entries.append(
                            {
                                "CommitId": sha,
                                "CommitMessage": "upload",
                                "CommittedDate": 1700000000,
                                "Committer": "test",
                                "IsLFS": item.lfs,
                                "Mode": "33188",
                                "Name": path.rsplit("/", 1)[-1],
                                "Path": path,
                                "Revision": sha,
                                "Sha256": item.sha256,
                                "Size": len(item.data),
                                "Type": "blob",
                            }
                        )
                if root and not entries and not dirs:
                    raise _Error(404, f"{root} does not exist")
                trees = [
                    {"Name": d.rsplit("/", 1)[-1], "Path": d, "Type": "tree", "Size": 0}
                    for d in sorted(dirs)
                ]
                if not recursive:
                    trees += [
                        {"Name": p.rsplit("/", 1)[-1], "Path": p, "Type": "tree", "Size": 0}
                        for p in server.phantom_trees
                    ]
                files = (trees + entries)[: server.list_limit]
                return self._json({"Files": files, "LatestCommitter": {}}, head)

            def _download(self, repo: MsRepo, query: dict[str, str], head: bool) -> None:
                sha = self._commit(repo, query.get("Revision", "master"))
                path = query.get("FilePath", "")
                item = repo.commits[sha].get(path)
                if item is None:
                    raise _Error(404, f"File {path} does not exist")
                if item.lfs:
                    expires = int(time.time()) + 3600
                    location = (
                        f"{server.oss_url}/oss/{item.sha256}?Expires={expires}"
                        f"&OSSAccessKeyId=test&Signature={quote(uuid.uuid4().hex)}"
                    )
                    self.send_response(302)
                    self.send_header("Location", location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                return self._bytes(item.data, head)

            def _oss(self, sha256: str, head: bool) -> None:
                with server._lock:
                    repos = list(server.repos.values())
                for repo in repos:
                    for files in repo.commits.values():
                        for item in files.values():
                            if item.lfs and item.sha256 == sha256:
                                return self._bytes(item.data, head)
                raise _Error(404, "NoSuchKey")

            def _bytes(self, data: bytes, head: bool) -> None:
                start, end, status = 0, len(data), 200
                try:
                    wanted = requested_range(self.headers.get("Range"), len(data))
                except ValueError:
                    raise _Error(416, "bad range") from None
                if wanted is not None:
                    start, end = wanted
                    if (start >= len(data) and len(data) > 0) or start > end:
                        raise _Error(416, "range not satisfiable")
                    status = 206
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(end - start))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
                self.end_headers()
                if not head:
                    if self.truncate_after is not None:
                        end = min(end, start + self.truncate_after)
                        self.close_connection = True
                    self.wfile.write(data[start:end])

        return Handler


def start_modelscope_hub() -> ModelScopeHub:
    """Start a server on a free port and return once it answers (polled, with a deadline)."""
    server = ModelScopeHub().start()
    server.wait_answering("/api/v1/repos/internalAccelerationInfo", "modelscope test server")
    return server


__all__ = ["ModelScopeHub", "MsFile", "MsRepo", "start_modelscope_hub"]
