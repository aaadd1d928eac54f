"""The S3 provider: ``s3://bucket/key`` on AWS or any S3-compatible server (MinIO, Ceph, ...).

Configuration comes from the environment exactly as KServe's stock initializer reads it (its
``get_S3_config``/``_get_s3_client_kwargs``), so an existing ``s3-secret``/service account works
unchanged: credentials through boto3's own chain (keys, session token, IRSA web identity, instance
profile), ``AWS_ENDPOINT_URL``, region, CA bundle, ``S3_VERIFY_SSL``, anonymous access,
virtual-host addressing, transfer acceleration, timeouts and retry attempts.

Layout: a key naming one object exactly is that object, saved under its basename; any other key
is a *directory* ``key/`` (so ``s3://b/model`` never pulls ``model-v2/...``, which the stock
initializer does). Zero-byte objects are kept, ``.../`` directory markers are skipped.

Checksums: the ETag is the MD5 of a single-part object that is not SSE-KMS/SSE-C encrypted, so a
plain 32-hex ETag is announced as ``md5``. S3's additional checksums (CRC32, CRC32C, SHA256, ...)
are not in ListObjectsV2's answer (only the algorithm name is), so we fetch them with a HEAD only
for objects that would otherwise go unverified (multipart uploads), never one HEAD per object for
a whole tree. One HEAD of a sample object tells whether the bucket encrypts with KMS, where the
ETag is not an MD5. See docs/providers/s3.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

from storage_initializer.errors import (
    AccessDeniedError,
    SourceChangedError,
    TransientError,
    UsageError,
)
from storage_initializer.providers import aws_credentials, s3_lean
from storage_initializer.providers.base import RemoteFile, Source
from storage_initializer.providers.block_window import take_window
from storage_initializer.providers.s3_config import (  # noqa: F401  (tests use these names)
    _is_true,
    client_kwargs,
    s3_config,
    verify_setting,
)
from storage_initializer.providers.s3_errors import _STREAM_ERRORS, S3ErrorMapping
from storage_initializer.providers.s3_listing import (  # noqa: F401  (tests and bench use these)
    CHEAP_CHECKSUM_MIN_SIZE,
    TRUST_ETAG_ENV,
    S3Listing,
    _additional_checksums,
    _etag_md5,
    _verifiable,
    key_names_object,
)
from storage_initializer.redact import redact, register_secret

if TYPE_CHECKING:
    from storage_initializer.settings import Settings
    from storage_initializer.uri import SourceUri

log = logging.getLogger(__name__)

#: Size of the blocks :meth:`S3Source.read` yields: bounded memory whatever the range.
BLOCK = 1 << 20


def split_s3_uri(raw: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key). The key is taken literally (no unquoting), as S3
    keys may hold ``%``, ``?`` or ``#``."""
    rest = raw.strip()[len("s3://") :]
    bucket, _, key = rest.partition("/")
    return bucket, key


class S3Source(S3Listing, S3ErrorMapping, Source):
    """Objects of one S3 bucket under one key or prefix: the client and reads here, the listing
    in :class:`~.s3_listing.S3Listing`, the error mapping in :class:`~.s3_errors.S3ErrorMapping`."""

    default_workers = 16
    supports_ranges: ClassVar[bool] = True

    def __init__(self, uri: SourceUri, settings: Settings) -> None:
        super().__init__(uri, settings)
        for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
            register_secret(os.environ.get(name))
        self.bucket, self.key = split_s3_uri(uri.raw)
        if not self.bucket:
            raise UsageError(f"{uri.redacted} names no bucket", "Write it as s3://bucket/path")
        self._endpoint = os.environ.get("AWS_ENDPOINT_URL", "").strip()
        workers = self.workers()
        kwargs = client_kwargs(max_pool_connections=max(10, workers + 4))
        try:
            # One client for all threads: botocore clients are thread-safe, sessions are not.
            session = aws_credentials.s3_session(kwargs.get("region_name"))
            aws_credentials.fast_timestamps(session)
            self.client = session.client("s3", **kwargs)
        except ValueError as exc:  # malformed AWS_ENDPOINT_URL
            raise UsageError(
                f"{uri.redacted}: cannot use AWS_ENDPOINT_URL={self._endpoint!r}: "
                f"{redact(str(exc))}",
                "Set AWS_ENDPOINT_URL to a URL such as https://minio.example:9000",
            ) from exc
        self._endpoint = self._endpoint or self.client.meta.endpoint_url
        self._resolve_credentials(session, uri)
        #: The directory prefix of the last listing; None when the key named one object.
        self._prefix: str | None = None if key_names_object(self.key) else self.key
        #: Ranged GETs without boto3's per-request machinery (s3_lean); None: through boto3.
        self._lean: s3_lean.LeanGetter | None = None
        if s3_lean.wanted() and not s3_lean.proxied(self._endpoint):
            config = self.client.meta.config
            self._lean = s3_lean.LeanGetter(
                self.client,
                self.bucket,
                kwargs["verify"],
                (config.connect_timeout, config.read_timeout),
                lambda exc, where: self._map_error(exc, where, listing=False),
            )

    def _resolve_credentials(self, session: Any, uri: SourceUri) -> None:
        """Fetch credentials now, so that a failure (an STS error, an unreadable token file) is
        reported as what it is, naming the credential source that was tried, and not as an
        error of the first S3 request. No credentials at all is left to the first request."""
        if _is_true("awsAnonymousCredential"):
            return
        try:
            credentials = session.get_credentials()
            if credentials is not None:
                credentials.get_frozen_credentials()
        except Exception as exc:  # any failure of any provider: one explanatory line
            raise AccessDeniedError(
                f"{uri.redacted}: could not obtain AWS credentials from "
                f"{aws_credentials.credential_source()}: {type(exc).__name__}: "
                f"{redact(str(exc))}",
                "Check the service account's IAM role and token (AWS_ROLE_ARN, "
                "AWS_WEB_IDENTITY_TOKEN_FILE) and that STS is reachable (AWS_ENDPOINT_URL_STS; "
                "AWS_ENDPOINT_URL is the S3 endpoint only), or the s3 secret's keys",
            ) from None

    # ------------------------------------------------------------------ reading

    def read(self, file: RemoteFile, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        if end is not None and start >= end:
            return
        key, version_id = file.handle if file.handle else (self._key_of(file), None)
        if self._lean is not None:
            whole = start == 0 and (end is None or (file.size is not None and end >= file.size))
            etag, _, listed_version = file.version.partition("@")
            version_id = version_id or listed_version or None  # a file rebuilt from a marker
            where = f"{self.uri.redacted} ({file.path})"
            block = self.settings.read_size
            yield from self._lean.read(
                key, version_id, etag or None, start, end, whole, block, where
            )
            return
        request: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if version_id:
            request["VersionId"] = version_id
        # Pinned to the listed version: a 412 (SourceChangedError) instead of another version's
        # bytes in the middle of this file's (an overwrite during a rollout).
        etag = file.version.partition("@")[0]
        if etag:
            request["IfMatch"] = f'"{etag}"'
        whole = start == 0 and (end is None or (file.size is not None and end >= file.size))
        if not whole:
            request["Range"] = f"bytes={start}-" + ("" if end is None else str(end - 1))
        where = f"{self.uri.redacted} ({file.path})"
        try:
            answer = self.client.get_object(**request)
        except Exception as exc:
            raise self._map_error(exc, where, listing=False) from exc
        body = answer["Body"]
        got = str(answer.get("ETag", "")).strip('"')
        if etag and got and got != etag:  # a server that ignores If-Match
            body.close()
            raise SourceChangedError(
                f"{where}: the object changed since it was listed (ETag {etag}, now {got})"
            )
        # A server that ignores Range answers 200 with the whole object: cut our part out.
        skip = start if (not whole and not answer.get("ContentRange")) else 0
        remaining = None if end is None else end - start
        try:
            yield from take_window(self._body_blocks(body, where), skip, remaining)
        finally:
            body.close()

    def _body_blocks(self, body: Any, where: str) -> Iterator[bytes]:
        """The blocks of a GET's streamed body; a broken connection is a TransientError."""
        while True:
            try:
                block = body.read(BLOCK)
            except _STREAM_ERRORS as exc:
                raise TransientError(
                    f"{where}: the transfer broke off: {redact(str(exc))}"
                ) from exc
            if not block:
                return
            yield block

    def _key_of(self, file: RemoteFile) -> str:
        """The object key of a file that carries no handle (rebuilt from a marker)."""
        if self._prefix is None:
            return self.key
        return self._prefix + file.path

    def close(self) -> None:
        with contextlib.suppress(AttributeError):  # botocore < 1.26 has no close()
            self.client.close()
