"""A protocol-faithful Hugging Face Hub test server, for the endpoints huggingface_hub and our
provider call.

Why a server of our own: no public mirror serves repositories defined by a test, with private
repos, several branches, LFS redirects to another host and request counting. This one speaks the
Hub's wire protocol as huggingface_hub 2.x parses it (``HfApi.model_info``, ``list_repo_tree``,
``get_hf_file_metadata``/``hf_hub_download``), so the stock KServe initializer can be pointed at it
too (``HF_ENDPOINT``).

Endpoints (``{kind}`` is ``models``, ``datasets`` or ``spaces``; revisions are URL-encoded):

- ``GET /api/{kind}/{repo}`` and ``GET /api/{kind}/{repo}/revision/{rev}``: ``{"id", "sha",
  "siblings": [{"rfilename", "size", "blobId", "lfs"?: {"sha256", "size", "pointerSize"}}], ...}``.
- ``GET /api/{kind}/{repo}/tree/{rev}[/{path}]?recursive=true|false[&cursor=N]``: a JSON list of
  ``{"type": "file", "path", "size", "oid", "lfs"?: {"oid", "size", "pointerSize"}}`` and
  ``{"type": "directory", "path", "oid", "size": 0}``, paginated with a GitHub-style
  ``Link: <url>; rel="next"`` header after :attr:`HubServer.page_size` entries.
- ``HEAD``/``GET /[{kind}/]{repo}/resolve/{rev}/{path}``: regular files are answered directly
  (``ETag`` = quoted git blob id, ``X-Repo-Commit``, ``Content-Length``, ``Accept-Ranges``, 206
  for a ``Range``); LFS files are a 302 to ``http://localhost:{port}/cdn/{sha256}`` (another
  host name than ``127.0.0.1``, as the Hub redirects to its CDN), with ``X-Linked-Etag``,
  ``X-Linked-Size`` and ``X-Repo-Commit``. The CDN serves the blob with ranges and records any
  ``Authorization`` header it receives (it must never get one). The benchmark runs this server
  in a process of its own with an nginx CDN instead (:mod:`tests.servers.hub_process`).

Access: a private repo answers 401 (``X-Error-Code: RepoNotFound``) without a token, as the Hub
does, 404 with a valid token of an account without access, and an unknown token gets 401
``Invalid credentials in Authorization header``. Errors carry ``X-Error-Code``/``X-Error-Message``
as the Hub's do. Faults can be injected (:meth:`HubServer.inject`, bodies cut short with
:meth:`HubServer.truncate`) and every request is counted
(:meth:`HubServer.count`), thread-safely, for the download-once tests.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

from tests.servers.repo_hub import CountingHub, HubHandler, requested_range

KINDS = {"models": "model", "datasets": "dataset", "spaces": "space"}


def git_blob_oid(data: bytes) -> str:
    """The git blob id the Hub reports as ``oid`` for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    )


@dataclass(frozen=True)
class HubFile:
    """One file of a commit; ``lfs`` files are stored as pointers in git, content on the CDN.

    The digests are computed once (a CDN request looks its blob up by sha256 among all files)."""

    data: bytes
    lfs: bool = False

    @property
    def size(self) -> int:
        return len(self.data)

    @functools.cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @functools.cached_property
    def oid(self) -> str:
        if self.lfs:
            return git_blob_oid(lfs_pointer(self.sha256, self.size))
        return git_blob_oid(self.data)

    def tree_entry(self, path: str) -> dict[str, object]:
        entry: dict[str, object] = {
            "type": "file",
            "oid": self.oid,
            "size": self.size,
            "path": path,
        }
        if self.lfs:
            pointer = lfs_pointer(self.sha256, self.size)
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": len(pointer)}
        return entry


@dataclass
class HubRepo:
    """A repository: commits (sha -> files), branches/tags (name -> sha) and who may read it."""

    repo_id: str
    kind: str = "models"
    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    #: Tokens that may read it; empty means public.
    readers: frozenset[str] = frozenset()
    #: Gated: public name, but reading needs a token of ``readers`` (403 GatedRepo otherwise).
    gated: bool = False

    def add_commit(
        self, files: Mapping[str, bytes | HubFile], refs: tuple[str, ...] = ("main",)
    ) -> str:
        """Add a commit holding ``files`` (``bytes`` are regular files); point ``refs`` at it."""
        normalised = {
            path: value if isinstance(value, HubFile) else HubFile(value)
            for path, value in files.items()
        }
        digest = hashlib.sha1(self.repo_id.encode())
        for path in sorted(normalised):
            digest.update(f"{path}\0{normalised[path].oid}\n".encode())
        digest.update(str(len(self.commits)).encode())
        sha = digest.hexdigest()
        self.commits[sha] = normalised
        for ref in refs:
            self.refs[ref] = sha
        return sha

    def resolve(self, revision: str) -> str | None:
        if revision in self.commits:
            return revision
        return self.refs.get(revision)


class _Error(Exception):
    def __init__(self, status: int, code: str = "", message: str = "") -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class HubServer(CountingHub):
    """The server, its repositories and its counters (:class:`CountingHub`). Start with
    :meth:`start`."""

    name = "hub-server"

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.repos: dict[tuple[str, str], HubRepo] = {}
        self.valid_tokens: set[str] = set()
        self.page_size = 1000
        #: A broken mirror: the last page of a listing links back to its first page.
        self.cycle_pages = False
        self.cdn_authorization_seen = 0
        super().__init__(self._handler_class(), host, port)
        #: The CDN's base: another host name for the same socket, as the Hub's CDN is elsewhere
        #: (or a CDN of its own: LFS files are redirected to ``{cdn_url}/cdn/{sha256}``).
        self.cdn_url = f"http://localhost:{self.port}"

    # -- setup --------------------------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        kind: str = "models",
        readers: tuple[str, ...] = (),
        gated: bool = False,
    ) -> HubRepo:
        repo = HubRepo(repo_id, kind, readers=frozenset(readers), gated=gated)
        with self._lock:
            self.repos[(kind, repo_id)] = repo
            self.valid_tokens.update(readers)
        return repo

    def add_token(self, token: str) -> None:
        """A valid token of an account that reads only public repos."""
        with self._lock:
            self.valid_tokens.add(token)

    def reset_counts(self) -> None:
        super().reset_counts()
        with self._lock:
            self.cdn_authorization_seen = 0

    def env(self, home: str | None = None) -> dict[str, str]:
        """Environment for a subprocess that should talk to this server and nothing else."""
        return client_env(self.url, home)

    # -- request handling ---------------------------------------------------------------------

    def _access(self, repo: HubRepo | None, auth: str | None) -> HubRepo:
        token = None
        if auth:
            if not auth.startswith("Bearer "):
                raise _Error(401, "", "Invalid credentials in Authorization header")
            token = auth[len("Bearer ") :]
            if token not in self.valid_tokens:
                raise _Error(401, "", "Invalid credentials in Authorization header")
        if repo is None or (repo.readers and not repo.gated and token not in repo.readers):
            # The Hub does not reveal whether a private repo exists.
            status = 404 if token else 401
            raise _Error(status, "RepoNotFound", "Repository not found")
        if repo.gated and token not in repo.readers:
            if token is None:
                raise _Error(401, "GatedRepo", "Access to this gated repository requires a token")
            raise _Error(403, "GatedRepo", "Access to model is restricted; request access")
        return repo

    def _find(self, kind: str, owner: str, name: str) -> HubRepo | None:
        with self._lock:
            return self.repos.get((kind, f"{owner}/{name}"))

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(HubHandler):
            def _dispatch(self, head: bool) -> None:
                parts = urlsplit(self.path)
                fault = self._claim(server, parts.path)
                try:
                    if fault is not None:
                        raise _Error(fault.status, "", "injected fault")
                    self._route(parts.path, parse_qs(parts.query), head)
                except _Error as error:
                    headers = dict(fault.headers) if fault else {}
                    self._send_error(error, head, headers)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _send_error(self, error: _Error, head: bool, headers: dict[str, str]) -> None:
                body = json.dumps({"error": error.message or f"HTTP {error.status}"}).encode()
                self.send_response(error.status)
                if error.code:
                    self.send_header("X-Error-Code", error.code)
                if error.message:
                    self.send_header("X-Error-Message", error.message)
                for key, value in headers.items():
                    self.send_header(key, value)
                self._finish_json(body, head)

            def _json(self, data: object, head: bool, extra: Mapping[str, str] = {}) -> None:
                body = json.dumps(data).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for key, value in extra.items():
                    self.send_header(key, value)
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _route(self, path: str, query: dict[str, list[str]], head: bool) -> None:
                segments = [unquote(s) for s in path.split("/")[1:]]
                auth = self.headers.get("Authorization")
                if segments[:1] == ["cdn"] and len(segments) == 2:
                    if auth:
                        with server._lock:
                            server.cdn_authorization_seen += 1
                    return self._cdn(segments[1], head)
                if segments[:1] == ["api"] and len(segments) >= 4 and segments[1] in KINDS:
                    kind, owner, name, rest = segments[1], segments[2], segments[3], segments[4:]
                    repo = server._access(server._find(kind, owner, name), auth)
                    return self._api(repo, rest, query, head)
                kind = "models"
                if segments and segments[0] in ("datasets", "spaces"):
                    kind, segments = segments[0], segments[1:]
                if len(segments) >= 5 and segments[2] == "resolve":
                    repo = server._access(server._find(kind, segments[0], segments[1]), auth)
                    return self._resolve(repo, segments[3], "/".join(segments[4:]), head)
                raise _Error(404, "", "not found")

            def _commit(self, repo: HubRepo, revision: str) -> str:
                sha = repo.resolve(revision)
                if sha is None:
                    raise _Error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                return sha

            def _api(
                self, repo: HubRepo, rest: list[str], query: dict[str, list[str]], head: bool
            ) -> None:
                if not rest or (rest[0] == "revision" and len(rest) >= 2):
                    revision = "/".join(rest[1:]) if rest else "main"
                    sha = self._commit(repo, revision)
                    files = repo.commits[sha]
                    siblings = []
                    for path in sorted(files):
                        entry: dict[str, object] = {
                            "rfilename": path,
                            "size": files[path].size,
                            "blobId": files[path].oid,
                        }
                        if files[path].lfs:
                            # Siblings name the LFS digest "sha256"; the tree API calls it "oid".
                            lfs = dict(files[path].tree_entry(path)["lfs"])  # type: ignore[arg-type]
                            entry["lfs"] = {"sha256": lfs.pop("oid"), **lfs}
                        siblings.append(entry)
                    owner = repo.repo_id.split("/")[0]
                    info = {
                        "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
                        "id": repo.repo_id,
                        "modelId": repo.repo_id,
                        "author": owner,
                        "sha": sha,
                        "lastModified": "2024-01-01T00:00:00.000Z",
                        "createdAt": "2024-01-01T00:00:00.000Z",
                        "private": bool(repo.readers) and not repo.gated,
                        "gated": "manual" if repo.gated else False,
                        "disabled": False,
                        "downloads": 0,
                        "likes": 0,
                        "tags": [],
                        "siblings": siblings,
                    }
                    return self._json(info, head)
                if rest[0] == "tree" and len(rest) >= 2:
                    sha = self._commit(repo, rest[1])
                    return self._tree(repo, sha, rest[1], "/".join(rest[2:]), query, head)
                raise _Error(404, "", "unknown API route")

            def _tree(
                self,
                repo: HubRepo,
                sha: str,
                revision: str,
                folder: str,
                query: dict[str, list[str]],
                head: bool,
            ) -> None:
                recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
                files = repo.commits[sha]
                entries = list(_tree_entries(files, folder.strip("/"), recursive))
                if folder and not entries:
                    raise _Error(404, "EntryNotFound", f"{folder} does not exist on {revision}")
                cursor = int(query.get("cursor", ["0"])[0])
                page = entries[cursor : cursor + server.page_size]
                extra = {}
                more = cursor + server.page_size < len(entries)
                if more or server.cycle_pages:  # cycle_pages: the last page links to the first
                    params = {"recursive": str(recursive).lower(), "expand": "false"}
                    params["cursor"] = str(cursor + server.page_size if more else 0)
                    path = urlsplit(self.path).path
                    extra["Link"] = f'<{server.url}{path}?{urlencode(params)}>; rel="next"'
                return self._json(page, head, extra)

            def _resolve(self, repo: HubRepo, revision: str, path: str, head: bool) -> None:
                sha = self._commit(repo, revision)
                item = repo.commits[sha].get(path)
                if item is None:
                    raise _Error(404, "EntryNotFound", f"{path} does not exist on {revision}")
                if item.lfs:
                    self.send_response(302)
                    self.send_header("Location", f"{server.cdn_url}/cdn/{item.sha256}")
                    self.send_header("X-Repo-Commit", sha)
                    self.send_header("ETag", f'"{item.oid}"')
                    self.send_header("X-Linked-Etag", f'"{item.sha256}"')
                    self.send_header("X-Linked-Size", str(item.size))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self._bytes(item.data, f'"{item.oid}"', head, {"X-Repo-Commit": sha})

            def _cdn(self, sha256: str, head: bool) -> None:
                for repo in list(server.repos.values()):
                    for files in repo.commits.values():
                        for item in files.values():
                            if item.lfs and item.sha256 == sha256:
                                return self._bytes(item.data, f'"{sha256}"', head, {})
                raise _Error(404, "", "no such blob")

            def _bytes(self, data: bytes, etag: str, head: bool, extra: Mapping[str, str]) -> None:
                start, end = 0, len(data)
                status = 200
                try:
                    wanted = requested_range(self.headers.get("Range"), len(data))
                except ValueError:
                    raise _Error(416, "", "bad range") from None
                if wanted is not None:
                    start, end = wanted
                    if start >= len(data) or start >= end:
                        raise _Error(416, "", "range not satisfiable")
                    status = 206
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("ETag", etag)
                self.send_header("Content-Length", str(end - start))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
                for key, value in extra.items():
                    self.send_header(key, value)
                self.end_headers()
                if not head:
                    if self.truncate_after is not None:
                        end = min(end, start + self.truncate_after)
                        self.close_connection = True  # the client sees a short body
                    self.wfile.write(data[start:end])

        return Handler


def _tree_entries(
    files: Mapping[str, HubFile], folder: str, recursive: bool
) -> Iterator[dict[str, object]]:
    """Entries below ``folder`` as the Hub lists them: directories first, then files, sorted."""
    prefix = folder + "/" if folder else ""
    directories: set[str] = set()
    found: list[dict[str, object]] = []
    for path in sorted(files):
        if not path.startswith(prefix):
            continue
        rest = path[len(prefix) :]
        parts = rest.split("/")
        for depth in range(1, len(parts)):
            if depth > 1 and not recursive:
                break
            directories.add(prefix + "/".join(parts[:depth]))
        if recursive or len(parts) == 1:
            found.append(files[path].tree_entry(path))
    for directory in sorted(directories):
        oid = hashlib.sha1(directory.encode()).hexdigest()
        yield {"type": "directory", "oid": oid, "size": 0, "path": directory}
    yield from found


def client_env(url: str, home: str | None = None) -> dict[str, str]:
    """Environment for a subprocess that should talk to the Hub at ``url`` and nothing else."""
    env = {"HF_ENDPOINT": url, "HF_HUB_DISABLE_TELEMETRY": "1"}
    if home:
        env["HF_HOME"] = home
    # Keep the Xet path and implicit token files out of the way, and never use a proxy.
    env["HF_HUB_DISABLE_XET"] = "1"
    env["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1"
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def start_hub() -> HubServer:
    """Start a server on a free port and return once it answers (polled, with a deadline)."""
    server = HubServer().start()
    server.wait_answering("/api/models/-/-", "hub test server")
    return server


__all__ = ["HubFile", "HubRepo", "HubServer", "client_env", "git_blob_oid", "start_hub"]
