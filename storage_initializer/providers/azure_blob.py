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
import posixpath
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from storage_initializer.errors import SourceError
from storage_initializer.providers.azure_common import client_options, safe_relative_path, translate
from storage_initializer.providers.azure_source import AzureSource, next_marker, remote_file
from storage_initializer.providers.base import RemoteFile
from storage_initializer.redact import redact

if TYPE_CHECKING:
    from azure.storage.blob import BlobClient, BlobProperties, ContainerClient


def _is_folder_marker(blob: BlobProperties) -> bool:
    """Whether a listed blob only stands for a directory (ADLS Gen2, or tools that write "a/")."""
    metadata = getattr(blob, "metadata", None) or {}
    if str(metadata.get("hdi_isfolder", "")).lower() == "true":
        return True
    return blob.name.endswith("/") and not blob.size


class AzureBlobSource(AzureSource):
    """Blobs of one container below one prefix, read with ranged GETs."""

    endpoint_env = "AZURE_STORAGE_BLOB_ENDPOINT"
    service = "Azure Blob"
    container_word = "container"
    prefix_word = "prefix"
    items_word = "blobs"
    empty_hint = (
        "Check the path after the container name; a directory prefix must hold at least "
        "one blob below '<prefix>/'"
    )
    _client: ContainerClient

    def _make_client(self, credential: Any) -> ContainerClient:
        from azure.storage.blob import ContainerClient, ExponentialRetry  # the SDK: on use

        return ContainerClient(
            account_url=self.location.endpoint,
            container_name=self.location.container,
            credential=credential,
            **client_options(ExponentialRetry),
        )

    def _single(self, name: str) -> RemoteFile | None:
        properties = self._client.get_blob_client(name).get_blob_properties()
        if _is_folder_marker(properties):
            return None
        properties.name = name
        return self._remote(properties, posixpath.basename(name))

    def _list_directory(self, prefix: str) -> builtins.list[RemoteFile]:
        directory = f"{prefix}/" if prefix else ""
        files = []
        pages = self._client.list_blobs(
            name_starts_with=directory or None, include=["metadata"]
        ).by_page()
        trail = self._page_trail(f"the {self.container_word}")
        for page in pages:
            for blob in page:
                if _is_folder_marker(blob):
                    continue
                path = safe_relative_path(blob.name[len(directory) :], "blob")
                files.append(self._remote(blob, path))
            trail.follow(next_marker(pages))
        return files

    def _remote(self, blob: BlobProperties, path: str) -> RemoteFile:
        tier = str(getattr(blob, "blob_tier", "") or "")
        if tier.lower() == "archive":
            raise SourceError(
                redact(f"{self._where()}: blob {blob.name!r} is in the Archive tier"),
                "Rehydrate it to the Hot or Cool tier first; archived blobs cannot be read",
            )
        return remote_file(blob, path, blob.name)

    def read(self, file: RemoteFile, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        if (end is not None and end <= start) or file.size == 0:
            return
        what = f"{self._where()} (blob {file.handle!r})"
        if self._lean is not None:
            yield from self._lean_read(file, start, end, redact(what), file.version)
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
