"""What a ModelScope Hub failure means, in words a user can act on.

One job: map a Hub answer (HTTP status, or the ``Success``/``Code``/``Message`` envelope of a 200)
or a requests failure before any answer to the error class the engine acts on, with a hint naming
the setting to check (``MODELSCOPE_API_TOKEN``, ``MODELSCOPE_ENDPOINT``). Mixed into
:class:`~storage_initializer.providers.modelscope.ModelScopeSource`, whose URI, endpoint and token
state the messages depend on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import requests

from storage_initializer.errors import (
    AccessDeniedError,
    InitializerError,
    NotFoundError,
    SourceError,
    TransientError,
)
from storage_initializer.providers import httpcommon

if TYPE_CHECKING:
    from storage_initializer.uri import SourceUri


class ModelScopeErrors:
    """The error mapping of :class:`~storage_initializer.providers.modelscope.ModelScopeSource`."""

    uri: SourceUri
    endpoint: str
    token: str | None

    @staticmethod
    def _message(response: requests.Response) -> str:
        body = httpcommon.error_json(response)
        if isinstance(body, dict):
            for key in ("Message", "message", "msg"):
                if isinstance(body.get(key), str):
                    return body[key][:300]
        return ""

    def _http_error(self, response: requests.Response, what: str) -> InitializerError:
        status = response.status_code
        message = self._message(response)
        detail = f"HTTP {status}" + (f": {message}" if message else "")
        where = f"{self.uri.redacted}: {what}"
        if status == 401:
            if self.token:
                return AccessDeniedError(
                    f"{where}: ModelScope rejected the token ({detail})",
                    "MODELSCOPE_API_TOKEN is not a valid token: create an access token on "
                    "ModelScope and update the secret",
                )
            return AccessDeniedError(
                f"{where}: ModelScope refused anonymous access ({detail}): the model is private "
                "or does not exist",
                "Set MODELSCOPE_API_TOKEN (e.g. from a secret) to a token that can read it",
            )
        if status == 403:
            return AccessDeniedError(
                f"{where}: access forbidden ({detail})",
                "Check that the account of MODELSCOPE_API_TOKEN can read this model",
            )
        if status == 404:
            return NotFoundError(f"{where}: not found ({detail})")
        if status == 416:
            message = f"{where}: range not satisfiable (HTTP 416): the file changed?"
            return httpcommon.answer_error(response, message)
        return httpcommon.unexpected_answer(response, where, detail)

    def _transport_error(self, exc: Exception, what: str) -> InitializerError:
        if isinstance(exc, requests.exceptions.SSLError):
            return SourceError(
                f"{self.uri.redacted}: {what}: TLS verification of {self.endpoint} failed",
                "Add the endpoint's CA to the global CA bundle, or check MODELSCOPE_ENDPOINT",
            )
        return TransientError(f"{self.uri.redacted}: {what}: {type(exc).__name__}")

    def _data(self, response: requests.Response, what: str) -> Any:
        """The ``Data`` of the Hub's envelope; ``Success: false`` in a 200 is an error too."""
        try:
            body = response.json()
        except ValueError:
            raise SourceError(
                f"{self.uri.redacted}: {what}: the Hub answered something that is not JSON",
                f"Check that MODELSCOPE_ENDPOINT ({self.endpoint}) points at a ModelScope Hub",
            ) from None
        if not isinstance(body, dict):
            raise SourceError(f"{self.uri.redacted}: {what}: unexpected answer")
        code = body.get("Code")
        if body.get("Success") is False or (isinstance(code, int) and code not in (0, 200)):
            message = str(body.get("Message") or code)
            if "not exist" in message.lower() or "not found" in message.lower():
                raise NotFoundError(f"{self.uri.redacted}: {what}: {message}")
            raise SourceError(f"{self.uri.redacted}: {what}: {message}")
        return body.get("Data", body)
