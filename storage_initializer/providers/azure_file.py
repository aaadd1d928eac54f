"""Azure Files: ``https://<acct>.file.core.windows.net/<share>/<path>[?sas]``.

Same layout rules as blobs: a path naming a file downloads that file under its basename; a path
naming a directory downloads everything below it (any depth), paths relative to it; no path takes
the whole share. The listing API gives names and sizes only, so each file's properties are read
(one HEAD per file, a few at a time) for its Content-MD5 and ETag.

Credentials: SAS in the URI, then ``AZURE_CLIENT_ID`` & co. through DefaultAzureCredential (with
the "backup" token intent Azure Files requires for OAuth), then ``AZURE_STORAGE_ACCESS_KEY``.
Azure Files has no anonymous access; without credentials we fail at once saying what to set.
``AZURE_STORAGE_FILE_ENDPOINT`` replaces the endpoint while account, share and path still come
from the URI.
"""

from __future__ import annotations

import builtins
import posixpath
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from storage_initializer.errors import AccessDeniedError, SourceError
from storage_initializer.paths import is_plain_name
from storage_initializer.providers.azure_common import client_options, safe_relative_path, translate
from storage_initializer.providers.azure_source import AzureSource, next_marker, remote_file
from storage_initializer.providers.base import RemoteFile
from storage_initializer.redact import redact

if TYPE_CHECKING:
    from azure.storage.fileshare import ShareClient

#: Parallel property reads while listing (one HEAD per file).
PROPERTY_WORKERS = 8


class AzureFileSource(AzureSource):
    """Files of one share below one directory (or one file), read with ranged GETs."""

    endpoint_env = "AZURE_STORAGE_FILE_ENDPOINT"
    service = "Azure Files"
    container_word = "share"
    prefix_word = "path"
    items_word = "files"
    empty_hint = "Check the path after the share name; the directory holds no files"
    _client: ShareClient

    def _check_credential(self, credential: Any) -> None:
        if credential is None:
            # The SDK refuses to build an unauthenticated client: say what to set instead.
            raise AccessDeniedError(
                f"{self.uri.redacted}: Azure file shares cannot be read anonymously, and no "
                "credentials were found",
                "Add a SAS token to the URI, or set AZURE_STORAGE_ACCESS_KEY, or AZURE_CLIENT_ID "
                "(with AZURE_TENANT_ID and AZURE_CLIENT_SECRET or workload identity)",
            )

    def _make_client(self, credential: Any) -> ShareClient:
        from azure.storage.fileshare import ExponentialRetry, ShareClient  # the SDK: on use

        extra: dict[str, Any] = {}
        if hasattr(credential, "get_token"):
            extra["token_intent"] = "backup"  # required by Azure Files for OAuth tokens
        return ShareClient(
            account_url=self.location.endpoint,
            share_name=self.location.container,
            credential=credential,
            **extra,
            **client_options(ExponentialRetry),
        )

    def _single(self, name: str) -> RemoteFile | None:
        properties = self._client.get_file_client(name).get_file_properties()
        return remote_file(properties, posixpath.basename(name), name)

    def _list_directory(self, prefix: str) -> builtins.list[RemoteFile]:
        names: list[str] = []  # paths from the share root
        stack = [prefix]
        while stack:
            directory = stack.pop()
            client = self._client.get_directory_client(directory)
            pages = client.list_directories_and_files().by_page()
            trail = self._page_trail(f"directory {directory or '/'!r}")
            for page in pages:
                for item in page:
                    full = self._entry_path(directory, str(item.name or ""))
                    (stack if item.is_directory else names).append(full)
                trail.follow(next_marker(pages))
        below = f"{prefix}/" if prefix else ""
        paths = [safe_relative_path(name[len(below) :], "file") for name in names]
        with ThreadPoolExecutor(PROPERTY_WORKERS, thread_name_prefix="azure-file-head") as pool:
            found = list(
                pool.map(lambda n: self._client.get_file_client(n).get_file_properties(), names)
            )
        return [
            remote_file(props, path, name)
            for props, name, path in zip(found, names, paths, strict=True)
        ]

    def _entry_path(self, directory: str, name: str) -> str:
        """The share path of an entry a directory listing named. A name that is not one plain
        segment ("", ".", "..", "a/b") is refused: walked, "." or ".." would list a directory
        again, for ever, and no share holds such a name."""
        if not is_plain_name(name):
            raise SourceError(
                redact(
                    f"{self._where()}: directory {directory or '/'!r} lists an entry named "
                    f"{name!r}, which no share can hold"
                ),
                self._answerer_hint,
            )
        return f"{directory}/{name}" if directory else name

    def read(self, file: RemoteFile, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        if (end is not None and end <= start) or file.size == 0:
            return
        length = None if end is None else end - start
        what = redact(f"{self.uri.redacted} (file {file.handle!r})")
        if self._lean is not None:  # unpinned: the service has no conditional reads
            yield from self._lean_read(file, start, end, what, "")
            return
        try:
            downloader = self._client.get_file_client(file.handle).download_file(
                offset=start,
                length=length,
                max_concurrency=1,  # the engine runs ranges in parallel
                retry_total=0,  # the engine retries (and resumes) ranges itself
            )
            yield from downloader.chunks()
        except Exception as exc:  # SDK errors, and SDK bugs while raising them
            raise translate(
                exc, what, self.location, reading=True, credentials=self.credential_mode
            ) from None
