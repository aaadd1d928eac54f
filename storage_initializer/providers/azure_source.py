"""The skeleton Azure Blob and Azure Files sources share: one SDK client built from the URI, the
credentials and our HTTP pipeline; a listing that first asks whether the path names one object
(one HEAD) and else lists below it; one translation of SDK errors; one "nothing there" message.

Its own module so that :mod:`azure_blob` and :mod:`azure_file` keep only what differs: the SDK
client type, how a directory is listed, how a single object is recognised and how bytes are read.
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

from storage_initializer.errors import InitializerError, NotFoundError
from storage_initializer.providers import azure_lean
from storage_initializer.providers.azure_common import (
    check_layout,
    client_refused,
    md5_hex,
    parse_location,
    select_credential,
    translate,
)
from storage_initializer.providers.base import Listing, RemoteFile, Source, fingerprint_of
from storage_initializer.providers.page_trail import PageTrail
from storage_initializer.redact import redact

if TYPE_CHECKING:
    from storage_initializer.settings import Settings
    from storage_initializer.uri import SourceUri

log = logging.getLogger(__name__)


class AzureSource(Source):
    """Objects of one container (or share) below one prefix (or path), read with ranged GETs.

    A subclass names its service and words in the class attributes and gives
    :meth:`_make_client`, :meth:`_single` and :meth:`_list_directory`.
    """

    #: Azure storage serves many parallel range reads well; per-request latency dominates.
    default_workers = 16
    #: Where an endpoint override is read from (Azurite, a private endpoint, a proxy).
    endpoint_env: ClassVar[str]
    #: Named in the log line: "Azure Blob", "Azure Files".
    service: ClassVar[str]
    #: What the URI's first path segment is ("container", "share") and what follows it
    #: ("prefix", "path"); what the listing holds ("blobs", "files").
    container_word: ClassVar[str]
    prefix_word: ClassVar[str]
    items_word: ClassVar[str]
    #: The hint of an empty listing.
    empty_hint: ClassVar[str]

    def __init__(self, uri: SourceUri, settings: Settings) -> None:
        super().__init__(uri, settings)
        self.location = parse_location(uri, self.endpoint_env, self.container_word)
        credential, mode = select_credential(self.location)
        self.credential_mode = mode
        self._check_credential(credential)
        log.info(
            "%s: account %s, %s %s, %s %r, endpoint %s, credentials: %s",
            self.service,
            self.location.account,
            self.container_word,
            self.location.container,
            self.prefix_word,
            self.location.prefix,
            redact(self.location.endpoint),
            mode,
        )
        # One client for all threads: SDK clients are thread-safe and share a connection pool.
        try:
            self._client = self._make_client(credential)
        except ValueError as exc:  # the SDK validates endpoint and credential together
            raise client_refused(exc, uri.redacted, self.location, mode) from None
        #: GETs without the SDK's pipeline (azure_lean); None: through the SDK.
        self._lean = azure_lean.reader(self._client, credential, self.location, self._map)

    def _map(self, exc: BaseException, what: str) -> InitializerError:
        """A read's error as the user sees it (the lean path and the SDK path alike)."""
        return translate(exc, what, self.location, reading=True, credentials=self.credential_mode)

    def _lean_read(
        self, file: RemoteFile, start: int, end: int | None, what: str, version: str
    ) -> Iterator[bytes]:
        assert self._lean is not None
        whole = start == 0 and (end is None or (file.size is not None and end >= file.size))
        block = self.settings.read_size
        yield from self._lean.read(file.handle, version, start, end, whole, block, what)

    def _check_credential(self, credential: Any) -> None:
        """Refuse a credential the service cannot use, before the SDK does it less clearly."""

    def _make_client(self, credential: Any) -> Any:
        """The SDK client of the container or share (the SDK is imported here, on use)."""
        raise NotImplementedError

    def _single(self, name: str) -> RemoteFile | None:
        """The object ``name`` if it is one file (downloaded under its base name), else None;
        the SDK's ResourceNotFoundError when nothing has that name."""
        raise NotImplementedError

    def _list_directory(self, prefix: str) -> builtins.list[RemoteFile]:
        """Every file below the directory ``prefix`` ("" for the root), paths relative to it."""
        raise NotImplementedError

    def _where(self) -> str:
        return self.uri.redacted

    @property
    def _answerer_hint(self) -> str:
        """The hint of a listing no sane service sends: who to look at."""
        return (
            f"Check what answers for {self.service} ({self.endpoint_env} if set, a proxy in "
            "between)"
        )

    def _page_trail(self, what: str) -> PageTrail:
        """The guard of one paginated listing (of the container, or of one directory)."""
        return PageTrail(
            f"{self._where()}: listing {what}", f"{self._answerer_hint}: its pagination is broken"
        )

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
                    f"{self._where()}: no {self.items_word} {below}in {self.container_word} "
                    f"{location.container!r} of account {location.account!r}"
                ),
                self.empty_hint,
            )
        check_layout((item.path for item in files), self._where())
        return Listing(files=files, fingerprint=fingerprint_of(files))

    def _list(self) -> builtins.list[RemoteFile]:  # ``list`` is a method here
        from azure.core.exceptions import ResourceNotFoundError  # the SDK: on use

        prefix = self.location.prefix
        if prefix and not self.location.directory_only:
            # One HEAD tells a single object from a directory without listing siblings such as
            # "model-v2/…", and works where only read (not list) is allowed.
            try:
                single = self._single(prefix)
            except ResourceNotFoundError:
                single = None
            if single is not None:
                return [single]
        return self._list_directory(prefix)

    def close(self) -> None:
        if self._lean is not None:
            self._lean.close()
        self._client.close()


def next_marker(pages: Iterator[Any]) -> str | None:
    """The marker of the page an SDK listing (``ItemPaged.by_page()``) asks for next. The SDK
    types ``by_page()`` as a plain iterator; what it returns, azure-core's ``PageIterator``,
    keeps the marker in ``continuation_token``."""
    return getattr(pages, "continuation_token", None)


def remote_file(properties: Any, path: str, handle: str) -> RemoteFile:
    """The listing entry of a blob's or file's properties (as listed or as a HEAD gives them)."""
    md5 = md5_hex(getattr(properties.content_settings, "content_md5", None))
    return RemoteFile(
        path=path,
        size=int(properties.size or 0),
        checksums={"md5": md5} if md5 else {},
        # Listings give 0x…, HEAD gives "0x…": one form, or the fingerprint would flap.
        version=str(properties.etag or "").strip('"'),
        handle=handle,
    )
