"""The Hugging Face settings, read as huggingface_hub reads them: home, endpoint, token.

One job: the environment the ``hf`` provider shares with huggingface_hub.
:func:`ensure_writable_hf_home` runs when this module is imported, before huggingface_hub is (it
computes its paths at import); the endpoint and token are read when a pull starts, so that the
values in force then are used.
"""

from __future__ import annotations

import logging
import os
import tempfile

from storage_initializer.providers.base import is_true

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"


def ensure_writable_hf_home() -> None:
    """Give huggingface_hub a writable home before it is imported.

    KServe runs the init container as an arbitrary UID with a read-only root filesystem, where
    ``~/.cache/huggingface`` cannot be created. huggingface_hub computes its paths (token file,
    caches) from ``HF_HOME`` at import time, so this must run first. An explicit ``HF_HOME`` or
    ``XDG_CACHE_HOME`` is left alone: the user chose it.
    """
    if os.environ.get("HF_HOME") or os.environ.get("XDG_CACHE_HOME"):
        return
    home = os.path.expanduser("~")
    cache = os.path.join(home, ".cache")
    probe = cache if os.path.isdir(cache) else home
    if os.path.isdir(probe) and os.access(probe, os.W_OK | os.X_OK):
        return
    os.environ["HF_HOME"] = os.path.join(tempfile.gettempdir(), "storage-initializer-hf-home")


ensure_writable_hf_home()


def hub_endpoint() -> str:
    """``HF_ENDPOINT``, else huggingface_hub's default, without a trailing slash."""
    endpoint = os.environ.get("HF_ENDPOINT")
    if not endpoint:
        try:
            from huggingface_hub import constants

            endpoint = constants.ENDPOINT
        except ImportError:
            endpoint = DEFAULT_ENDPOINT
    return endpoint.rstrip("/")


def hub_token() -> str | None:
    """``HF_TOKEN`` (or legacy ``HUGGING_FACE_HUB_TOKEN``), else huggingface_hub's token file,
    unless ``HF_HUB_DISABLE_IMPLICIT_TOKEN`` forbids the implicit one."""
    token = (os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or "").strip()
    if token:
        return token
    if is_true(os.environ.get("HF_HUB_DISABLE_IMPLICIT_TOKEN")):
        return None
    try:
        from huggingface_hub.utils._headers import get_token_to_send

        return get_token_to_send(None) or None
    except ImportError:
        return None
    except Exception as exc:  # an OIDC exchange or token refresh failed: say so, go anonymous
        log.warning("could not read the Hugging Face token: %s", type(exc).__name__)
        return None
