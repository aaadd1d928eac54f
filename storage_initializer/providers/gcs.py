"""The Google Cloud Storage provider: ``gs://bucket/path``.

Credentials follow KServe's stock initializer (its ``_download_gcs``):
``GOOGLE_APPLICATION_CREDENTIALS`` names a key file (service account, external account); without
it, Application Default Credentials (GKE Workload Identity, the metadata server, gcloud's user
login) are tried, and when none exist the client is anonymous, which reads public buckets.
``STORAGE_EMULATOR_HOST`` points the client at an emulator (fake-gcs-server,
gcp-storage-emulator) with anonymous credentials, as google-cloud-storage itself does.

Layout, as the stock initializer decides it: ``gs://b/path`` is first the *directory* ``path/``;
only if nothing is listed there is ``path`` one object, saved under its basename. Unlike the stock
one we strip the prefix exactly, so ``gs://b/model`` never picks up ``model-v2/...``, and
``gs://b`` (the bucket root) works. ``.../`` placeholder objects are skipped.

Checksums: the listing carries each object's CRC32C and (for non-composite objects) MD5, in
base64; we announce both in hex and the engine verifies while writing. Reads are plain media GETs
with a ``Range`` header through the client's authorised session, pinned to the listed generation
(so an object replaced mid-download fails instead of mixing two versions), streamed in 1 MiB
blocks. The library's own download path is not used: it validates whole-object checksums (wrong
for ranges) and writes to a file object rather than yielding blocks.
"""

from __future__ import annotations

import binascii
import json
import logging
import os
import posixpath
from collections.abc import Iterator
from http.client import HTTPException
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import quote

import google.auth
import requests
import urllib3.exceptions as u3
from google.api_core import exceptions as gexc
from google.api_core.retry import Retry
from google.auth import exceptions as auth_exc
from google.auth.credentials import AnonymousCredentials, Credentials
from google.auth.transport.requests import AuthorizedSession
from google.cloud import storage
from requests.adapters import HTTPAdapter

from storage_initializer import checksums, tls
from storage_initializer.blocks import BLOCK
from storage_initializer.errors import (
    AccessDeniedError,
    InitializerError,
    NotFoundError,
    SourceChangedError,
    SourceError,
    TransientError,
    UsageError,
)
from storage_initializer.paths import safe_relpath
from storage_initializer.providers import httpcommon
from storage_initializer.providers.base import Listing, RemoteFile, Source, fingerprint_of
from storage_initializer.redact import redact

if TYPE_CHECKING:
    from storage_initializer.settings import Settings
    from storage_initializer.uri import SourceUri

log = logging.getLogger(__name__)

#: Size of the blocks :meth:`GcsSource.read` yields: bounded memory whatever the range.
#: We only read; a read-only token limits what a leaked token could do.
SCOPES = ("https://www.googleapis.com/auth/devstorage.read_only",)
CONNECT_TIMEOUT = 15.0
#: Seconds without a byte before a read is abandoned (and retried by the engine).
READ_TIMEOUT = 60.0
#: Objects per listing page (the API's maximum).
LIST_PAGE_SIZE = 1000
#: How long one listing page is retried on 429/5xx/resets before the pull fails.
LIST_RETRY_DEADLINE = 30.0
#: Retries of a listing request whose connection could not even be opened (refused, DNS): a
#: wrong endpoint should fail within seconds, a sidecar that starts a moment late should not.
CONNECT_RETRIES = 2
#: Only the fields we use: listings of big trees are several times smaller.
LIST_FIELDS = "items(name,size,crc32c,md5Hash,generation,contentEncoding),nextPageToken"
EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
CREDENTIALS_ENV = "GOOGLE_APPLICATION_CREDENTIALS"

_CONNECT_ERRORS = (
    u3.NewConnectionError,
    u3.ConnectTimeoutError,
    requests.exceptions.ConnectTimeout,
)
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
#: Errors while a body streams or a request is sent: the read can be retried.
_STREAM_ERRORS: tuple[type[BaseException], ...] = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
    u3.HTTPError,
    HTTPException,
    ConnectionError,
    TimeoutError,
)

_RETRYABLE_ERRORS = (*_STREAM_ERRORS, auth_exc.TransportError)


def split_gs_uri(raw: str) -> tuple[str, str]:
    """``gs://bucket/path`` -> (bucket, path), split as the stock initializer does. The path is
    taken literally: object names may hold ``%``, ``?`` or ``#``."""
    rest = raw.strip()[len("gs://") :]
    bucket, _, path = rest.partition("/")
    return bucket, path


def emulator_endpoint() -> str | None:
    """``STORAGE_EMULATOR_HOST`` as a URL; a bare ``host:port`` (as many emulator guides write it)
    gets ``http://``, which google-cloud-storage would otherwise send to requests unchanged."""
    value = os.environ.get(EMULATOR_ENV, "").strip().rstrip("/")
    if not value:
        return None
    return value if "://" in value else "http://" + value


def load_credentials() -> tuple[Credentials, str | None, str]:
    """(credentials, project, what to call them in logs and hints).

    An emulator gets anonymous credentials (as google-cloud-storage gives it). A key file named
    by ``GOOGLE_APPLICATION_CREDENTIALS`` must load: the stock initializer silently falls back to
    anonymous when it does not, which turns a broken secret mount into a confusing 401 later.
    Otherwise Application Default Credentials, else anonymous (the stock behaviour).
    """
    if emulator_endpoint():
        return AnonymousCredentials(), None, f"anonymous credentials ({EMULATOR_ENV} is set)"
    keyfile = os.environ.get(CREDENTIALS_ENV, "").strip()
    if keyfile:
        try:
            if not os.path.isfile(keyfile):
                raise auth_exc.DefaultCredentialsError(f"File {keyfile} was not found.")
            # google.auth.default reads the file as the stock initializer's storage.Client()
            # does (service account, external account, authorized user).
            credentials, project = google.auth.default(scopes=SCOPES)
        except auth_exc.DefaultCredentialsError as exc:
            raise UsageError(
                f"{CREDENTIALS_ENV}={keyfile} cannot be used: {redact(str(exc))}",
                "Mount the service account key JSON there (KServe's GCS secret), or unset "
                f"{CREDENTIALS_ENV} to use Workload Identity or anonymous access",
            ) from exc
        return credentials, project, f"the credentials in {CREDENTIALS_ENV}={keyfile}"
    try:
        credentials, project = google.auth.default(scopes=SCOPES)
    except auth_exc.DefaultCredentialsError:
        return AnonymousCredentials(), None, "anonymous credentials (no credentials found)"
    return credentials, project, "Application Default Credentials (e.g. Workload Identity)"


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and everything it wraps (requests and urllib3 nest their reasons in ``args``)."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        stack.extend(arg for arg in getattr(item, "args", ()) if isinstance(arg, BaseException))
        reason = getattr(item, "reason", None)
        if isinstance(reason, BaseException):
            stack.append(reason)
        for linked in (item.__cause__, item.__context__):
            if linked is not None:
                stack.append(linked)


def is_connect_failure(exc: BaseException) -> bool:
    """Whether no connection could be opened at all (refused, unknown host, connect timeout):
    the endpoint is wrong or down, not merely busy."""
    return any(isinstance(item, _CONNECT_ERRORS) for item in _causes(exc))


def _connect_reason(exc: BaseException) -> str:
    """The short reason of a connection failure ("[Errno 111] Connection refused"), not urllib3's
    paragraph with the whole request URL."""
    for item in _causes(exc):
        if isinstance(item, u3.NewConnectionError | u3.ConnectTimeoutError):
            return redact(str(item).rpartition("): ")[2] or str(item))
    return redact(str(exc))


def _status_of(exc: BaseException) -> int:
    code = getattr(exc, "code", None)
    return code if isinstance(code, int) else 0


def _listing_retry() -> Retry:
    """Retry one listing request on 429/5xx/resets for :data:`LIST_RETRY_DEADLINE` seconds, and on
    connection failures only :data:`CONNECT_RETRIES` times (one counter per listing)."""
    connect_failures = 0

    def retryable(exc: Exception) -> bool:
        nonlocal connect_failures
        if isinstance(exc, gexc.GoogleAPICallError):
            return _status_of(exc) in _TRANSIENT_STATUS
        if isinstance(exc, requests.exceptions.SSLError):
            return False
        if is_connect_failure(exc):
            connect_failures += 1
            return connect_failures <= CONNECT_RETRIES
        if isinstance(exc, auth_exc.RefreshError):
            return bool(getattr(exc, "retryable", False))
        return isinstance(exc, _RETRYABLE_ERRORS)

    return Retry(predicate=retryable, initial=0.25, maximum=8.0, timeout=LIST_RETRY_DEADLINE)


def _error_message(body: bytes) -> str:
    """The ``error.message`` of a JSON API error body, else its first line."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
        message = data.get("error", {}).get("message") if isinstance(data, dict) else None
        if message:
            return str(message)
    except ValueError:
        pass
    return text.splitlines()[0][:200] if text else ""


def _b64_hex(value: str | None, length: int) -> str | None:
    """A base64 checksum from the API as hex, or None if it is not ``length`` bytes long."""
    if not value:
        return None
    try:
        raw = checksums.b64_to_hex(value)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == 2 * length else None


class GcsSource(Source):
    """Objects of one GCS bucket under one prefix, or one object."""

    default_workers: ClassVar[int] = 16
    supports_ranges: ClassVar[bool] = True

    def __init__(self, uri: SourceUri, settings: Settings) -> None:
        super().__init__(uri, settings)
        self.bucket, self.path = split_gs_uri(uri.raw)
        if not self.bucket:
            raise UsageError(f"{uri.redacted} names no bucket", "Write it as gs://bucket/path")
        credentials, project, self._credentials_desc = load_credentials()
        workers = self.workers()
        # One session for every thread: requests' connection pool is thread-safe; sized so that
        # no worker waits for, or throws away, a connection.
        # A 401 makes AuthorizedSession refresh the token and retry; anonymous credentials
        # cannot be refreshed, so for them a 401 is simply an answer.
        anonymous = isinstance(credentials, AnonymousCredentials)
        self.session = AuthorizedSession(
            credentials, refresh_status_codes=() if anonymous else (401,)
        )
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=max(10, workers + 4), max_retries=0)
        self.session.mount("https://", adapter)
        self.session.mount("http://", adapter)
        self.session.verify = tls.requests_verify()
        options: dict[str, Any] = {}
        emulator = emulator_endpoint()
        if emulator:
            options["api_endpoint"] = emulator
        try:
            self.client = storage.Client(
                project=project,
                credentials=credentials,
                _http=self.session,
                client_options=options or None,
            )
        except (ValueError, auth_exc.GoogleAuthError) as exc:
            raise UsageError(
                f"{uri.redacted}: cannot create the GCS client: {redact(str(exc))}"
            ) from exc
        # google-cloud-storage >= 3.5 fetches the bucket's metadata in a background thread on
        # the first request, for tracing attributes only: one more GET that needs
        # storage.buckets.get (which roles/storage.objectViewer lacks) and a second, concurrent
        # token refresh. Every use of the cache is guarded by "if client._bucket_metadata_cache".
        if getattr(self.client, "_bucket_metadata_cache", None) is not None:
            self.client._bucket_metadata_cache = None
        self.endpoint: str = self.client._connection.API_BASE_URL.rstrip("/")
        log.info("GCS endpoint %s with %s", self.endpoint, self._credentials_desc)
        #: Directory prefix of the listing; None when the path named one object.
        self._prefix: str | None = None

    # ------------------------------------------------------------------ listing

    def list(self) -> Listing:
        path = self.path
        prefix = path if (not path or path.endswith("/")) else path + "/"
        blobs = self._list_prefix(prefix)
        if blobs:
            self._prefix = prefix
            files = [self._remote_file(blob, blob.name[len(prefix) :]) for blob in blobs]
        else:
            blob = self._get_blob(path) if path and not path.endswith("/") else None
            if blob is None:
                where = self._where(prefix)
                also = f" and no object {self._where(path)}" if path and path != prefix else ""
                raise NotFoundError(
                    f"{self.uri.redacted}: nothing to download: no objects under {where}{also}",
                    f"Check the bucket and the path of {self.uri.redacted}; a path is read as the "
                    "directory path/ first, then as one object",
                )
            self._prefix = None
            files = [self._remote_file(blob, posixpath.basename(path))]
        self._check_tree(files)
        return Listing(files=files, fingerprint=fingerprint_of(files))

    def _where(self, name: str) -> str:
        return redact(f"gs://{self.bucket}/{name}")

    def _list_prefix(self, prefix: str) -> list[storage.Blob]:
        found = []
        try:
            pages = self.client.list_blobs(
                self.bucket,
                prefix=prefix or None,
                page_size=LIST_PAGE_SIZE,
                fields=LIST_FIELDS,
                retry=_listing_retry(),
                timeout=(CONNECT_TIMEOUT, READ_TIMEOUT),
            )
            for blob in pages:
                if blob.name.endswith("/"):
                    continue  # a console "folder": no content, the directory exists anyway
                found.append(blob)
        except Exception as exc:
            raise self._map_error(exc, self.uri.redacted) from exc
        return found

    def _get_blob(self, name: str) -> storage.Blob | None:
        try:
            return self.client.bucket(self.bucket).get_blob(
                name, retry=_listing_retry(), timeout=(CONNECT_TIMEOUT, READ_TIMEOUT)
            )
        except Exception as exc:
            raise self._map_error(exc, self.uri.redacted) from exc

    def _remote_file(self, blob: storage.Blob, relative: str) -> RemoteFile:
        path = safe_relpath(relative, what="object")
        # Objects stored gzip-compressed with Content-Encoding: gzip are served decompressed
        # (decompressive transcoding), as the stock initializer saves them: their listed size
        # and checksums describe the compressed bytes, and ranges do not apply to them.
        transcoded = (blob.content_encoding or "").strip().lower() == "gzip"
        sums: dict[str, str] = {}
        if not transcoded:
            crc = _b64_hex(blob.crc32c, 4)
            if crc:
                sums["crc32c"] = crc
            md5 = _b64_hex(blob.md5_hash, 16)  # composite objects have none
            if md5:
                sums["md5"] = md5
        generation = blob.generation
        return RemoteFile(
            path=path,
            size=None if transcoded else int(blob.size or 0),
            checksums=sums,
            version=str(generation or ""),
            handle=(blob.name, generation, transcoded),
        )

    def _check_tree(self, files: list[RemoteFile]) -> None:
        """Two names for one path (``a//b``, ``a/b``) or a path that is both a file and a
        directory (``a``, ``a/b``) cannot be written as one tree: refuse, never mix."""
        seen: dict[str, str] = {}
        for item in files:
            name = item.handle[0]
            if item.path in seen:
                raise SourceError(
                    f"{self.uri.redacted}: objects {seen[item.path]!r} and {name!r} both map to "
                    f"{item.path!r}",
                    "Rename one of the objects; names with empty or '.' segments collide",
                )
            seen[item.path] = name
        for path in seen:
            parent = path.rpartition("/")[0]
            while parent:
                if parent in seen:
                    raise SourceError(
                        f"{self.uri.redacted}: {parent!r} is both an object and a directory "
                        f"(it holds {path!r})",
                        "A model directory cannot hold both; remove or rename one object",
                    )
                parent = parent.rpartition("/")[0]

    # ------------------------------------------------------------------ reading

    def media_url(self, name: str) -> str:
        """The JSON API media download URL of object ``name`` (what the library itself uses)."""
        return (
            f"{self.endpoint}/download/storage/v1/b/{quote(self.bucket, safe='')}"
            f"/o/{quote(name, safe='')}"
        )

    def _handle_of(self, file: RemoteFile) -> tuple[str, int | None, bool]:
        """(object name, generation, transcoded) of a listed file, or of one rebuilt without a
        handle (from a marker), whose name follows from the listing's prefix."""
        if file.handle:
            return file.handle
        name = self.path if self._prefix is None else self._prefix + file.path
        return name, None, file.size is None

    def read(self, file: RemoteFile, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        if end is not None and start >= end:
            return
        name, generation, transcoded = self._handle_of(file)
        where = f"{self.uri.redacted} ({file.path})"
        whole = start == 0 and (end is None or (file.size is not None and end >= file.size))
        # identity: a normal object must arrive byte for byte as stored; gzip: a transcoded one
        # travels compressed and requests inflates it (the same bytes as decompressive
        # transcoding by the server, less bandwidth).
        headers = {"Accept-Encoding": "gzip" if transcoded else "identity"}
        if not whole and not transcoded:
            headers["Range"] = f"bytes={start}-" + ("" if end is None else str(end - 1))
        params = {"alt": "media"}
        if generation:
            params["generation"] = str(generation)
        try:
            response = self.session.get(
                self.media_url(name),
                params=params,
                headers=headers,
                stream=True,
                timeout=(CONNECT_TIMEOUT, READ_TIMEOUT),
            )
        except Exception as exc:
            raise self._map_error(exc, where, listing=False) from exc
        try:
            if response.status_code not in (200, 206):
                raise self._status_error(response, where, generation)
            # A server that ignores Range (or a transcoded object) answers 200 with the whole
            # object: cut our part out rather than write it at the wrong offset.
            skip = start if response.status_code == 200 else 0
            remaining = None if end is None else end - start
            for block in self._blocks(response, where):
                if skip:
                    cut = min(skip, len(block))
                    block = block[cut:]
                    skip -= cut
                    if not block:
                        continue
                if remaining is not None:
                    block = block[:remaining]
                    remaining -= len(block)
                yield block
                if remaining == 0:
                    return
        finally:
            response.close()

    def _blocks(self, response: requests.Response, where: str) -> Iterator[bytes]:
        iterator = response.iter_content(BLOCK)
        while True:
            try:
                block = next(iterator)
            except StopIteration:
                return
            except _STREAM_ERRORS as exc:
                raise TransientError(
                    f"{where}: the transfer from {self.endpoint} broke off: {redact(str(exc))}"
                ) from exc
            if block:
                yield block

    def _status_error(
        self, response: requests.Response, where: str, generation: int | None
    ) -> InitializerError:
        status = response.status_code
        try:
            body = next(response.iter_content(4096), b"")
        except _STREAM_ERRORS:
            body = b""
        detail = f"HTTP {status}" + (f": {redact(_error_message(body))}" if body else "")
        if status in _TRANSIENT_STATUS:
            return TransientError(
                f"{where}: GCS is overloaded or failing: {detail}",
                retry_after=httpcommon.retry_after(response.headers),
            )
        if status in (401, 403):
            return self._denied(where, detail)
        if status in (404, 412, 416):
            # Read pinned to the listed generation: 404 once that generation is replaced or
            # deleted. The pull lists again and fetches the new version whole.
            pinned = f" (generation {generation})" if generation else ""
            return SourceChangedError(
                f"{where}: the object{pinned} was replaced or deleted after it was listed: {detail}"
            )
        return SourceError(f"{where}: GCS error {detail}")

    # ------------------------------------------------------------------ errors

    def _denied(self, where: str, detail: str) -> AccessDeniedError:
        if isinstance(self.session.credentials, AnonymousCredentials):
            hint = (
                "The request was anonymous and the bucket is not public: give the pod "
                f"{CREDENTIALS_ENV} (KServe's GCS secret) or a Workload Identity service account"
            )
        else:
            hint = (
                f"We used {self._credentials_desc}; grant that identity roles/storage.objectViewer "
                f"(storage.objects.list and storage.objects.get) on gs://{self.bucket}"
            )
        return AccessDeniedError(f"{where}: access denied by GCS: {detail}", hint)

    def _map_error(self, exc: BaseException, where: str, listing: bool = True) -> InitializerError:
        """Turn a google-api-core/google-auth/requests failure into one of ours."""
        if isinstance(exc, InitializerError):
            return exc
        retried = ""
        if isinstance(exc, gexc.RetryError):
            retried = f" (still failing after retrying for {LIST_RETRY_DEADLINE:g}s)"
            exc = exc.cause or exc
        text = redact(str(exc))
        if isinstance(exc, gexc.GoogleAPICallError):
            return self._map_api_error(exc, where, text, retried)
        if isinstance(exc, auth_exc.RefreshError):
            if getattr(exc, "retryable", False):
                return TransientError(f"{where}: could not refresh the GCS access token: {text}")
            return AccessDeniedError(
                f"{where}: {self._credentials_desc} were refused by Google: {text}",
                f"Check the key in {CREDENTIALS_ENV} (revoked or deleted key?) or the Workload "
                "Identity binding of the pod's service account",
            )
        if isinstance(exc, requests.exceptions.SSLError):
            return SourceError(
                f"{where}: TLS handshake with {self.endpoint} failed: {text}",
                "Add the CA that signed the endpoint's certificate to the global CA bundle "
                "(CA_BUNDLE_CONFIGMAP_NAME) or REQUESTS_CA_BUNDLE",
            )
        if is_connect_failure(exc):
            text = _connect_reason(exc)
            if listing:
                return SourceError(
                    f"{where}: cannot connect to the GCS endpoint {self.endpoint}: {text}",
                    f"Check {EMULATOR_ENV} or API_ENDPOINT_OVERRIDE if set, DNS, egress network "
                    "policies and proxies",
                )
            return TransientError(f"{where}: cannot connect to {self.endpoint}: {text}")
        if isinstance(exc, _RETRYABLE_ERRORS):
            return TransientError(f"{where}: connection to {self.endpoint} failed{retried}: {text}")
        return SourceError(f"{where}: GCS request failed: {type(exc).__name__}: {text}")

    def _map_api_error(
        self, exc: gexc.GoogleAPICallError, where: str, text: str, retried: str
    ) -> InitializerError:
        status = _status_of(exc)
        response = getattr(exc, "response", None)
        message = _error_message(getattr(response, "content", b"") or b"") or exc.message
        detail = f"HTTP {status}: {message}" if status else text
        detail = redact(detail)
        if status in _TRANSIENT_STATUS:
            headers = getattr(getattr(exc, "response", None), "headers", None)
            return TransientError(
                f"{where}: GCS is overloaded or failing{retried}: {detail}",
                retry_after=httpcommon.retry_after(headers),
            )
        if status in (401, 403):
            return self._denied(where, detail)
        if status == 404:
            return NotFoundError(f"{where}: bucket {self.bucket!r} does not exist: {detail}")
        if status == 400:
            return UsageError(f"{where}: GCS rejected the request: {detail}", "Check the URI")
        return SourceError(f"{where}: GCS error {detail}")

    def close(self) -> None:
        self.session.close()
