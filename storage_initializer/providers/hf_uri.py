"""What an ``hf://`` URI names: repository kind, ``owner/name``, revision and sub-directory.

One job: the URI grammar of the Hugging Face provider, checked before anything is requested, so
that a malformed URI fails with a usage error naming the expected form.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

from storage_initializer.errors import UsageError
from storage_initializer.paths import safe_relpath
from storage_initializer.providers.hub_common import HubGrammar

DEFAULT_REVISION = "main"
#: Repository kinds the URI may name with a prefix, as in huggingface_hub's ``hf://`` paths.
REPO_TYPES = {"datasets": "dataset", "spaces": "space"}
#: A full commit id: taken as it is, never resolved (and the name of a cache snapshot).
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
GRAMMAR = HubGrammar(
    hub="Hugging Face",
    form="hf://owner/model[:revision][/sub/dir]",
    revisions="branch, tag or commit",
    hint="Name the repository as owner/model, e.g. hf://google-bert/bert-base-uncased",
    subpath=True,
)


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
    repo_id, revision = GRAMMAR.repo_id(parts, redacted)
    revision = unquote(revision)
    sub = "/".join(part for part in parts[2:] if part)
    subpath = safe_relpath(unquote(sub), "sub-directory") if sub else ""
    return HubRef(repo_type, repo_id, revision or DEFAULT_REVISION, subpath)
