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

Code layout, one job per module: :mod:`.git_remote` (the URI and credentials, the dulwich
transport, ref resolution and fetch, error mapping), :mod:`.git_metadata` (the ``.git`` kept by
``git_keep_metadata``); this module writes the commit's tree out (links as copies, submodules
skipped, LFS pointers reported) and lists it; :mod:`.scratch` reads the copies and removes them.
"""

from __future__ import annotations

import builtins
import hashlib
import logging
import posixpath
import shutil
import stat
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from dulwich.objects import Commit, ObjectID
from dulwich.repo import Repo

from storage_initializer.errors import NotFoundError, TransientError
from storage_initializer.paths import UnsafePathError, safe_relpath
from storage_initializer.providers.base import Listing, RemoteFile
from storage_initializer.providers.git_metadata import KEPT_METADATA_SUFFIX, GitMetadata
from storage_initializer.providers.git_remote import GitRemote, parse_location
from storage_initializer.providers.scratch import MAX_LINK_HOPS, ScratchSource, parents

log = logging.getLogger(__name__)

_LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"
#: Fetch attempts when the failure looks transient (connection reset, 5xx).
ATTEMPTS = 3
S_IFGITLINK = 0o160000


class GitSource(ScratchSource):
    """A repository's tree at one commit; files are read from a local scratch copy."""

    default_workers = 4
    supports_ranges: ClassVar[bool] = True

    def __init__(self, uri: Any, settings: Any) -> None:
        super().__init__(uri, settings)
        self.location = parse_location(uri.raw)
        self.remote = GitRemote(self.location, uri.redacted)

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
                commit = self.remote.fetch(repo)
                break
            except Exception as exc:
                error = self.remote.describe(exc)
                if not isinstance(error, TransientError) or attempt == ATTEMPTS:
                    raise error from None
                log.warning("%s; retrying (attempt %d of %d)", error, attempt + 1, ATTEMPTS)
                time.sleep(min(10.0, 0.5 * 2**attempt))
            finally:
                repo.close()
        repo = Repo(str(repo_dir))
        metadata: builtins.list[RemoteFile] = []
        try:
            files = self._write_tree(repo, commit, scratch / "tree")
            if files and self._keep_metadata():
                metadata = GitMetadata(self.remote, self.settings, self.uri.redacted).collect(
                    repo, commit
                )
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

    def _keep_metadata(self) -> bool:
        return bool(getattr(self.settings, "git_keep_metadata", False))

    def _write_tree(
        self, repo: Repo, commit_sha: ObjectID, root: Path
    ) -> builtins.list[RemoteFile]:
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
            directories.update(parents(rel))
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
        for rel, link_target in sorted(links.items()):
            for path, file in _resolve_link(rel, link_target, written, directories, links).items():
                written.setdefault(path, file)
            if rel not in written and not any(p.startswith(rel + "/") for p in written):
                log.warning(
                    "%s: skipping the symbolic link %s -> %s (it leaves the repository or its "
                    "target does not exist)",
                    self.uri.redacted,
                    rel,
                    link_target,
                )
        if lfs:
            log.warning(
                "%s: %d files are Git LFS pointers; LFS objects are not fetched, so the model "
                "holds the pointer files (as with the stock initializer)",
                self.uri.redacted,
                lfs,
            )
        return sorted(written.values(), key=lambda f: f.path)


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
