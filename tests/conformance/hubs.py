"""The Hugging Face Hub and ModelScope rows of the conformance suite: repositories whose
revisions resolve to commits (see :mod:`tests.conformance.backends` for the interface)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from pathlib import Path

from tests.conformance.backends import Backend, Published, error_headers
from tests.servers.hub import HubServer
from tests.servers.modelscope_hub import ModelScopeHub
from tests.servers.proxy import CountingProxy, Fault

# -- the Hugging Face Hub -------------------------------------------------------------------


class Hub(Backend):
    name = "hf"
    pins = "commit"

    def __init__(self, server: HubServer, proxy: CountingProxy, home: Path) -> None:
        super().__init__(proxy, {**server.env(home=str(home)), "HF_ENDPOINT": proxy.url})
        self.server = server

    def publish(self, files: Mapping[str, bytes]) -> Published:
        # Regular (non-LFS) files: LFS content is redirected to the CDN host, past the proxy.
        repo = self.server.add_repo(f"acme/conform-{uuid.uuid4().hex[:10]}")
        repo.add_commit(dict(files))

        def replace(path: str, data: bytes) -> None:
            current = dict(repo.commits[repo.refs["main"]])
            repo.add_commit({**{p: f.data for p, f in current.items()}, path: data})

        return Published(f"hf://{repo.repo_id}", dict(files), f"/{repo.repo_id}/resolve/", replace)

    def missing_uri(self, published: Published) -> str:
        return published.uri + ":no-such-branch"

    def denied(self, files: Mapping[str, bytes]) -> tuple[str, dict[str, str]]:
        """A private repository read without a token: the Hub answers 401."""
        repo = self.server.add_repo(f"acme/private-{uuid.uuid4().hex[:10]}", readers=("hf_x",))
        repo.add_commit(dict(files))
        return f"hf://{repo.repo_id}", self.env

    def error(self, status: int, retry_after: str | None = None, **match: object) -> Fault:
        codes = {401: "RepoNotFound", 403: "GatedRepo", 404: "EntryNotFound"}
        more = {"Content-Type": "application/json"}
        if status in codes:
            more["X-Error-Code"] = codes[status]
        body = json.dumps({"error": f"injected {status}"}).encode()
        return Fault(status=status, body=body, headers=error_headers(retry_after, **more), **match)  # type: ignore[arg-type]


# -- ModelScope -----------------------------------------------------------------------------


class ModelScope(Backend):
    name = "modelscope"
    pins = (
        "ModelScope downloads address the revision by name (its download endpoint is not "
        "documented to take a commit id): a branch moved mid-pull is caught by the listing's "
        "sha256 after the read, and fails the pull, instead of being refused by the read and "
        "listed again (providers/modelscope.py)"
    )

    def __init__(self, server: ModelScopeHub, proxy: CountingProxy) -> None:
        super().__init__(proxy, {**server.env(), "MODELSCOPE_ENDPOINT": proxy.url})
        self.server = server

    def publish(self, files: Mapping[str, bytes]) -> Published:
        # Regular files: LFS content is redirected to the object-storage host, past the proxy.
        repo = self.server.add_repo(f"acme/conform-{uuid.uuid4().hex[:10]}")
        repo.add_commit(dict(files))

        def replace(path: str, data: bytes) -> None:
            current = repo.commits[repo.branches["master"]]
            repo.add_commit({**{p: f.data for p, f in current.items()}, path: data})

        return Published(
            f"modelscope://{repo.repo_id}",
            dict(files),
            f"/api/v1/models/{repo.repo_id}/repo",
            replace,
            content_query="FilePath=",
        )

    def missing_uri(self, published: Published) -> str:
        return published.uri + ":no-such-branch"

    def denied(self, files: Mapping[str, bytes]) -> tuple[str, dict[str, str]]:
        """A private model read without a token: the Hub answers 401."""
        repo = self.server.add_repo(f"acme/private-{uuid.uuid4().hex[:10]}", readers=("ms_x",))
        repo.add_commit(dict(files))
        return f"modelscope://{repo.repo_id}", self.env

    def error(self, status: int, retry_after: str | None = None, **match: object) -> Fault:
        body = {"Code": status, "Message": f"injected {status}", "RequestId": "proxy"}
        more = {"Content-Type": "application/json"}
        body["Success"] = False  # type: ignore[assignment]
        return Fault(
            status=status,
            body=json.dumps(body).encode(),
            headers=error_headers(retry_after, **more),
            **match,  # type: ignore[arg-type]
        )
