"""KServe's ``STORAGE_CONFIG`` / ``STORAGE_OVERRIDE_CONFIG``: JSON from the storage-config secret.

KServe injects the secret's entry as JSON; override keys win. For ``type: s3`` the keys map to
the usual environment variables, exactly as the stock initializer does, so that the S3 provider
has one place to read its configuration from. Secret values are registered for redaction.
"""

from __future__ import annotations

import json
import os
from collections.abc import MutableMapping
from typing import Any

from storage_initializer.errors import UsageError
from storage_initializer.redact import register_secret

S3_KEYS = (
    ("AWS_ENDPOINT_URL", "endpoint_url"),
    ("AWS_ACCESS_KEY_ID", "access_key_id"),
    ("AWS_SECRET_ACCESS_KEY", "secret_access_key"),
    ("AWS_DEFAULT_REGION", "region"),
    ("AWS_CA_BUNDLE", "ca_bundle"),
    ("S3_VERIFY_SSL", "verify_ssl"),
    ("awsAnonymousCredential", "anonymous"),
)
SECRET_KEYS = ("secret_access_key", "access_key_id", "session_token", "password", "token")


def _load(name: str, environ: MutableMapping[str, str]) -> dict[str, Any]:
    raw = environ.get(name, "").strip()
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        raise UsageError(
            f"{name} is not valid JSON", "Check the storage-config secret's entry"
        ) from None
    if not isinstance(data, dict):
        raise UsageError(f"{name} must be a JSON object")
    return data


def storage_spec(environ: MutableMapping[str, str] | None = None) -> dict[str, Any]:
    environ = os.environ if environ is None else environ
    spec = _load("STORAGE_CONFIG", environ)
    spec.update(_load("STORAGE_OVERRIDE_CONFIG", environ))
    for key in SECRET_KEYS:
        if isinstance(spec.get(key), str):
            register_secret(spec[key])
    return spec


def apply(environ: MutableMapping[str, str] | None = None) -> dict[str, Any]:
    """Export the spec's S3 keys to the environment (as the stock initializer does)."""
    environ = os.environ if environ is None else environ
    spec = storage_spec(environ)
    if spec.get("type") == "s3":
        for env_name, key in S3_KEYS:
            if key in spec and spec[key] is not None:
                value = spec[key]
                environ[env_name] = str(value).lower() if isinstance(value, bool) else str(value)
    return spec
