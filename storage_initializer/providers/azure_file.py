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
import logging
import posixpath
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, ClassVar

from storage_initializer.errors import AccessDeniedError, InitializerError, NotFoundError
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
    from azure.storage.fileshare import FileProperties

    from storage_initializer.settings import Settings
    from storage_initializer.uri import SourceUri

log = logging.getLogger(__name__)

ENDPOINT_ENV = "AZURE_STORAGE_FILE_ENDPOINT"
#: Parallel property reads while listing (one HEAD per file).
PROPERTY_WORKERS = 8


class AzureFileSource(Source):
    """Files of one share below one directory (or one file), read with ranged GETs."""

    default_workers: ClassVar[int] = 16

    def __init__(self, uri: SourceUri, settings: Settings) -> None:
        super().__init__(uri, settings)
        from azure.storage.fileshare import ExponentialRetry, ShareClient  # the SDK: on use

        self.location = parse_location(uri, ENDPOINT_ENV, "share")
        credential, mode = select_credential(self.location)
        self.credential_mode = mode
        if credential is None:
            # The SDK refuses to build an unauthenticated client: say what to set instead.
            raise AccessDeniedError(
                f"{uri.redacted}: Azure file shares cannot be read anonymously, and no "
                "credentials were found",
                "Add a SAS token to the URI, or set AZURE_STORAGE_ACCESS_KEY, or AZURE_CLIENT_ID "
                "(with AZURE_TENANT_ID and AZURE_CLIENT_SECRET or workload identity)",
            )
        extra: dict[str, Any] = {}
        if hasattr(credential, "get_token"):
            extra["token_intent"] = "backup"  # required by Azure Files for OAuth tokens
        log.info(
            "Azure Files: account %s, share %s, path %r, endpoint %s, credentials: %s",
            self.location.account,
            self.location.container,
            self.location.prefix,
            redact(self.location.endpoint),
            mode,
        )
        try:
            self._share = ShareClient(
                account_url=self.location.endpoint,
                share_name=self.location.container,
                credential=credential,
                **extra,
                **client_options(ExponentialRetry),
            )
        except ValueError as exc:  # the SDK validates endpoint and credential together
            raise client_refused(exc, uri.redacted, self.location, mode) from None
        #: GETs without the SDK's pipeline (azure_lean); None: through the SDK.
        self._lean = azure_lean.reader(self._share, credential, self.location, self._map)

    def _map(self, exc: BaseException, what: str) -> InitializerError:
        return translate(exc, what, self.location, reading=True, credentials=self.credential_mode)

    def list(self) -> Listing:
        try:
            files = self._list()
        except Exception as exc:  # SDK errors, and SDK bugs while raising them
            raise translate(
                exc,
                self.uri.redacted,
                self.location,
                reading=False,
                credentials=self.credential_mode,
            ) from None
        if not files:
            location = self.location
            below = f"below {location.prefix!r} " if location.prefix else ""
            raise NotFoundError(
                redact(
                    f"{self.uri.redacted}: no files {below}in share {location.container!r} "
                    f"of account {location.account!r}"
                ),
                "Check the path after the share name; the directory holds no files",
            )
        check_layout((item.path for item in files), self.uri.redacted)
        return Listing(files=files, fingerprint=fingerprint_of(files))

    def _list(self) -> builtins.list[RemoteFile]:  # ``list`` is a method here
        from azure.core.exceptions import ResourceNotFoundError  # the SDK: on use

        prefix = self.location.prefix
        if prefix and not self.location.directory_only:
            try:
                properties = self._share.get_file_client(prefix).get_file_properties()
            except ResourceNotFoundError:
                properties = None
            if properties is not None:
                return [self._remote(properties, prefix, posixpath.basename(prefix))]
        names: list[str] = []  # paths from the share root
        stack = [prefix]
        while stack:
            directory = stack.pop()
            client = self._share.get_directory_client(directory)
            for item in client.list_directories_and_files():
                full = f"{directory}/{item.name}" if directory else item.name
                if item.is_directory:
                    stack.append(full)
                else:
                    names.append(full)
        below = f"{prefix}/" if prefix else ""
        paths = [safe_relative_path(name[len(below) :], "file") for name in names]
        with ThreadPoolExecutor(PROPERTY_WORKERS, thread_name_prefix="azure-file-head") as pool:
            found = list(
                pool.map(lambda n: self._share.get_file_client(n).get_file_properties(), names)
            )
        return [
            self._remote(props, name, path)
            for props, name, path in zip(found, names, paths, strict=True)
        ]

    @staticmethod
    def _remote(properties: FileProperties, name: str, path: str) -> RemoteFile:
        md5 = md5_hex(getattr(properties.content_settings, "content_md5", None))
        return RemoteFile(
            path=path,
            size=int(properties.size or 0),
            checksums={"md5": md5} if md5 else {},
            version=str(properties.etag or "").strip('"'),
            handle=name,
        )

    def read(self, file: RemoteFile, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        if (end is not None and end <= start) or file.size == 0:
            return
        length = None if end is None else end - start
        what = redact(f"{self.uri.redacted} (file {file.handle!r})")
        if self._lean is not None:
            whole = start == 0 and (end is None or (file.size is not None and end >= file.size))
            block = self.settings.write_size
            yield from self._lean.read(file.handle, "", start, end, whole, block, what)
            return
        try:
            downloader = self._share.get_file_client(file.handle).download_file(
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

    def close(self) -> None:
        if self._lean is not None:
            self._lean.close()
        self._share.close()
