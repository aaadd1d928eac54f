"""What a Hub failure means, in words a user can act on.

One job: map a Hub answer (status, ``X-Error-Code``, ``X-Error-Message``) or a requests failure
before any answer to the error class the engine acts on, with a hint naming the setting to check
(``HF_TOKEN``, ``HF_ENDPOINT``, the CA bundle). Mixed into
:class:`~storage_initializer.providers.hf.HfSource`, whose URI, revision and token state the
messages depend on. Never shows the token: only short reasons are taken from exception texts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import requests

from storage_initializer.errors import (
    AccessDeniedError,
    InitializerError,
    NotFoundError,
    SourceError,
    TransientError,
)
from storage_initializer.providers import httpcommon
from storage_initializer.redact import redact
from storage_initializer.tls import tls_reason

if TYPE_CHECKING:
    from storage_initializer.providers.hf_uri import HubRef
    from storage_initializer.uri import SourceUri

_CONNECT_REASONS = (
    ("Connection refused", "connection refused"),
    ("Name or service not known", "unknown host"),
    ("Failed to resolve", "unknown host"),
    ("NameResolutionError", "unknown host"),
    ("No route to host", "no route to host"),
    ("timed out", "timed out"),
    ("Connection reset", "connection reset"),
    ("RemoteDisconnected", "the connection closed without an answer"),
)


def _connect_reason(exc: BaseException) -> str:
    text = str(exc)
    for marker, reason in _CONNECT_REASONS:
        if marker in text:
            return reason
    return type(exc).__name__


class HfErrors:
    """The error mapping of :class:`~storage_initializer.providers.hf.HfSource`."""

    uri: SourceUri
    ref: HubRef
    endpoint: str
    token: str | None
    commit: str | None

    def _describe_repo(self) -> str:
        return f"{self.ref.repo_id}@{self.ref.revision}"

    def _http_error(self, response: requests.Response, what: str) -> InitializerError:
        status = response.status_code
        code = response.headers.get("X-Error-Code", "")
        server_message = response.headers.get("X-Error-Message", "")
        where = f"{self.uri.redacted}: {what}"
        if status == 401:
            if self.token:
                if server_message == "Invalid credentials in Authorization header":
                    return AccessDeniedError(
                        f"{where}: the Hub rejected the token (HTTP 401, invalid credentials)",
                        "HF_TOKEN is not a valid token; create a read token and update the secret",
                    )
                return AccessDeniedError(
                    f"{where}: the Hub refused access (HTTP 401): the repository does not exist "
                    "or the token cannot read it",
                    "Check the repository name, and that the account of HF_TOKEN has access to it",
                )
            return AccessDeniedError(
                f"{where}: the Hub refused access (HTTP 401): the repository is private or "
                "gated, or does not exist",
                "Set HF_TOKEN (e.g. from a secret) to a token that can read the repository, "
                "and check the repository name",
            )
        if status == 403:
            if code == "GatedRepo":
                return AccessDeniedError(
                    f"{where}: the repository is gated and the token's account has not been "
                    "granted access (HTTP 403)",
                    "Accept the model's conditions on its Hub page with the account of HF_TOKEN",
                )
            return AccessDeniedError(
                f"{where}: access forbidden (HTTP 403)",
                "Check that HF_TOKEN has read permission on this repository",
            )
        if status == 404:
            if code == "RevisionNotFound":
                return NotFoundError(
                    f"{where}: revision {self.ref.revision!r} not found in {self.ref.repo_id}",
                    "Check the branch, tag or commit after ':' in the URI",
                )
            if code == "EntryNotFound":
                return NotFoundError(f"{where}: not found at commit {self.commit or '?'}")
            return NotFoundError(f"{where}: repository {self.ref.repo_id} not found (HTTP 404)")
        if status == 429:
            message = f"{where}: the Hub is rate-limiting requests (HTTP 429)"
        elif status >= 500:
            message = f"{where}: the Hub answered HTTP {status}"
        elif status == 416:
            message = f"{where}: range not satisfiable (HTTP 416): the file changed?"
        else:
            message = f"{where}: unexpected HTTP {status} from the Hub"
        return httpcommon.answer_error(response, message)

    def _transport_error(self, exc: Exception, what: str) -> InitializerError:
        """A requests failure before any answer. The exception text may hold a URL but never
        our header; only a short reason from it is shown."""
        where = f"{self.uri.redacted}: {what}"
        endpoint = redact(self.endpoint)
        if isinstance(exc, requests.exceptions.SSLError):
            # An untrusted certificate is not a blip: asking again will not help.
            return SourceError(
                f"{where}: TLS verification of {endpoint} failed ({tls_reason(exc)})",
                "Add the CA that signed the Hub's certificate to the global CA bundle "
                f"(CA_BUNDLE_CONFIGMAP_NAME) or REQUESTS_CA_BUNDLE, and check HF_ENDPOINT "
                f"({endpoint})",
            )
        if isinstance(exc, requests.exceptions.ConnectionError):
            return TransientError(
                f"{where}: cannot connect to the Hub at {endpoint} ({_connect_reason(exc)})",
                f"Check HF_ENDPOINT ({endpoint}), DNS, the egress network policy and proxies",
            )
        return TransientError(f"{where}: {type(exc).__name__}")

    @staticmethod
    def _give_up(error: TransientError, attempts: int) -> TransientError:
        return TransientError(
            f"{error} (gave up after {attempts} attempt{'s' if attempts > 1 else ''})",
            error.hint
            or "The Hub kept refusing or failing; wait and run again (a token, HF_TOKEN, "
            "raises the Hub's rate limits)",
        )
