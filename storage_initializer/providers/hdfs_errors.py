"""What a WebHDFS answer that is not a success means, as an error a user can act on.

One job: read the ``RemoteException`` of a namenode's or datanode's answer and map it (with the
HTTP status) to the error classes the engine acts on: a standby namenode or a 5xx is transient
(worth asking again, maybe another namenode), a missing file or a denial is not. Mixed into
:class:`~storage_initializer.providers.hdfs.HdfsSource`, whose URI and path the messages name.
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

if TYPE_CHECKING:
    from storage_initializer.uri import SourceUri

RETRIABLE_EXCEPTIONS = frozenset(
    {
        "StandbyException",
        "RetriableException",
        "SafeModeException",
        "ObserverRetryOnActiveException",
    }
)
DENIED_EXCEPTIONS = frozenset(
    {
        "AccessControlException",
        "AuthorizationException",
        "AuthenticationException",
        "SecurityException",
        "InvalidToken",
    }
)
NOT_FOUND_EXCEPTIONS = frozenset({"FileNotFoundException"})


class WebHdfsErrors:
    """The error mapping of :class:`~storage_initializer.providers.hdfs.HdfsSource`."""

    uri: SourceUri
    #: The URI's path as written (named in the hint of a "not found").
    _relative: str

    @staticmethod
    def _remote_exception(response: requests.Response) -> tuple[str, str]:
        body = httpcommon.error_json(response)
        if body is None:
            text = httpcommon.error_body(response).decode("utf-8", "replace").strip()
            return "", text.splitlines()[0][:300] if text else ""
        remote = body.get("RemoteException") if isinstance(body, dict) else None
        if not isinstance(remote, dict):
            return "", ""
        return str(remote.get("exception", "")), str(remote.get("message", ""))[:500]

    def _http_error(self, response: requests.Response, what: str) -> InitializerError:
        status = response.status_code
        exception, message = self._remote_exception(response)
        detail = f"HTTP {status}" + (f" {exception}" if exception else "")
        detail += f": {message}" if message else ""
        where = f"{self.uri.redacted}: {what}"
        if exception in RETRIABLE_EXCEPTIONS:
            return TransientError(
                f"{where}: the namenode answered {detail}",
                retry_after=httpcommon.retry_after(response.headers),
            )
        if exception in NOT_FOUND_EXCEPTIONS or (status == 404 and not exception):
            hint = "Check the path: the URI's part after the scheme is the HDFS path"
            first = self._relative.split("/", 1)[0]
            if ":" in first or first.count(".") >= 2:
                hint += (
                    f" ({first!r} is read as a directory, not as the namenode: the namenode "
                    "comes from HDFS_NAMENODE, as in KServe's stock initializer)"
                )
            return NotFoundError(f"{where}: not found ({detail})", hint)
        if exception in DENIED_EXCEPTIONS or status in (401, 403):
            return AccessDeniedError(
                f"{where}: access denied ({detail})",
                "Check USER_PROXY, the Kerberos principal/keytab or HEADERS in the HDFS secret, "
                "and the HDFS permissions of the path",
            )
        return httpcommon.unexpected_answer(response, where, detail)

    def _unreachable(self, exc: Exception, namenodes: list[str]) -> SourceError:
        if isinstance(exc, requests.exceptions.SSLError):
            return SourceError(
                f"{self.uri.redacted}: TLS handshake with the namenode "
                f"{', '.join(namenodes)} failed ({type(exc).__name__})",
                "Give the namenode's CA as TLS_CA (or the global CA bundle), or set "
                "TLS_SKIP_VERIFY=true if you accept an unverified connection",
            )
        return SourceError(
            f"{self.uri.redacted}: cannot reach the HDFS namenode "
            f"{', '.join(namenodes)} ({type(exc).__name__})",
            "Check HDFS_NAMENODE in the HDFS secret (a WebHDFS URL such as "
            "http://namenode:9870) and that the pod can reach it",
        )
