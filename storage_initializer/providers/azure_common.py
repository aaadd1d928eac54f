"""What Azure Blob and Azure File share sources have in common: URI parts, the HTTP pipeline
(transport, timeouts, TLS trust, retries) and path rules. Credential selection is in
:mod:`azure_credentials`, the translation of SDK exceptions into our errors in :mod:`azure_errors`;
the names azure_blob and azure_file use are importable from here.

The credential order and the environment variables are the stock KServe initializer's, so a pod
spec written for it keeps working: a SAS token in the URI, then a service principal or workload
identity (``AZURE_CLIENT_ID`` …, with the legacy ``AZ_*`` names copied over) through
``DefaultAzureCredential``, then the account key ``AZURE_STORAGE_ACCESS_KEY``, then anonymous.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from storage_initializer.blocks import BLOCK
from storage_initializer.errors import SourceError, UsageError
from storage_initializer.providers.azure_credentials import (
    register_sas,
    select_credential,  # noqa: F401  (azure_blob, azure_file and tests import it from here)
)
from storage_initializer.providers.azure_errors import (  # noqa: F401  (azure_blob, azure_file)
    SDK_RETRIES,
    translate,
)
from storage_initializer.providers.object_layout import file_directory_clash
from storage_initializer.redact import redact
from storage_initializer.tls import is_tls_failure
from storage_initializer.uri import SourceUri

log = logging.getLogger(__name__)

#: Size of one GET inside a range. The SDK buffers one such piece per request, so with N workers
#: the SDK holds at most N x this in memory, whatever the engine's chunk size.
GET_PIECE = 4 * 1024 * 1024
#: Blocks in which a streamed body is handed to the engine (see client_options).
#: Connection pool per client: enough for the engine's workers plus listing.
POOL_SIZE = 64
CONNECT_TIMEOUT = 20
READ_TIMEOUT = 120


@dataclass(frozen=True)
class AzureLocation:
    """The parts of an Azure storage URI."""

    account: str
    #: Container (blob) or share (file).
    container: str
    #: Blob-name prefix or directory path, without leading or trailing slashes, URL-decoded.
    prefix: str
    #: Whether the URI ended with "/": then the prefix can only be a directory.
    directory_only: bool
    #: The SAS query string (without "?"), or "" when the URI carries none.
    sas: str
    #: Where requests go: ``https://<host>`` or the override from the environment.
    endpoint: str
    #: Whether ``endpoint`` came from the environment (named in error messages).
    endpoint_overridden: bool


def parse_location(uri: SourceUri, endpoint_env: str, what: str) -> AzureLocation:
    """Split ``https://<acct>.<host>/<container>/<prefix>[?sas]`` and register the SAS as secret.

    The path is URL-decoded: ``my%20model`` names the blob ``my model``, as a browser would read
    it (the stock initializer passes the escaped text through, which never matches).
    """
    parts = urlsplit(uri.raw)
    host = parts.netloc.rpartition("@")[2]
    account = host.split(".", 1)[0]
    segments = parts.path.lstrip("/").split("/", 1)
    container = unquote(segments[0])
    if not container:
        raise UsageError(
            f"{uri.redacted} names no {what}",
            f"Write it as https://{host}/<{what}>/<path>",
        )
    raw_prefix = unquote(segments[1]) if len(segments) > 1 else ""
    prefix = raw_prefix.strip("/")
    sas = parts.query
    if sas:
        register_sas(sas)
    override = os.environ.get(endpoint_env, "").strip()
    endpoint = override.replace("{account}", account).rstrip("/") if override else f"https://{host}"
    return AzureLocation(
        account=account,
        container=container,
        prefix=prefix,
        directory_only=bool(prefix) and raw_prefix.endswith("/"),
        sas=sas,
        endpoint=endpoint,
        endpoint_overridden=bool(override),
    )


def client_options(retry_class: Any) -> dict[str, Any]:
    """Keyword arguments for every SDK client: our transport, timeouts, TLS trust, retries.

    The SDK's own retries are kept short (the engine retries byte ranges itself, and a pod that
    cannot reach its endpoint should say so in seconds, not after the SDK's minutes of backoff).
    """
    import requests
    from azure.core.pipeline.transport import RequestsTransport

    from storage_initializer.providers.http_adapter import StreamAdapter
    from storage_initializer.tls import combined_bundle

    session = requests.Session()
    adapter = StreamAdapter(pool_connections=4, pool_maxsize=POOL_SIZE)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    options: dict[str, Any] = {
        "transport": RequestsTransport(
            session=session,
            session_owner=True,
            connection_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            # The transport, not the client, decides how a streamed body is cut: azure-core's
            # default is 4 KiB, i.e. a Python round trip (and a pwrite) for every 4 KiB.
            connection_data_block_size=BLOCK,
        ),
        "retry_policy": _without_tls_retries(retry_class)(
            initial_backoff=0.5,
            increment_base=2,
            retry_total=SDK_RETRIES,
            random_jitter_range=1,
        ),
        "max_single_get_size": GET_PIECE,
        "max_chunk_get_size": GET_PIECE,
        "connection_timeout": CONNECT_TIMEOUT,
        "read_timeout": READ_TIMEOUT,
    }
    bundle = combined_bundle()
    if bundle:
        options["connection_verify"] = bundle
    return options


def _without_tls_retries(retry_class: Any) -> Any:
    """``retry_class`` (the SDK's storage retry policy) that gives up at once on a TLS failure:
    the SDK counts it as a connection error and backs off, but a certificate nobody trusts is
    not trusted by asking again."""

    class NoTlsRetry(retry_class):
        def increment(
            self, settings: Any, request: Any, response: Any = None, error: Any = None
        ) -> bool:
            if error is not None and is_tls_failure(error):
                return False
            return bool(super().increment(settings, request, response=response, error=error))

    return NoTlsRetry


def client_refused(exc: ValueError, where: str, location: AzureLocation, mode: str) -> UsageError:
    """The SDK refuses some combinations before any request, e.g. a token over plain HTTP."""
    return UsageError(
        redact(f"{where}: cannot use endpoint {location.endpoint} with {mode}: {exc}"),
        "Token credentials (AZURE_CLIENT_ID) need an https:// endpoint; check the endpoint "
        "override variables, or use a SAS token or AZURE_STORAGE_ACCESS_KEY",
    )


def safe_relative_path(name: str, what: str) -> str:
    """A path relative to the model directory, or SourceError if it could escape it.

    Empty segments are dropped ("a//b" is "a/b"); "." and ".." are refused rather than guessed at.
    """
    segments = [segment for segment in name.split("/") if segment]
    if not segments or any(segment in (".", "..") for segment in segments):
        raise SourceError(
            f"{what} {redact(name)!r} cannot be stored as a file below the model directory",
            "Rename the object: its name must not be empty or contain '.' or '..' segments",
        )
    return "/".join(segments)


def check_layout(paths: Iterable[str], where: str) -> None:
    """Refuse listings that no directory can hold: one path twice, or a file that is also a
    directory ("a" and "a/b", possible in flat blob namespaces)."""
    seen: set[str] = set()
    for path in paths:
        if path in seen:
            raise SourceError(f"{where}: two objects map to the same file {path!r}")
        seen.add(path)
    clash = file_directory_clash(seen)
    if clash:
        raise SourceError(
            f"{where}: {clash[0]!r} is both a file and a directory",
            "Remove or rename one of them, or point the URI at a narrower prefix",
        )


def md5_hex(value: Any) -> str | None:
    """Content-MD5 as the SDK returns it (bytearray, bytes or base64 text) to lowercase hex."""
    if not value:
        return None
    if isinstance(value, bytes | bytearray):
        data = bytes(value)
    else:
        import base64

        try:
            data = base64.b64decode(str(value), validate=True)
        except ValueError:
            return None
    return data.hex() if len(data) == 16 else None
