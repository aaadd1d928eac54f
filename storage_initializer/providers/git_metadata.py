"""The model's ``.git``, when ``git_keep_metadata`` asks for one.

One job: turn the bare repository a git source fetched into a working ``.git`` next to the
model files (a config with ``origin``, the refs the server advertised for what was fetched,
``HEAD`` on the branch or detached at the commit, an index of the commit's tree), so that
``git log`` and ``git status`` work in the model directory, and list its files with their
sha256 like the model's own. Split out of :mod:`.git` because it is optional and independent of
how the tree is written.
"""

from __future__ import annotations

import hashlib
import logging
import os
from functools import partial
from pathlib import Path
from typing import Any

from dulwich.index import Index, IndexEntry
from dulwich.objects import Commit, ObjectID
from dulwich.refs import HEADREF, Ref, check_ref_format
from dulwich.repo import Repo

from storage_initializer.blocks import BLOCK
from storage_initializer.paths import selected
from storage_initializer.providers.base import RemoteFile
from storage_initializer.providers.git_remote import GitRemote, peel_quietly

log = logging.getLogger(__name__)

#: Appended to the commit in the fingerprint when ``.git`` is kept: a model pulled without it is
#: a different result, so --revalidate after turning the setting on downloads again.
KEPT_METADATA_SUFFIX = "+.git"


class GitMetadata:
    """The ``.git`` of one fetch: built from the remote's advertised refs after the fetch."""

    def __init__(self, remote: GitRemote, settings: Any, redacted: str) -> None:
        self.location = remote.location
        self.settings = settings
        self.redacted = redacted
        self._advertised = remote.advertised
        self._symrefs = remote.symrefs

    def collect(self, repo: Repo, commit: ObjectID) -> list[RemoteFile]:
        """Turn the bare repository we fetched into the model's ``.git`` and list its files;
        empty (with a warning) when the include/exclude filters would keep only part of it."""
        root = Path(repo.path)
        branch = self._local_branch(commit)
        refs = {
            name: sha
            for name, sha in self._remote_refs().items()
            if sha in repo.object_store and peel_quietly(repo, sha) == commit
        }
        if branch is not None:
            refs[Ref(b"refs/heads/" + branch)] = commit
        for ref_name, sha in refs.items():
            target = root / ref_name.decode()
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
                    for block in iter(partial(handle.read, BLOCK), b""):
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
                self.redacted,
                list(include),
                list(exclude),
                cut[0],
            )
            return []
        return sorted(listed, key=lambda f: f.path)

    def _remote_refs(self) -> dict[Ref, ObjectID]:
        """Advertised branches as remote-tracking refs (``refs/remotes/origin/…``) and tags,
        each a valid ref name."""
        found: dict[Ref, ObjectID] = {}
        for name, sha in self._advertised.items():
            if not sha or name.endswith(b"^{}") or not check_ref_format(name):
                continue
            if name.startswith(b"refs/heads/"):
                found[Ref(b"refs/remotes/origin/" + name[len(b"refs/heads/") :])] = sha
            elif name.startswith(b"refs/tags/"):
                found[name] = sha
        return found

    def _local_branch(self, commit: ObjectID) -> bytes | None:
        """The branch a clone would check out: the asked branch, or the remote HEAD's, when it
        points at the commit we fetched; ``None`` (a detached HEAD) for tags and commits."""
        ref = self.location.ref
        if ref is None:
            target = self._symrefs.get(HEADREF, b"")
            name = target.removeprefix(b"refs/heads/") if target.startswith(b"refs/heads/") else b""
        else:
            name = ref.encode()
        local_ref = Ref(b"refs/heads/" + name)
        if not name or not check_ref_format(local_ref):
            return None
        if self._advertised.get(local_ref) != commit:
            return None
        return name

    def _write_index(self, repo: Repo, commit_sha: ObjectID, path: Path) -> None:
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
