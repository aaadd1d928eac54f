"""User-facing errors.

Every failure that reaches the user is one of these. The message is written for a platform
engineer reading the last line of an init container's log: it names what failed and, through
``hint``, what to do. Messages must already be redacted when the exception is built (providers
pass URIs through :func:`storage_initializer.redact.redact`); the logging layer redacts once more
as a safety net.
"""

from __future__ import annotations


class InitializerError(Exception):
    """Base of every error we report; carries a remedy for the user."""

    hint: str = ""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    def describe(self) -> str:
        message = str(self)
        return f"{message}. {self.hint}" if self.hint else message


class UsageError(InitializerError):
    """The request itself is wrong: unknown scheme, malformed URI, bad option value."""


class SourceError(InitializerError):
    """The source answered, and the answer means retrying will not help."""


class NotFoundError(SourceError):
    hint = (
        "Check that the URI is spelled correctly and that the object, bucket or repository exists"
    )


class AccessDeniedError(SourceError):
    hint = "Check the credentials given to the pod (secret, service account) and their permissions"


class TransientError(InitializerError):
    """A failure worth retrying: 5xx, 429, reset, timeout, truncated body."""

    def __init__(self, message: str, hint: str | None = None, retry_after: float | None = None):
        super().__init__(message, hint)
        self.retry_after = retry_after


class IntegrityError(InitializerError):
    """What arrived is not what the source announced (size or checksum)."""

    hint = "The transfer was retried and still did not match; check the source object or proxy"


class SourceChangedError(InitializerError):
    """The file changed at the source between the listing and a read (HTTP 412 to a pinned
    request, another ETag, generation or Last-Modified in the answer). Retrying the same range
    cannot help and mixing would stitch two versions: the file's staged bytes are discarded and
    the pull lists the source again (a bounded number of times)."""

    hint = (
        "The model was being replaced while it downloaded; wait until the upload is finished, "
        "or point the URI at an immutable version"
    )

    #: The changed file's path in the model, set by the engine (None: not known).
    path: str | None = None


class RangesIgnoredError(SourceChangedError):
    """A server that advertised byte ranges answered a ranged read with the whole file (200).
    Handled like a change, except that it is not one: the file's staged bytes are discarded
    and it is fetched again in one stream (the source no longer offers ranges)."""

    hint = "The server or a proxy in front of it ignores Range requests"


class DestinationError(InitializerError):
    """The destination cannot hold the model: not writable, full, or holds something else."""


class LeaseLostError(InitializerError):
    """Another owner took over our lease; we must stop without committing."""

    hint = "This replica was too slow to renew its lease; another replica continues the download"


class LockTimeoutError(InitializerError):
    hint = (
        "Raise --lock-timeout, or check the replica that holds the download with "
        "`storage-initializer status`"
    )
