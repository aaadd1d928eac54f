"""TLS trust: the cluster-wide CA bundle (KServe's ``CA_BUNDLE_CONFIGMAP_NAME``) for every backend.

KServe mounts a ConfigMap holding ``cabundle.crt`` and names it in ``CA_BUNDLE_CONFIGMAP_NAME``.
We combine it with the system and certifi stores (so public endpoints keep verifying) into one
file under ``$TMPDIR`` and hand that file to every client. A bundle that is named but missing or
unreadable is an error: falling back silently would hide a misconfiguration, and we never fall
back to unverified TLS.

Also why TLS failed, read from whatever exception a client library wrapped the failure in
(:func:`is_tls_failure`, :func:`tls_reason`), so every backend says it in the same short words.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import ssl
import tempfile
from collections.abc import Iterable

from storage_initializer.errors import UsageError

log = logging.getLogger(__name__)

DEFAULT_MOUNT_POINT = "/etc/ssl/custom-certs"
BUNDLE_FILE = "cabundle.crt"


def global_bundle_path() -> str | None:
    """Path of the mounted global CA bundle, or None when the cluster configures none."""
    if not os.environ.get("CA_BUNDLE_CONFIGMAP_NAME"):
        return None
    mount = os.environ.get("CA_BUNDLE_VOLUME_MOUNT_POINT") or DEFAULT_MOUNT_POINT
    return os.path.join(mount, BUNDLE_FILE)


@functools.cache
def combined_bundle() -> str | None:
    """A CA file with the system store, certifi and the global bundle; None without a bundle."""
    custom = global_bundle_path()
    if custom is None:
        return None
    if not os.path.isfile(custom):
        raise UsageError(
            f"the global CA bundle {custom} (CA_BUNDLE_CONFIGMAP_NAME="
            f"{os.environ['CA_BUNDLE_CONFIGMAP_NAME']}) does not exist",
            "Mount the ConfigMap with a cabundle.crt key there, or unset CA_BUNDLE_CONFIGMAP_NAME",
        )
    parts = []
    system = ssl.get_default_verify_paths().cafile
    if system and os.path.isfile(system):
        parts.append(system)
    try:
        import certifi  # optional

        parts.append(certifi.where())
    except ImportError:
        pass
    parts.append(custom)
    handle, path = tempfile.mkstemp(prefix="storage-initializer-ca-", suffix=".crt")
    with os.fdopen(handle, "wb") as out:
        for part in parts:
            with open(part, "rb") as source:
                out.write(source.read())
            out.write(b"\n")
    try:
        ssl.create_default_context(cafile=path)
    except ssl.SSLError as exc:
        raise UsageError(f"the global CA bundle {custom} is not a valid PEM file: {exc}") from exc
    log.info("using the global CA bundle %s together with the default trust store", custom)
    return path


def configure_process() -> None:
    """Point requests-based clients (requests, huggingface_hub, google-auth, azure-core) at the
    combined bundle, unless the user already set their own."""
    bundle = combined_bundle()
    if bundle:
        os.environ.setdefault("REQUESTS_CA_BUNDLE", bundle)
        os.environ.setdefault("SSL_CERT_FILE", bundle)


def requests_verify() -> bool | str:
    """The ``verify=`` value for a requests session."""
    return combined_bundle() or os.environ.get("REQUESTS_CA_BUNDLE") or True


_TLS_MARKERS = ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed", "SSLError", "[SSL")
_TLS_VERIFY_REASON = re.compile(r"certificate verify failed: ([^'\"()\]\[]+)")
_TLS_SSL_REASON = re.compile(r"\[SSL: ([A-Z_]+)\]")


def _wrapped(exc: BaseException) -> Iterable[BaseException]:
    """``exc`` and what it wraps: causes, contexts, azure-core's ``inner_exception``, urllib3's
    ``reason`` and exceptions held in ``args`` (requests wraps urllib3's MaxRetryError so)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo and len(seen) < 32:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        for linked in (
            current.__cause__,
            current.__context__,
            getattr(current, "inner_exception", None),
            getattr(current, "reason", None),
            *current.args,
        ):
            if isinstance(linked, BaseException):
                todo.append(linked)


def is_tls_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is (or wraps) a TLS handshake or certificate verification failure."""
    for item in _wrapped(exc):
        if isinstance(item, ssl.SSLError) or type(item).__name__ == "SSLError":
            return True
        if any(marker in str(item) for marker in _TLS_MARKERS):
            return True
    return False


def tls_reason(exc: BaseException) -> str:
    """The short reason of a TLS failure: "certificate verify failed: self-signed certificate"."""
    texts = [str(item) for item in _wrapped(exc)]
    for text in texts:
        verify = _TLS_VERIFY_REASON.search(text)
        if verify:
            return "certificate verify failed: " + verify.group(1).strip()
    for text in texts:
        other = _TLS_SSL_REASON.search(text)
        if other:
            return other.group(1)
    return "TLS handshake failed"
