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
with a ``Range`` header, pinned to the listed generation (so an object replaced mid-download
fails instead of mixing two versions): by default on the lean path (:mod:`gcs_lean`, blocks of
the write size), else through the client's authorised session (1 MiB blocks). The library's
own download path is not used: it validates whole-object checksums (wrong for ranges) and writes
to a file object rather than yielding blocks.
"""

from __future__ import annotations

import binascii
import builtins
import logging
import posixpath
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import quote

import requests
from google.api_core import exceptions as gexc
from google.api_core.retry import Retry
from google.auth import exceptions as auth_exc
from google.auth.credentials import AnonymousCredentials
from google.auth.transport.requests import AuthorizedSession
from google.cloud import storage

from storage_initializer import checksums, tls
from storage_initializer.blocks import BLOCK
from storage_initializer.errors import (
    NotFoundError,
    TransientError,
    UsageError,
)
from storage_initializer.paths import safe_relpath
from storage_initializer.providers import gcs_lean
from storage_initializer.providers.base import Listing, RemoteFile, Source, fingerprint_of
from storage_initializer.providers.block_window import take_window
from storage_initializer.providers.gcs_auth import (
    emulator_endpoint,
    load_credentials,
)
from storage_initializer.providers.gcs_errors import (
    _RETRYABLE_ERRORS,
    _STREAM_ERRORS,
    _TRANSIENT_STATUS,
    GcsErrorMapping,
    _status_of,
    is_connect_failure,
)
from storage_initializer.providers.http_adapter import StreamAdapter
from storage_initializer.providers.object_layout import claim_path, refuse_file_directory_clash
from storage_initializer.providers.page_trail import PageTrail
from storage_initializer.redact import redact

if TYPE_CHECKING:
    from storage_initializer.settings import Settings
    from storage_initializer.uri import SourceUri

log = logging.getLogger(__name__)

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


def split_gs_uri(raw: str) -> tuple[str, str]:
    """``gs://bucket/path`` -> (bucket, path), split as the stock initializer does. The path is
    taken literally: object names may hold ``%``, ``?`` or ``#``."""
    rest = raw.strip()[len("gs://") :]
    bucket, _, path = rest.partition("/")
    return bucket, path


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


def _b64_hex(value: str | None, length: int) -> str | None:
    """A base64 checksum from the API as hex, or None if it is not ``length`` bytes long."""
    if not value:
        return None
    try:
        raw = checksums.b64_to_hex(value)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == 2 * length else None


class GcsSource(GcsErrorMapping, Source):
    """Objects of one GCS bucket under one prefix, or one object: the client, listing and reads
    here, the error mapping in :class:`~.gcs_errors.GcsErrorMapping`."""

    default_workers = 16
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
        adapter = StreamAdapter(
            pool_connections=4, pool_maxsize=max(10, workers + 4), max_retries=0
        )
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
        #: Media GETs without requests' per-request machinery (gcs_lean); None: the session's.
        self._lean: gcs_lean.LeanGetter | None = None
        if gcs_lean.wanted() and not gcs_lean.proxied(self.endpoint):
            self._lean = gcs_lean.LeanGetter(
                credentials,
                self.endpoint,
                self.session.verify,
                (CONNECT_TIMEOUT, READ_TIMEOUT),
                self._status_answer,
                lambda exc, where: self._map_error(exc, where, listing=False),
            )

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

    def _list_prefix(self, prefix: str) -> builtins.list[storage.Blob]:
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
            trail = PageTrail(
                f"{self.uri.redacted}: listing {self._where(prefix)}",
                "Check what answers for GCS (STORAGE_EMULATOR_HOST, a proxy in between): its "
                "pagination is broken",
            )
            for page in pages.pages:
                for blob in page:
                    if blob.name.endswith("/"):
                        continue  # a console "folder": no content, the directory exists anyway
                    found.append(blob)
                trail.follow(pages.next_page_token)
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

    def _check_tree(self, files: builtins.list[RemoteFile]) -> None:
        """Two names for one path (``a//b``, ``a/b``) or a path that is both a file and a
        directory (``a``, ``a/b``) cannot be written as one tree: refuse, never mix."""
        seen: dict[str, str] = {}
        for item in files:
            claim_path(seen, item.path, item.handle[0], self.uri.redacted, "names")
        refuse_file_directory_clash(seen, self.uri.redacted)

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
        if self._lean is not None and not transcoded:
            block = self.settings.read_size
            url = self.media_url(name)
            yield from self._lean.read(url, generation, start, end, whole, block, where)
            return
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
            yield from take_window(self._blocks(response, where), skip, remaining)
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

    @property
    def list_retry_deadline(self) -> float:
        """Read at each use, so that tests can shorten :data:`LIST_RETRY_DEADLINE`."""
        return LIST_RETRY_DEADLINE

    def close(self) -> None:
        if self._lean is not None:
            self._lean.close()
        self.session.close()
