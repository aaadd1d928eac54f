"""Secret redaction: the one function every log line, marker and error goes through.

Secrets reach us in three ways: inside URIs (``user:password@``, SAS or signed query strings),
in environment variables (keys, tokens, ``<host>-headers`` values) and in config files. We remove
all three. Providers that learn of a secret elsewhere call :func:`register_secret`.
"""

from __future__ import annotations

import os
import re
import threading
from urllib.parse import parse_qsl, urlsplit, urlunsplit

MASK = "***"

#: Environment variables whose values are secrets wherever they appear.
SECRET_ENV_VARS = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",  # botocore's older name of the session token
    "AWS_ACCESS_KEY_ID",
    "AZURE_CLIENT_SECRET",
    "AZ_CLIENT_SECRET",
    # azure-identity's EnvironmentCredential (behind DefaultAzureCredential) reads these too.
    "AZURE_CLIENT_CERTIFICATE_PASSWORD",
    "AZURE_PASSWORD",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_CONNECTION_STRING",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "GIT_PASSWORD",
    "MODELSCOPE_API_TOKEN",
)

_MIN_SECRET_LEN = 4
_lock = threading.Lock()
_extra: set[str] = set()

_URL_RE = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")
#: Query parameters that are not secret and help a reader tell URIs apart.
_PUBLIC_QUERY_KEYS = frozenset({"versionId", "generation", "revision", "ref"})


def register_secret(value: str | None) -> None:
    """Remember a secret value so that it is masked wherever it appears later."""
    if value and len(value) >= _MIN_SECRET_LEN:
        with _lock:
            _extra.add(value)


def _env_secrets() -> set[str]:
    found = set()
    for name, value in os.environ.items():
        if name in SECRET_ENV_VARS or name.endswith("-headers"):
            if name.endswith("-headers"):
                found.update(_header_values(value))
            elif value and len(value) >= _MIN_SECRET_LEN:
                found.add(value)
    return found


def _header_values(raw: str) -> set[str]:
    import json

    try:
        headers = json.loads(raw)
    except ValueError:
        return {raw} if len(raw) >= _MIN_SECRET_LEN else set()
    if not isinstance(headers, dict):
        return set()
    values = set()
    for value in headers.values():
        text = str(value)
        if len(text) >= _MIN_SECRET_LEN:
            values.add(text)
            # "Bearer abc": mask the token alone too, in case a library prints only it.
            values.update(part for part in text.split() if len(part) >= 8)
    return values


def redact_url(url: str) -> str:
    """Mask the password of a URL and the values of its query (SAS tokens, signatures)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    netloc = parts.netloc
    if "@" not in netloc and not parts.query:
        return url  # nothing to mask: keep it as typed (urlunsplit would turn s3:/// into s3:/)
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{MASK}@{hostport}" if ":" in userinfo else f"{MASK}@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if pairs:
            query = "&".join(
                f"{key}={value if key in _PUBLIC_QUERY_KEYS else MASK}" for key, value in pairs
            )
        else:
            query = MASK
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact(text: str) -> str:
    """Return ``text`` with every known secret and every URL credential masked."""
    if not text:
        return text
    text = _URL_RE.sub(lambda m: redact_url(m.group(0)), text)
    with _lock:
        secrets = _extra | _env_secrets()
    # Longest first, so that a secret containing another is masked whole.
    for secret in sorted(secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MASK)
    return text
