"""Azure Blob Storage: ``https://<acct>.blob.core.windows.net/<container>/<prefix>[?sas]``.

Layout (the stock initializer's, with kserve#3776 fixed): a prefix that is the name of one blob
downloads that blob under its basename; otherwise the prefix is a directory and only blobs below
``<prefix>/`` are taken, keeping their paths relative to it (``model`` never pulls
``model-v2/…``). An empty prefix takes the whole container. Zero-byte blobs are files too (the
stock initializer drops them), but directory placeholders are skipped: names ending in "/" and
the ``hdi_isfolder`` entries of accounts with a hierarchical namespace (ADLS Gen2).

``AZURE_STORAGE_BLOB_ENDPOINT`` replaces the endpoint (Azurite, a private endpoint, a proxy)
while the account, container and prefix still come from the URI.
"""

from __future__ import annotations

import builtins
import logging
import posixpath
from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar

from storage_initializer.errors import InitializerError, NotFoundError, SourceError
from storage_initializer.providers import azure_lean
from storage_initializer.providers.azure_common import (
    check_layout,
    client_options,
    client_refused,
    md5_hex,
    parse_location,
    safe_relative_path,
    select_credential,
    translate,
)
from storage_initializer.providers.base import Listing, RemoteFile, Source, fingerprint_of
from storage_initializer.redact import redact

if TYPE_CHECKING:
    from azure.storage.blob import BlobClient, BlobProperties

    from storage_initializer.settings import Settings
    from storage_initializer.uri import SourceUri

log = logging.getLogger(__name__)

ENDPOINT_ENV = "AZURE_STORAGE_BLOB_ENDPOINT"


def _is_folder_marker(blob: BlobProperties) -> bool:
    """Whether a listed blob only stands for a directory (ADLS Gen2, or tools that write "a/")."""
    metadata = getattr(blob, "metadata", None) or {}
    if str(metadata.get("hdi_isfolder", "")).lower() == "true":
        return True
    return blob.name.endswith("/") and not blob.size


class AzureBlobSource(Source):
    """Blobs of one container below one prefix, read with ranged GETs."""

    #: Blob storage serves many parallel range reads well; per-request latency dominates.
    default_workers: ClassVar[int] = 16

    def __init__(self, uri: SourceUri, settings: Settings) -> None:
        super().__init__(uri, settings)
        from azure.storage.blob import ContainerClient, ExponentialRetry  # the SDK: on use

        self.location = parse_location(uri, ENDPOINT_ENV, "container")
        credential, mode = select_credential(self.location)
        self.credential_mode = mode
        log.info(
            "Azure Blob: account %s, container %s, prefix %r, endpoint %s, credentials: %s",
            self.location.account,
            self.location.container,
            self.location.prefix,
            redact(self.location.endpoint),
            mode,
        )
        # One client for all threads: SDK clients are thread-safe and share a connection pool.
        try:
            self._client = ContainerClient(
                account_url=self.location.endpoint,
                container_name=self.location.container,
                credential=credential,
                **client_options(ExponentialRetry),
            )
        except ValueError as exc:  # the SDK validates endpoint and credential together
            raise client_refused(exc, uri.redacted, self.location, mode) from None
        #: GETs without the SDK's pipeline (azure_lean); None: through the SDK.
        self._lean = azure_lean.reader(self._client, credential, self.location, self._map)

    def _map(self, exc: BaseException, what: str) -> InitializerError:
        return translate(exc, what, self.location, reading=True, credentials=self.credential_mode)

    def _where(self) -> str:
        return self.uri.redacted

    def list(self) -> Listing:
        try:
            files = self._list()
        except Exception as exc:  # SDK errors, and SDK bugs while raising them
            raise translate(
                exc, self._where(), self.location, reading=False, credentials=self.credential_mode
            ) from None
        if not files:
            location = self.location
            below = f"below {location.prefix!r} " if location.prefix else ""
            raise NotFoundError(
                redact(
                    f"{self._where()}: no blobs {below}in container {location.container!r} "
                    f"of account {location.account!r}"
                ),
                "Check the path after the container name; a directory prefix must hold at least "
                "one blob below '<prefix>/'",
            )
        check_layout((item.path for item in files), self._where())
        return Listing(files=files, fingerprint=fingerprint_of(files))

    def _list(self) -> builtins.list[RemoteFile]:  # ``list`` is a method here
        from azure.core.exceptions import ResourceNotFoundError  # the SDK: on use

        prefix = self.location.prefix
        if prefix and not self.location.directory_only:
            # One HEAD tells a single blob from a directory without listing siblings such as
            # "model-v2/…", and works where only read (not list) is allowed.
            try:
                properties = self._client.get_blob_client(prefix).get_blob_properties()
            except ResourceNotFoundError:
                properties = None
            if properties is not None and not _is_folder_marker(properties):
                properties.name = prefix
                return [self._remote(properties, posixpath.basename(prefix))]
        directory = f"{prefix}/" if prefix else ""
        files = []
        for blob in self._client.list_blobs(
            name_starts_with=directory or None, include=["metadata"]
        ):
            if _is_folder_marker(blob):
                continue
            path = safe_relative_path(blob.name[len(directory) :], "blob")
            files.append(self._remote(blob, path))
        return files

    def _remote(self, blob: BlobProperties, path: str) -> RemoteFile:
        tier = str(getattr(blob, "blob_tier", "") or "")
        if tier.lower() == "archive":
            raise SourceError(
                redact(f"{self._where()}: blob {blob.name!r} is in the Archive tier"),
                "Rehydrate it to the Hot or Cool tier first; archived blobs cannot be read",
            )
        md5 = md5_hex(getattr(blob.content_settings, "content_md5", None))
        return RemoteFile(
            path=path,
            size=int(blob.size or 0),
            checksums={"md5": md5} if md5 else {},
            # Listings give 0x…, HEAD gives "0x…": one form, or the fingerprint would flap.
            version=str(blob.etag or "").strip('"'),
            handle=blob.name,
        )

    def read(self, file: RemoteFile, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        if (end is not None and end <= start) or file.size == 0:
            return
        what = f"{self._where()} (blob {file.handle!r})"
        if self._lean is not None:
            whole = start == 0 and (end is None or (file.size is not None and end >= file.size))
            block = self.settings.write_size
            where = redact(what)
            yield from self._lean.read(file.handle, file.version, start, end, whole, block, where)
            return
        # Every range from the same blob version, or a clear error (412) instead of mixed bytes.
        headers = {"If-Match": f'"{file.version}"'} if file.version else {}
        blob = self._client.get_blob_client(file.handle)
        operations = getattr(getattr(blob, "_client", None), "blob", None)
        try:
            if operations is None or not hasattr(operations, "download"):
                yield from self._read_in_pieces(blob, start, end, headers)
                return
            # One GET for the whole range, streamed block by block (see _read_in_pieces).
            stream = operations.download(
                range=f"bytes={start}-" + ("" if end is None else str(end - 1)),
                headers=headers,
                decompress=False,  # bytes as stored, so sizes and Content-MD5 match
                retry_total=0,  # the engine retries (and resumes) ranges itself
            )
            yield from stream
        except Exception as exc:  # SDK errors, and SDK bugs while raising them
            raise translate(
                exc, redact(what), self.location, reading=True, credentials=self.credential_mode
            ) from None

    @staticmethod
    def _read_in_pieces(
        blob: BlobClient, start: int, end: int | None, headers: dict[str, str]
    ) -> Iterator[bytes]:
        """The SDK's public download: one request per ``GET_PIECE``, each held whole in memory.

        Used only if the SDK's operation layer moves: ``download_blob`` cuts a range into
        separate requests of 4 MiB pieces and joins each piece in memory before handing it
        out, which costs about three times the CPU of one streamed request per range and,
        with many workers, several hundred MiB of buffers.
        """
        downloader = blob.download_blob(
            offset=start,
            length=None if end is None else end - start,
            max_concurrency=1,  # the engine runs ranges in parallel; one stream per range
            decompress=False,
            retry_total=0,
            headers=headers,
        )
        yield from downloader.chunks()

    def close(self) -> None:
        if self._lean is not None:
            self._lean.close()
        self._client.close()
