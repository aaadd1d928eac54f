"""What a ``modelscope://`` URI names and which ModelScope Hub to ask for it.

One job: the URI grammar (``owner/model[:revision]``, exactly the stock's form) and the endpoint
settings as ``modelscope_hub`` reads them, checked before anything is requested.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from storage_initializer.errors import UsageError
from storage_initializer.providers.hub_common import HubGrammar

DEFAULT_ENDPOINT = "https://modelscope.cn"
INTL_ENDPOINT = "https://www.modelscope.ai"
DEFAULT_REVISION = "master"
GRAMMAR = HubGrammar(
    hub="ModelScope",
    form="modelscope://owner/model[:revision]",
    revisions="branch or tag",
    hint="Name the model as owner/model, e.g. modelscope://Qwen/Qwen2.5-0.5B-Instruct",
    subpath=False,
)


@dataclass(frozen=True)
class ModelRef:
    repo_id: str  # "owner/name"
    revision: str  # as written; "master" when absent


def parse_modelscope_uri(raw: str, redacted: str) -> ModelRef:
    """``modelscope://owner/model[:revision]``, exactly the stock's form (two components)."""
    rest = raw.strip()
    if not rest.lower().startswith("modelscope://"):
        raise UsageError(f"{redacted} is not a modelscope:// URI")
    rest = rest[len("modelscope://") :]
    repo_id, revision = GRAMMAR.repo_id(rest.split("/"), redacted)
    return ModelRef(repo_id, revision or DEFAULT_REVISION)


def configured_endpoint(environ: Mapping[str, str] | None = None) -> str | None:
    """``MODELSCOPE_ENDPOINT``, else ``MODELSCOPE_DOMAIN``, normalised as the client does
    (scheme added when missing, no trailing slash); None when neither is set."""
    environ = os.environ if environ is None else environ
    value = (environ.get("MODELSCOPE_ENDPOINT") or "").strip()
    if not value:
        value = (environ.get("MODELSCOPE_DOMAIN") or "").strip()
    if not value:
        return None
    if not value.lower().startswith(("http://", "https://")):
        value = "https://" + value
    return value.rstrip("/")
