"""The remote side of git sources: what the URI names, who asks, and the dulwich fetch.

One job: get the commit a ``….git[@ref]`` URI names into a local bare repository, with dulwich
(pure Python, the stock initializer's library). That covers parsing the URI and its credentials
(``GIT_USERNAME`` / ``GIT_PASSWORD``, a user in the URL), building the transport (HTTP(S) with
the global CA bundle, ``git://``, ``ssh://``), resolving the ref among what the server
advertises (shallow first, all branches and tags when an abbreviated or unadvertised sha needs
it), peeling tags to their commit, and mapping dulwich/urllib3 failures to errors a user can act
on. Split out of :mod:`.git`, which writes the fetched tree out and lists it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from dulwich.client import HTTPUnauthorized, get_transport_and_path
from dulwich.errors import GitProtocolError, HangupException, NotGitRepository
from dulwich.objects import Commit, ObjectID, Tag
from dulwich.refs import HEADREF, Ref
from dulwich.repo import Repo

from storage_initializer import tls
from storage_initializer.errors import (
    AccessDeniedError,
    InitializerError,
    NotFoundError,
    SourceError,
    TransientError,
    UsageError,
)
from storage_initializer.redact import register_secret

log = logging.getLogger(__name__)

#: ``<url ending in .git>[@ref]``; the ref may not hold '/' only after the last ".git" (a
#: branch such as feature/x is written url.git@feature/x and is matched by the second form).
_REF_RE = re.compile(r"^(?P<url>.+?\.git)(?:@(?P<ref>[^?#]+?))?/?$", re.IGNORECASE)
_HEX_RE = re.compile(r"^[0-9a-f]{4,40}$")
#: Connect and read timeouts for HTTP(S) remotes, in seconds.
TIMEOUT = 60.0


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
    def __init__(self, refs: Mapping[Ref, ObjectID]) -> None:
        super().__init__("unknown ref")
        self.refs = refs


class GitRemote:
    """One remote repository and ref: fetches the commit and remembers what was advertised."""

    def __init__(self, location: GitLocation, redacted: str) -> None:
        self.location = location
        self.redacted = redacted
        #: What the remote advertised at the last fetch (refs, and symbolic refs such as HEAD).
        self.advertised: dict[Ref, ObjectID] = {}
        self.symrefs: dict[Ref, Ref] = {}

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
            raise UsageError(f"{self.redacted} is not a git URL dulwich can use: {exc}") from None

    def _wants(self, refs: Mapping[Ref, ObjectID]) -> list[ObjectID]:
        """The commit (or tag) to fetch for our ref, from the remote's advertised refs."""
        ref = self.location.ref
        if ref is None:
            head = refs.get(HEADREF)
            if not head:
                raise _UnknownRef(refs)
            return [head]
        name = ref.encode()
        for candidate in (Ref(b"refs/heads/" + name), Ref(b"refs/tags/" + name), Ref(name)):
            if candidate.startswith(b"refs/") or candidate == b"HEAD":
                peeled = refs.get(Ref(candidate + b"^{}"))
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
                return [ObjectID(lowered.encode())]
            raise _Unresolved()
        raise _UnknownRef(refs)

    def fetch(self, repo: Repo) -> ObjectID:
        """Fetch what the ref names into ``repo``; return the commit sha (hex bytes)."""
        client, path = self._client()
        chosen: list[ObjectID] = []
        advertised: dict[Ref, ObjectID] = {}

        def shallow_wants(refs: Mapping[Ref, ObjectID], depth: int | None = None) -> list[ObjectID]:
            advertised.update(refs)
            self.advertised = dict(refs)
            chosen[:] = self._wants(refs)
            return list(chosen)

        try:
            result = client.fetch(path, repo, determine_wants=shallow_wants, depth=1)
            self.symrefs = dict(getattr(result, "symrefs", None) or {})
        except _Unresolved:
            chosen.clear()
        except (GitProtocolError, HangupException) as exc:
            # A server that will not send an unadvertised commit says so here; fetch everything.
            if not chosen or chosen[0] in advertised.values():
                raise
            log.info(
                "%s: the server refused a shallow fetch of %s (%s); fetching all branches and tags",
                self.redacted,
                chosen[0].decode(),
                _short(exc),
            )
            chosen.clear()
        if chosen and chosen[0] in repo.object_store:
            return _peel(repo, chosen[0], self.redacted)
        return self._full_fetch(repo)

    def _full_fetch(self, repo: Repo) -> ObjectID:
        client, path = self._client()

        def all_refs(refs: Mapping[Ref, ObjectID], depth: int | None = None) -> list[ObjectID]:
            self.advertised = dict(refs)
            return sorted(
                {
                    sha
                    for name, sha in refs.items()
                    if name.startswith((b"refs/heads/", b"refs/tags/")) and sha
                }
            )

        client.fetch(path, repo, determine_wants=all_refs)
        wanted = (self.location.ref or "").lower()
        if len(wanted) == 40 and ObjectID(wanted.encode()) in repo.object_store:
            return _peel(repo, ObjectID(wanted.encode()), self.redacted)
        matches = [sha for sha in repo.object_store if sha.decode().startswith(wanted)]
        commits = [sha for sha in matches if isinstance(repo.object_store[sha], Commit)]
        if len(commits) == 1:
            return commits[0]
        if len(commits) > 1:
            raise UsageError(
                f"{self.redacted}: the abbreviated commit {wanted!r} is ambiguous",
                "Write more digits of the commit sha",
            )
        raise NotFoundError(
            f"{self.redacted}: no branch, tag or commit named {self.location.ref!r}",
            "Check the ref after '@'; a commit must be reachable from a branch or tag",
        )

    def describe(self, exc: BaseException) -> InitializerError:
        """Turn a dulwich/urllib3 failure into the error a user can act on."""
        what = self.redacted
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


def _peel(repo: Repo, sha: ObjectID, what: str) -> ObjectID:
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


def peel_quietly(repo: Repo, sha: ObjectID) -> ObjectID | None:
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


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    with contextlib.suppress(Exception):
        text = text.replace("\n", " ")
    return text[:300]
