"""Git repositories (``https://host/…/repo.git[@ref]``, ``git://``, ``ssh://``), with dulwich.

Why dulwich: it is pure Python (no ``git`` binary in the image) and it is what the stock
initializer uses, so servers that work with one work with the other.

How: a shallow fetch (depth 1) of the one commit we need into a private bare repository under
``$TMPDIR``, then the commit's tree is written out file by file into a scratch tree, hashing each
file (sha256) on the way. The listing presents those files, so the engine copies and verifies
them into staging like any other source and the store commits them behind a marker. The
fetched pack is removed as soon as the tree is written, and the scratch tree on :meth:`close`.
``.git`` reaches the model only when asked (``git_keep_metadata``): then the fetched
repository itself is listed under ``.git/``, made non-bare (a config with ``origin``, the refs
the server advertised for what was fetched, ``HEAD`` on the branch or detached at the commit,
the ``shallow`` file, an index of the commit's tree), so ``git log`` and ``git status`` work in
the model directory. Each of its files is hashed and verified like the model's own.

``@ref`` may be a branch, a tag or a commit (full or abbreviated sha); without it, the remote's
``HEAD``. A full sha that the server does not advertise is first asked for shallowly (servers
with ``uploadpack.allowReachableSHA1InWant`` or protocol v2 allow it); when refused, all
branches and tags are fetched and the commit looked up among them. The resolved commit sha is
the source's fingerprint.

Credentials: ``GIT_USERNAME`` / ``GIT_PASSWORD`` (a Kubernetes secret), and a username written in
the URL (``https://user@host/repo.git``), which wins over ``GIT_USERNAME`` as in the stock
initializer. A password in the URL is used only when ``GIT_PASSWORD`` is unset; every password
is registered for redaction and the URL handed to dulwich carries none.

Deliberate differences from the stock initializer (documented in docs/providers/git.md): no
``.git`` directory in the model unless ``git_keep_metadata`` asks for one; ``@ref`` is
honoured (the stock one passes it to the server as part of the URL and fails); symbolic links
that stay inside the repository become copies of their target, links that leave it and
submodules are skipped with a warning; Git LFS pointer files are kept as they are (neither
initializer fetches LFS objects) and reported.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit, urlunsplit

from dulwich.client import HTTPUnauthorized, get_transport_and_path
from dulwich.errors import GitProtocolError, HangupException, NotGitRepository
from dulwich.index import Index, IndexEntry
from dulwich.objects import Commit, Tag
from dulwich.refs import check_ref_format
from dulwich.repo import Repo

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
from storage_initializer.paths import UnsafePathError, safe_relpath, selected
from storage_initializer.providers.base import Listing, RemoteFile, Source, read_local_range
from storage_initializer.redact import register_secret

log = logging.getLogger(__name__)

#: ``<url ending in .git>[@ref]``; the ref may not hold '/' only after the last ".git" (a
#: branch such as feature/x is written url.git@feature/x and is matched by the second form).
_REF_RE = re.compile(r"^(?P<url>.+?\.git)(?:@(?P<ref>[^?#]+?))?/?$", re.IGNORECASE)
_HEX_RE = re.compile(r"^[0-9a-f]{4,40}$")
_LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"
#: Connect and read timeouts for HTTP(S) remotes, in seconds.
TIMEOUT = 60.0
#: Fetch attempts when the failure looks transient (connection reset, 5xx).
ATTEMPTS = 3
#: Symbolic links followed in a row before we call it a loop.
MAX_LINK_HOPS = 40
S_IFGITLINK = 0o160000
#: Appended to the commit in the fingerprint when ``.git`` is kept: a model pulled without it is
#: a different result, so --revalidate after turning the setting on downloads again.
KEPT_METADATA_SUFFIX = "+.git"


@dataclass(frozen=True)
class GitLocation:
    """What a git URI names: the remote URL without credentials, the ref, and who asks."""

    url: str
    ref: str | None
    username: str | None
    password: str | None


def parse_location(raw: str, environ: Mapping[str, str] | None = None) -> GitLocation:
    """Split ``raw`` into remote URL, ref and credentials (URL user wins over GIT_USERNAME)."""
    env = os.environ if environ is None else environ
    match = _REF_RE.match(raw.strip())
    if not match:
        raise UsageError(
            "a git source must end in .git, optionally followed by @<branch|tag|commit>",
            "Write it as https://host/owner/repo.git or https://host/owner/repo.git@v1.0",
        )
    url, ref = match.group("url"), match.group("ref")
    username = env.get("GIT_USERNAME") or None
    password = env.get("GIT_PASSWORD") or None
    if "://" in url:
        parts = urlsplit(url)
        if "@" in parts.netloc:
            userinfo, _, hostport = parts.netloc.rpartition("@")
            user, _, url_password = userinfo.partition(":")
            if user:
                username = unquote(user)
            if url_password and not password:
                password = unquote(url_password)
            url = urlunsplit((parts.scheme, hostport, parts.path, parts.query, ""))
    register_secret(password)
    return GitLocation(url, ref or None, username, password)


class _Unresolved(Exception):
    """Raised inside determine_wants when the ref needs a full fetch (abbreviated sha)."""


class _UnknownRef(Exception):
    def __init__(self, refs: Mapping[bytes, bytes]) -> None:
        super().__init__("unknown ref")
        self.refs = refs


class GitSource(Source):
    """A repository's tree at one commit; files are read from a local scratch copy."""

    default_workers: ClassVar[int] = 4
    supports_ranges: ClassVar[bool] = True

    def __init__(self, uri: Any, settings: Any) -> None:
        super().__init__(uri, settings)
        self.location = parse_location(uri.raw)
        self._scratch: Path | None = None
        #: What the remote advertised at the last fetch (refs, and symbolic refs such as HEAD).
        self._advertised: dict[bytes, bytes] = {}
        self._symrefs: dict[bytes, bytes] = {}

    # -- the remote ---------------------------------------------------------------------------

    def _client(self) -> tuple[Any, str]:
        from dulwich.client import default_urllib3_manager
        from dulwich.config import ConfigDict

        kwargs: dict[str, Any] = {}
        if self.location.url.startswith(("http://", "https://")):
            config = ConfigDict()
            bundle = tls.requests_verify()
            if isinstance(bundle, str):
                config.set((b"http",), b"sslCAInfo", bundle.encode())
            kwargs["pool_manager"] = default_urllib3_manager(
                config, base_url=self.location.url, timeout=TIMEOUT
            )
        if self.location.username:
            kwargs["username"] = self.location.username
        if self.location.password:
            kwargs["password"] = self.location.password
        try:
            return get_transport_and_path(self.location.url, quiet=True, **kwargs)
        except ValueError as exc:
            raise UsageError(
                f"{self.uri.redacted} is not a git URL dulwich can use: {exc}"
            ) from None

    def _wants(self, refs: Mapping[bytes, bytes]) -> list[bytes]:
        """The commit (or tag) to fetch for our ref, from the remote's advertised refs."""
        ref = self.location.ref
        if ref is None:
            head = refs.get(b"HEAD")
            if not head:
                raise _UnknownRef(refs)
            return [head]
        name = ref.encode()
        for candidate in (b"refs/heads/" + name, b"refs/tags/" + name, name):
            if candidate.startswith(b"refs/") or candidate == b"HEAD":
                peeled = refs.get(candidate + b"^{}")
                if peeled:
                    return [peeled]
                if refs.get(candidate):
                    return [refs[candidate]]
        lowered = ref.lower()
        if _HEX_RE.match(lowered):
            for sha in refs.values():
                if sha.decode("ascii", "replace").startswith(lowered):
                    return [sha]
            if len(lowered) == 40:
                return [lowered.encode()]
            raise _Unresolved()
        raise _UnknownRef(refs)

    def _fetch(self, repo: Repo) -> bytes:
        """Fetch what the ref names into ``repo``; return the commit sha (hex bytes)."""
        client, path = self._client()
        chosen: list[bytes] = []
        advertised: dict[bytes, bytes] = {}

        def shallow_wants(refs: Mapping[bytes, bytes], depth: int | None = None) -> list[bytes]:
            advertised.update(refs)
            self._advertised = dict(refs)
            chosen[:] = self._wants(refs)
            return list(chosen)

        try:
            result = client.fetch(path, repo, determine_wants=shallow_wants, depth=1)
            self._symrefs = dict(getattr(result, "symrefs", None) or {})
        except _Unresolved:
            chosen.clear()
        except (GitProtocolError, HangupException) as exc:
            # A server that will not send an unadvertised commit says so here; fetch everything.
            if not chosen or chosen[0] in advertised.values():
                raise
            log.info(
                "%s: the server refused a shallow fetch of %s (%s); fetching all branches and tags",
                self.uri.redacted,
                chosen[0].decode(),
                _short(exc),
            )
            chosen.clear()
        if chosen and chosen[0] in repo.object_store:
            return _peel(repo, chosen[0], self.uri.redacted)
        return self._full_fetch(repo)

    def _full_fetch(self, repo: Repo) -> bytes:
        client, path = self._client()

        def all_refs(refs: Mapping[bytes, bytes], depth: int | None = None) -> list[bytes]:
            self._advertised = dict(refs)
            return sorted(
                {
                    sha
                    for name, sha in refs.items()
                    if name.startswith((b"refs/heads/", b"refs/tags/")) and sha
                }
            )

        client.fetch(path, repo, determine_wants=all_refs)
        wanted = (self.location.ref or "").lower()
        if len(wanted) == 40 and wanted.encode() in repo.object_store:
            return _peel(repo, wanted.encode(), self.uri.redacted)
        matches = [sha for sha in repo.object_store if sha.decode().startswith(wanted)]
        commits = [sha for sha in matches if isinstance(repo.object_store[sha], Commit)]
        if len(commits) == 1:
            return commits[0]
        if len(commits) > 1:
            raise UsageError(
                f"{self.uri.redacted}: the abbreviated commit {wanted!r} is ambiguous",
                "Write more digits of the commit sha",
            )
        raise NotFoundError(
            f"{self.uri.redacted}: no branch, tag or commit named {self.location.ref!r}",
            "Check the ref after '@'; a commit must be reachable from a branch or tag",
        )

    def _describe(self, exc: BaseException) -> InitializerError:
        """Turn a dulwich/urllib3 failure into the error a user can act on."""
        what = self.uri.redacted
        if isinstance(exc, InitializerError):
            return exc
        if isinstance(exc, _UnknownRef):
            names = sorted(
                n.decode("utf-8", "replace").removeprefix("refs/heads/").removeprefix("refs/tags/")
                for n in exc.refs
                if n.startswith((b"refs/heads/", b"refs/tags/")) and not n.endswith(b"^{}")
            )
            shown = ", ".join(names[:10]) + (" …" if len(names) > 10 else "")
            if self.location.ref is None:
                return NotFoundError(f"{what}: the repository is empty (it has no HEAD)")
            return NotFoundError(
                f"{what}: no branch, tag or commit named {self.location.ref!r}",
                f"Branches and tags of the repository: {shown or 'none'}",
            )
        if isinstance(exc, NotGitRepository):
            return NotFoundError(f"git repository {what} not found")
        if isinstance(exc, HTTPUnauthorized):
            if self.location.username or self.location.password:
                return AccessDeniedError(
                    f"git repository {what}: the server refused the credentials",
                    "Check GIT_USERNAME and GIT_PASSWORD (or the user in the URL) in the "
                    "secret given to the pod",
                )
            return AccessDeniedError(
                f"git repository {what} requires authentication",
                "Give the pod GIT_USERNAME and GIT_PASSWORD (a token) from a secret",
            )
        text = _short(exc)
        if re.search(r"unexpected http resp (401|403)", text):
            return AccessDeniedError(f"git repository {what}: access denied ({text})")
        if re.search(r"unexpected http resp (404|410)", text):
            return NotFoundError(f"git repository {what} not found ({text})")
        if any(
            marker in text
            for marker in (
                "Connection refused",
                "Name or service not known",
                "NameResolutionError",
                "Failed to resolve",
                "No route to host",
                "Errno 111",
                "Errno -2",
                "Errno -3",
            )
        ):
            return SourceError(
                f"cannot reach the git server of {what} ({text})",
                "Check the host name, the port and the network policy of the namespace",
            )
        if "CERTIFICATE_VERIFY_FAILED" in text or "SSLError" in text:
            return SourceError(
                f"git repository {what}: TLS verification failed ({text})",
                "Trust the server's CA with the global CA bundle (CA_BUNDLE_CONFIGMAP_NAME)",
            )
        if re.search(r"unexpected http resp 5\d\d|timed out|reset|Timeout|Hangup", text):
            return TransientError(f"git repository {what}: {text}")
        return SourceError(f"git repository {what}: {text}")

    # -- Source -------------------------------------------------------------------------------

    def list(self) -> Listing:
        self.close()
        self._scratch = Path(tempfile.mkdtemp(prefix="storage-initializer-git-"))
        try:
            return self._list(self._scratch)
        except BaseException:
            self.close()  # a failed listing leaves nothing behind in $TMPDIR
            raise

    def _list(self, scratch: Path) -> Listing:
        for attempt in range(1, ATTEMPTS + 1):
            repo_dir = scratch / "repo.git"
            shutil.rmtree(repo_dir, ignore_errors=True)
            repo = Repo.init_bare(str(repo_dir), mkdir=True)
            try:
                log.info("fetching %s", self.uri.redacted)
                commit = self._fetch(repo)
                break
            except Exception as exc:
                error = self._describe(exc)
                if not isinstance(error, TransientError) or attempt == ATTEMPTS:
                    raise error from None
                log.warning("%s; retrying (attempt %d of %d)", error, attempt + 1, ATTEMPTS)
                time.sleep(min(10.0, 0.5 * 2**attempt))
            finally:
                repo.close()
        repo = Repo(str(repo_dir))
        metadata: list[RemoteFile] = []
        try:
            files = self._write_tree(repo, commit, scratch / "tree")
            if files and self._keep_metadata():
                metadata = self._metadata(repo, commit)
        finally:
            repo.close()
            if not metadata:
                shutil.rmtree(repo_dir, ignore_errors=True)
        sha = commit.decode()
        log.info("%s is commit %s: %d files", self.uri.redacted, sha, len(files))
        if not files:
            raise NotFoundError(f"{self.uri.redacted}: commit {sha} holds no files")
        if metadata:
            log.info(
                "%s: keeping .git (%d files, git_keep_metadata)", self.uri.redacted, len(metadata)
            )
            return Listing(files + metadata, sha + KEPT_METADATA_SUFFIX)
        return Listing(files, sha)

    # -- .git, when asked ---------------------------------------------------------------------

    def _keep_metadata(self) -> bool:
        return bool(getattr(self.settings, "git_keep_metadata", False))

    def _metadata(self, repo: Repo, commit: bytes) -> list[RemoteFile]:
        """Turn the bare repository we fetched into the model's ``.git`` and list its files;
        empty (with a warning) when the include/exclude filters would keep only part of it."""
        root = Path(repo.path)
        branch = self._local_branch(commit)
        refs = {
            name: sha
            for name, sha in self._remote_refs().items()
            if sha in repo.object_store and _peel_quietly(repo, sha) == commit
        }
        if branch is not None:
            refs[b"refs/heads/" + branch] = commit
        for name, sha in refs.items():
            target = root / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(sha + b"\n")
        if not refs:
            # git accepts a directory as a repository only when refs/ exists; our model holds
            # files, not empty directories, and git skips names starting with "." in refs/.
            (root / "refs" / "heads").mkdir(parents=True, exist_ok=True)
            (root / "refs" / "heads" / ".keep").write_bytes(b"")
        head = b"ref: refs/heads/" + branch if branch is not None else commit
        (root / "HEAD").write_bytes(head + b"\n")
        config = repo.get_config()
        config.set((b"core",), b"bare", False)
        config.set((b"core",), b"logallrefupdates", True)
        config.set((b"remote", b"origin"), b"url", self.location.url.encode())
        config.set((b"remote", b"origin"), b"fetch", b"+refs/heads/*:refs/remotes/origin/*")
        if branch is not None:
            config.set((b"branch", branch), b"remote", b"origin")
            config.set((b"branch", branch), b"merge", b"refs/heads/" + branch)
        config.write_to_path()
        self._write_index(repo, commit, root / "index")
        # Our state directory next to the model files is not part of the work tree.
        (root / "info").mkdir(exist_ok=True)
        (root / "info" / "exclude").write_bytes(b"/.storage-initializer/\n")
        listed: list[RemoteFile] = []
        for dirpath, _dirnames, filenames in os.walk(root):
            for name in filenames:
                full = Path(dirpath) / name
                rel = ".git/" + full.relative_to(root).as_posix()
                digest = hashlib.sha256()
                with open(full, "rb") as handle:
                    for block in iter(lambda h=handle: h.read(BLOCK), b""):
                        digest.update(block)
                sha256 = digest.hexdigest()
                listed.append(
                    RemoteFile(rel, full.stat().st_size, {"sha256": sha256}, sha256, str(full))
                )
        include, exclude = self.settings.include, self.settings.exclude
        cut = [f.path for f in listed if not selected(f.path, include, exclude)]
        if cut:
            log.warning(
                "%s: git_keep_metadata is set but the filters include=%s exclude=%s would drop "
                "%s and more from .git, so no .git is kept; add '.git/*' to the include patterns "
                "(or remove the exclude pattern that matches it) to keep it",
                self.uri.redacted,
                list(include),
                list(exclude),
                cut[0],
            )
            return []
        return sorted(listed, key=lambda f: f.path)

    def _remote_refs(self) -> dict[bytes, bytes]:
        """Advertised branches as remote-tracking refs (``refs/remotes/origin/…``) and tags,
        each a valid ref name."""
        found: dict[bytes, bytes] = {}
        for name, sha in self._advertised.items():
            if not sha or name.endswith(b"^{}") or not check_ref_format(name):
                continue
            if name.startswith(b"refs/heads/"):
                found[b"refs/remotes/origin/" + name[len(b"refs/heads/") :]] = sha
            elif name.startswith(b"refs/tags/"):
                found[name] = sha
        return found

    def _local_branch(self, commit: bytes) -> bytes | None:
        """The branch a clone would check out: the asked branch, or the remote HEAD's, when it
        points at the commit we fetched; ``None`` (a detached HEAD) for tags and commits."""
        ref = self.location.ref
        if ref is None:
            target = self._symrefs.get(b"HEAD", b"")
            name = target.removeprefix(b"refs/heads/") if target.startswith(b"refs/heads/") else b""
        else:
            name = ref.encode()
        if not name or not check_ref_format(b"refs/heads/" + name):
            return None
        if self._advertised.get(b"refs/heads/" + name) != commit:
            return None
        return name

    def _write_index(self, repo: Repo, commit_sha: bytes, path: Path) -> None:
        """An index of the commit's tree, with empty stat data: git compares the content once,
        finds it unchanged, and ``git status`` is clean (links we copied show as type changes,
        submodules we skipped as deleted)."""
        commit = repo[commit_sha]
        assert isinstance(commit, Commit)
        index = Index(str(path), read=False)
        for entry in repo.object_store.iter_tree_contents(commit.tree):
            index[entry.path] = IndexEntry(
                ctime=(0, 0),
                mtime=(0, 0),
                dev=0,
                ino=0,
                mode=entry.mode,
                uid=0,
                gid=0,
                size=0,
                sha=entry.sha,
            )
        index.write()

    def _write_tree(self, repo: Repo, commit_sha: bytes, root: Path) -> list[RemoteFile]:
        """Write every regular file of the commit's tree below ``root``; links become copies."""
        commit = repo[commit_sha]
        assert isinstance(commit, Commit)
        written: dict[str, RemoteFile] = {}
        links: dict[str, str] = {}
        directories: set[str] = set()
        lfs = 0
        for entry in repo.object_store.iter_tree_contents(commit.tree):
            name = entry.path.decode("utf-8", "surrogateescape")
            mode = entry.mode
            try:
                rel = safe_relpath(name, "repository file")
            except UnsafePathError as exc:
                raise UnsafePathError(f"{self.uri.redacted}: {exc}") from None
            if ".git" in rel.lower().split("/"):
                log.warning("%s: skipping %s (a .git path inside the tree)", self.uri.redacted, rel)
                continue
            if stat.S_IFMT(mode) == S_IFGITLINK:
                log.warning(
                    "%s: skipping the submodule %s (submodules are not fetched)",
                    self.uri.redacted,
                    rel,
                )
                continue
            blob = repo.object_store[entry.sha]
            data = blob.as_raw_string()
            if stat.S_ISLNK(mode):
                links[rel] = data.decode("utf-8", "surrogateescape")
                continue
            directories.update(_parents(rel))
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "xb") as out:
                out.write(data)
            if data.startswith(_LFS_POINTER) and len(data) < 1024:
                lfs += 1
            digest = hashlib.sha256(data).hexdigest()
            written[rel] = RemoteFile(
                rel, len(data), {"sha256": digest}, entry.sha.decode(), str(target)
            )
            del data, blob
        for rel, target in sorted(links.items()):
            for path, file in _resolve_link(rel, target, written, directories, links).items():
                written.setdefault(path, file)
            if rel not in written and not any(p.startswith(rel + "/") for p in written):
                log.warning(
                    "%s: skipping the symbolic link %s -> %s (it leaves the repository or its "
                    "target does not exist)",
                    self.uri.redacted,
                    rel,
                    target,
                )
        if lfs:
            log.warning(
                "%s: %d files are Git LFS pointers; LFS objects are not fetched, so the model "
                "holds the pointer files (as with the stock initializer)",
                self.uri.redacted,
                lfs,
            )
        return sorted(written.values(), key=lambda f: f.path)

    def read(self, file: RemoteFile, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        try:
            yield from read_local_range(file.handle, start, end, BLOCK)
        except FileNotFoundError:
            raise TransientError(
                f"{self.uri.redacted}: the local copy of {file.path} disappeared"
            ) from None

    def close(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None


def _peel(repo: Repo, sha: bytes, what: str) -> bytes:
    """A tag's commit (annotated tags point at a tag object first)."""
    for _hop in range(16):
        obj = repo.object_store[sha]
        if isinstance(obj, Tag):
            sha = obj.object[1]
            continue
        if isinstance(obj, Commit):
            return sha
        raise UsageError(f"{what}: the ref names a {obj.type_name.decode()}, not a commit")
    raise SourceError(f"{what}: the tag chain is too long")


def _peel_quietly(repo: Repo, sha: bytes) -> bytes | None:
    """The commit a ref names (through tags), or ``None`` when it is not in the repository."""
    for _hop in range(16):
        try:
            obj = repo.object_store[sha]
        except KeyError:
            return None
        if isinstance(obj, Tag):
            sha = obj.object[1]
            continue
        return sha if isinstance(obj, Commit) else None
    return None


def _parents(rel: str) -> Iterator[str]:
    parts = rel.split("/")[:-1]
    for index in range(1, len(parts) + 1):
        yield "/".join(parts[:index])


def _resolve_link(
    rel: str,
    target: str,
    files: Mapping[str, RemoteFile],
    directories: set[str],
    links: Mapping[str, str],
) -> dict[str, RemoteFile]:
    """The files a symbolic link stands for: one file, or a directory's files below the link's
    name. Empty when the link leaves the repository, dangles or loops."""
    current_rel, current_target = rel, target
    for _hop in range(MAX_LINK_HOPS):
        if current_target.startswith("/"):
            return {}
        joined = posixpath.normpath(posixpath.join(posixpath.dirname(current_rel), current_target))
        if joined in ("..", ".") or joined.startswith("../"):
            return {}
        if joined in files:
            found = files[joined]
            return {rel: RemoteFile(rel, found.size, found.checksums, found.version, found.handle)}
        if joined in directories:
            prefix = joined + "/"
            return {
                rel + "/" + path[len(prefix) :]: RemoteFile(
                    rel + "/" + path[len(prefix) :], f.size, f.checksums, f.version, f.handle
                )
                for path, f in files.items()
                if path.startswith(prefix)
            }
        if joined in links:
            current_rel, current_target = joined, links[joined]
            continue
        return {}
    return {}


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    with contextlib.suppress(Exception):
        text = text.replace("\n", " ")
    return text[:300]
