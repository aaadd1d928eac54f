"""The registry side of ``oci://``: what a reference names, whose credentials, and the HTTP API.

One job: talk to a registry's HTTP API v2 for one repository, so the rest of the provider only
asks for a path below ``/v2/`` and gets an open response or a clear error. That covers parsing
the ``oci://`` reference, finding credentials in the docker ``config.json`` KServe mounts,
answering the ``401`` challenge (basic, or bearer through the registry's token service) and
mapping refusals, missing images and unreachable registries to the errors a user can act on,
with every credential registered for redaction. Split out of :mod:`.oci` so that the source
itself reads as manifest → layers → listing.
"""

from __future__ import annotations

import base64
import json
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlencode

import requests

from storage_initializer import tls
from storage_initializer.errors import (
    AccessDeniedError,
    NotFoundError,
    SourceError,
    TransientError,
    UsageError,
)
from storage_initializer.providers import httpcommon
from storage_initializer.redact import register_secret

DOCKER_CONFIG_ENV = "KSERVE_OCI_DOCKER_CONFIG"
DEFAULT_DOCKER_CONFIG = "/mnt/oci-fetch-auth/config.json"
INSECURE_ENV = "KSERVE_OCI_INSECURE_REGISTRY"
TIMEOUT = (15, 60)
#: Attempts per layer when the transfer breaks or the digest does not match.
ATTEMPTS = 3
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_CHALLENGE_RE = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True)
class Reference:
    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def reference(self) -> str:
        return self.digest or self.tag or "latest"


def parse_reference(raw: str) -> Reference:
    """``oci://host[:port]/repo/path[:tag][@sha256:…]`` → its parts (Docker Hub names too)."""
    target = raw[len("oci://") :] if raw.lower().startswith("oci://") else raw
    if not target:
        raise UsageError("the OCI reference is empty", "Write oci://registry/repository:tag")
    digest = None
    if "@" in target:
        target, _, digest = target.partition("@")
        if not DIGEST_RE.match(digest):
            raise UsageError(
                f"oci://{target}@{digest}: the digest must be sha256:<64 lowercase hex>"
            )
    registry, sep, rest = target.partition("/")
    if not sep or not rest:
        raise UsageError(
            f"oci://{target} names no registry",
            "Write oci://registry.example.com/repository:tag (docker.io/library/x for Hub)",
        )
    # The first segment is always the registry, as in the stock initializer (a cluster-local
    # "registry/model" is not a Docker Hub name); docker.io is mapped to Hub's API host.
    tag = None
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        rest, _, tag = rest.rpartition(":")
    if registry == "docker.io":
        registry = "registry-1.docker.io"
        if "/" not in rest:
            rest = "library/" + rest
    if not re.match(r"^[a-z0-9]+(?:[._-]+[a-z0-9]+)*(?:/[a-z0-9]+(?:[._-]+[a-z0-9]+)*)*$", rest):
        raise UsageError(f"oci://{target}: {rest!r} is not a valid repository name")
    return Reference(registry, rest, tag, digest)


def docker_credentials(registry: str, path: str | None = None) -> tuple[str, str] | None:
    """(user, password) for ``registry`` from a docker config.json, or None (anonymous).

    Lookup keys as in the stock initializer (``host:port``, ``https://host:port``, ``host``),
    plus Docker Hub's historical key. A credential helper cannot run here: anonymous, as stock.
    """
    path = path or os.environ.get(DOCKER_CONFIG_ENV) or DEFAULT_DOCKER_CONFIG
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return None
    auths = config.get("auths") if isinstance(config, dict) else None
    if not isinstance(auths, dict):
        return None
    keys = [registry, f"https://{registry}", registry.split(":", 1)[0], f"http://{registry}"]
    if registry == "registry-1.docker.io":
        keys += ["docker.io", "https://index.docker.io/v1/", "index.docker.io"]
    entry = next((auths[k] for k in keys if isinstance(auths.get(k), dict)), None)
    if entry is None:
        return None
    user, password = entry.get("username"), entry.get("password")
    encoded = entry.get("auth")
    if isinstance(encoded, str) and encoded:
        try:
            user, _, password = base64.b64decode(encoded).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
    if not isinstance(user, str) or not isinstance(password, str) or not user:
        return None
    register_secret(password)
    register_secret(encoded if isinstance(encoded, str) else None)
    return user, password


def _verify(session: requests.Session) -> None:
    session.verify = tls.requests_verify()


class RegistryClient:
    """GETs below ``/v2/`` of one registry, answering its authentication challenge once.

    Thread-safe: layers may be fetched by several workers; the session pool gives each thread
    its own session and the token is shared under a lock.
    """

    def __init__(self, ref: Reference) -> None:
        self.ref = ref
        insecure = os.environ.get(INSECURE_ENV, "").strip().lower() in ("1", "true", "yes")
        self.base = f"{'http' if insecure else 'https'}://{self.ref.registry}/v2/"
        self.credentials = docker_credentials(self.ref.registry)
        self._sessions = httpcommon.SessionPool(_verify)
        self._peer = httpcommon.Peer(
            name="the registry",
            address=f"the registry {self.ref.registry}",
            tls_hint="Trust the registry's CA with the global CA bundle "
            f"(CA_BUNDLE_CONFIGMAP_NAME), or set {INSECURE_ENV}=true for a plain-HTTP registry",
            connect_hint="Check the registry host and port, the network policy, and "
            f"{INSECURE_ENV} for a plain-HTTP registry",
            reason=reason,
            unreachable=_refused_or_unknown,
        )
        self._auth: str | None = None
        self._lock = threading.Lock()

    def _send(self, url: str, headers: Mapping[str, str], what: str) -> requests.Response:
        try:
            return self._sessions.get().get(
                url, headers=dict(headers), stream=True, timeout=TIMEOUT, allow_redirects=True
            )
        except requests.RequestException as exc:
            raise httpcommon.transport_error(exc, what, self._peer) from None

    def get(self, path: str, headers: Mapping[str, str], what: str) -> requests.Response:
        """GET below /v2/, answering a 401 challenge once (basic or bearer)."""
        url = self.base + path
        sent = dict(headers)
        if self._auth:
            sent["Authorization"] = self._auth
        response = self._send(url, sent, what)
        if response.status_code == 401:
            challenge = response.headers.get("WWW-Authenticate", "")
            response.close()
            with self._lock:
                self._auth = self._authorize(challenge, what)
            sent["Authorization"] = self._auth
            response = self._send(url, sent, what)
        self._raise_for_status(response, what)
        return response

    def _authorize(self, challenge: str, what: str) -> str:
        scheme, _, params_text = challenge.partition(" ")
        params = dict(_CHALLENGE_RE.findall(params_text))
        if scheme.lower() == "basic":
            if self.credentials is None:
                raise self._denied(what, 401)
            basic = base64.b64encode(":".join(self.credentials).encode()).decode()
            register_secret(basic)
            return f"Basic {basic}"
        if scheme.lower() != "bearer" or "realm" not in params:
            raise SourceError(f"{what}: unsupported registry authentication {scheme!r}")
        query = {"service": params.get("service", "")}
        query["scope"] = params.get("scope") or f"repository:{self.ref.repository}:pull"
        url = params["realm"] + ("&" if "?" in params["realm"] else "?") + urlencode(query)
        auth = self.credentials
        try:
            response = self._sessions.get().get(url, auth=auth, timeout=TIMEOUT, stream=True)
            if response.status_code == 200:
                httpcommon.read_metadata(response, what)
        except requests.exceptions.RequestException as exc:
            raise TransientError(f"{what}: the token service failed ({reason(exc)})") from None
        with response:
            if response.status_code in (401, 403):
                raise self._denied(what, response.status_code)
            if response.status_code != 200:
                message = f"{what}: the token service answered {response.status_code}"
                raise httpcommon.answer_error(response, message)
            token: object
            try:
                body = response.json()
                token = body.get("token") or body.get("access_token")
            except (ValueError, AttributeError):
                token = None
        if not isinstance(token, str) or not token:
            raise SourceError(f"{what}: the token service sent no token")
        register_secret(token)
        return f"Bearer {token}"

    def _denied(self, what: str, code: int) -> AccessDeniedError:
        if self.credentials is None:
            return AccessDeniedError(
                f"{what}: the registry requires credentials ({code}) and none were found for "
                f"{self.ref.registry}",
                f"Mount a docker config.json with an 'auths' entry for {self.ref.registry} and "
                f"name it in {DOCKER_CONFIG_ENV} (KServe mounts it at {DEFAULT_DOCKER_CONFIG})",
            )
        return AccessDeniedError(
            f"{what}: the registry refused the credentials for {self.ref.registry} ({code})",
            f"Check the docker config.json named by {DOCKER_CONFIG_ENV} and the account's pull "
            "permission",
        )

    def _raise_for_status(self, response: requests.Response, what: str) -> None:
        code = response.status_code
        if code < 400:
            return
        detail = _registry_errors(response)
        response.close()
        if code in (401, 403):
            raise self._denied(what, code)
        if code == 404:
            raise NotFoundError(f"{what}: not found in {self.ref.registry}{detail}")
        message = f"{what}: the registry answered {code}{detail}"
        raise httpcommon.answer_error(response, message)

    def close(self) -> None:
        self._sessions.close()


def _registry_errors(response: requests.Response) -> str:
    """The registry's own error codes (MANIFEST_UNKNOWN, NAME_UNKNOWN, DENIED…), if any."""
    try:
        body = json.loads(response.raw.read(65536, decode_content=True) or b"{}")
        codes = [str(e.get("code")) for e in body.get("errors", []) if isinstance(e, dict)]
    except (ValueError, AttributeError, OSError, requests.exceptions.RequestException):
        return ""
    return f" ({', '.join(codes)})" if codes else ""


def _refused_or_unknown(exc: BaseException) -> bool:
    """Whether a connection error means a refused connection or an unknown host."""
    text = repr(exc)
    return any(m in text for m in ("refused", "Name or service", "NameResolution", "Errno -"))


def reason(exc: BaseException) -> str:
    """An exception's text, cut short for a one-line message."""
    text = str(exc)
    return text if len(text) <= 200 else text[:200] + "…"
