"""Secret redaction: the one function every log line, marker and error goes through.

Secrets reach us in three ways: inside URIs (``user:password@``, SAS or signed query strings),
in environment variables (keys, tokens, ``<host>-headers`` values) and in config files. We remove
all three. Providers that learn of a secret elsewhere call :func:`register_secret`.
"""

from __future__ import annotations

import json
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
#: ``user:password@host`` without a scheme: how urllib3 and others quote a connection's netloc
#: ("cannot connect to user:pw@host:443").
_NETLOC_CREDENTIALS_RE = re.compile(
    r"(?<![\w%.~+/-])([\w%.~+-]+):[^\s@/'\"<>]+@(?!sha\d+:)(?=[\w.\[\]-])"
)
#: A URI longer than this is shown as its head (scheme, host, start of the path), an ellipsis
#: and its tail: a 100 KB URI must not make a 200 KB last line.
URI_DISPLAY_LIMIT = 300
#: Characters that would let a name forge a log line or rewrite a terminal: C0 and C1
#: controls, DEL, and the Unicode line and paragraph separators.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
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
    text = _URL_RE.sub(lambda m: shorten_uri(redact_url(m.group(0))), text)
    text = _NETLOC_CREDENTIALS_RE.sub(lambda m: f"{m.group(1)}:{MASK}@", text)
    with _lock:
        secrets = _extra | _env_secrets()
    # Longest first, so that a secret containing another is masked whole.
    for secret in sorted(secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def shorten_uri(uri: str, limit: int = URI_DISPLAY_LIMIT) -> str:
    """``uri`` cut to about ``limit`` characters for display: its head (scheme and host first),
    ``…``, and its tail (usually the file name)."""
    if len(uri) <= limit:
        return uri
    tail = max(16, limit // 5)
    head = max(16, limit - tail - 1)
    return f"{uri[:head]}…{uri[-tail:]}"


def escape_controls(text: str) -> str:
    """``text`` on one line whatever it holds: control characters become visible escapes
    (``\\n``, ``\\x1b``, ``\\u2028``), so a file name or URI holding a newline cannot forge a
    second log line, nor an escape sequence rewrite the terminal. A backslash stays as it is."""
    return _CONTROL_RE.sub(_escape_one, text)


def _escape_one(match: re.Match[str]) -> str:
    char = match.group(0)
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char)
    if named:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
