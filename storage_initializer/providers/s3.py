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
import re
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPException
from typing import TYPE_CHECKING, Any, ClassVar

import botocore.exceptions as bce
from botocore import UNSIGNED
from botocore.config import Config

from storage_initializer import checksums, tls
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
from storage_initializer.providers import aws_credentials, s3_lean
from storage_initializer.providers.base import Listing, RemoteFile, Source, fingerprint_of
from storage_initializer.redact import redact, register_secret

if TYPE_CHECKING:
    from storage_initializer.settings import Settings
    from storage_initializer.uri import SourceUri

log = logging.getLogger(__name__)

#: Size of the blocks :meth:`S3Source.read` yields: bounded memory whatever the range.
BLOCK = 1 << 20
#: The endpoint for which the stock initializer forces virtual addressing outside us-east-1.
LEGACY_ENDPOINT = "https://s3.amazonaws.com"
#: At most this many HEADs to fetch additional checksums of objects without an MD5 ETag.
MAX_CHECKSUM_HEADS = 1000
#: Objects at least this large get a HEAD for a cheaper full-object checksum (CRC) than MD5.
CHEAP_CHECKSUM_MIN_SIZE = 64 * 1024 * 1024
#: Escape hatch for S3-compatible servers whose single-part ETag is not the content's MD5.
TRUST_ETAG_ENV = "STORAGE_INITIALIZER_S3_ETAG_MD5"

_MD5_ETAG = re.compile(r"^[0-9a-fA-F]{32}$")
#: S3's checksum algorithm names -> ours, and the HEAD/GET response field holding each value.
_ADDITIONAL = {
    "CRC32": ("crc32", "ChecksumCRC32"),
    "CRC32C": ("crc32c", "ChecksumCRC32C"),
    "CRC64NVME": ("crc64nvme", "ChecksumCRC64NVME"),
    "SHA256": ("sha256", "ChecksumSHA256"),
    "SHA1": ("sha1", "ChecksumSHA1"),
}
_DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "AccountProblem",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "InvalidSecurity",
        "Forbidden",
        "403",
        "401",
        "Unauthorized",
    }
)
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "TooManyRequests",
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "PriorRequestNotComplete",
        "429",
    }
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchVersion", "NotFound", "404"})
_DENIED_HINTS = {
    "InvalidAccessKeyId": "The endpoint does not know AWS_ACCESS_KEY_ID; check the secret's "
    "access key and that AWS_ENDPOINT_URL points at the right server",
    "SignatureDoesNotMatch": "AWS_SECRET_ACCESS_KEY does not match AWS_ACCESS_KEY_ID; check the "
    "secret (a trailing newline is a common cause)",
    "ExpiredToken": "The session token (AWS_SESSION_TOKEN or the IRSA token) has expired; "
    "refresh the credentials",
}
#: Errors while a body streams: the connection broke or stalled, the read can be retried.
_STREAM_ERRORS: tuple[type[BaseException], ...] = (
    bce.ReadTimeoutError,
    bce.ResponseStreamingError,
    bce.IncompleteReadError,
    bce.ConnectionClosedError,
    bce.HTTPClientError,
    HTTPException,
    ConnectionError,
    TimeoutError,
)


def _is_true(name: str) -> bool:
    """The stock initializer's test for its boolean flags: exactly ``true``, any case."""
    return os.environ.get(name, "false").strip().lower() == "true"


def _number(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(
            f"{name}={raw!r} is not a number", f"Set {name} to e.g. {default:g}"
        ) from None
    if value <= 0:
        raise UsageError(f"{name}={raw!r} must be positive", f"Set {name} to e.g. {default:g}")
    return value


def region_from_env() -> str | None:
    """``AWS_DEFAULT_REGION`` (what KServe's s3 secret sets), else ``AWS_REGION`` (what IRSA and
    most SDKs set); None lets boto3 consult its config file."""
    return os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or None


def s3_config(max_pool_connections: int = 10) -> Config:
    """The botocore ``Config`` the stock initializer builds, plus a pool sized for our workers.

    Response checksum validation is left to us (``when_required``): we verify whole files
    ourselves, and botocore would otherwise hash every block a second time, and reject ranged
    answers of servers that send the full object's checksum with a part of it.
    """
    connect_timeout = _number("S3_CONNECT_TIMEOUT", 15)
    read_timeout = _number("S3_READ_TIMEOUT", 30)
    max_attempts = int(_number("S3_MAX_ATTEMPTS", 3))
    config = Config(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"max_attempts": max_attempts, "mode": "standard"},
        max_pool_connections=max_pool_connections,
    )
    # botocore < 1.36 has no such option and never validates response checksums unasked.
    with contextlib.suppress(TypeError):
        config = config.merge(Config(response_checksum_validation="when_required"))
    if _is_true("awsAnonymousCredential"):
        config = config.merge(Config(signature_version=UNSIGNED))
    else:  # what botocore signs requests with anyway; presigned URLs (s3_lean) too
        config = config.merge(Config(signature_version="s3v4"))
    # One ``s3`` dict: Config.merge replaces it whole, so merging flags one by one would drop
    # the earlier ones (virtual addressing lost when acceleration is on).
    s3_options: dict[str, Any] = {}
    if _is_true("S3_USER_VIRTUAL_BUCKET"):
        s3_options["addressing_style"] = "virtual"
    if _is_true("S3_USE_ACCELERATE"):
        s3_options["use_accelerate_endpoint"] = True
    # The legacy global endpoint answers PermanentRedirect for buckets outside us-east-1 when
    # addressed path-style; virtual-host style lets the SDK follow the bucket's region.
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    region = region_from_env()
    if endpoint == LEGACY_ENDPOINT and region not in (None, "us-east-1"):
        s3_options["addressing_style"] = "virtual"
    if s3_options:
        config = config.merge(Config(s3=s3_options))
    return config


def verify_setting() -> bool | str:
    """``verify=`` for the client: False only for ``S3_VERIFY_SSL`` 0/false; else the
    ``AWS_CA_BUNDLE`` file, else the global bundle, else the default trust store."""
    raw = os.environ.get("S3_VERIFY_SSL", "").strip()
    if raw and raw.lower() in ("0", "false"):
        log.warning("S3_VERIFY_SSL=%s: TLS certificates of the S3 endpoint are NOT verified", raw)
        return False
    bundle = os.environ.get("AWS_CA_BUNDLE", "").strip()
    if bundle:
        if not os.path.isfile(bundle):
            raise UsageError(
                f"AWS_CA_BUNDLE={bundle} does not exist",
                "Mount the CA certificate there, or fix AWS_CA_BUNDLE (ca_bundle in the "
                "storage-config secret)",
            )
        return bundle
    return tls.combined_bundle() or True


def client_kwargs(max_pool_connections: int = 10) -> dict[str, Any]:
    """Everything ``Session.client("s3", ...)`` needs, from the environment."""
    kwargs: dict[str, Any] = {
        "config": s3_config(max_pool_connections),
        "verify": verify_setting(),
    }
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "").strip()
    if endpoint:
        kwargs["endpoint_url"] = endpoint
    region = region_from_env()
    if region:
        kwargs["region_name"] = region
    return kwargs


def split_s3_uri(raw: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key). The key is taken literally (no unquoting), as S3
    keys may hold ``%``, ``?`` or ``#``."""
    rest = raw.strip()[len("s3://") :]
    bucket, _, key = rest.partition("/")
    return bucket, key


def key_names_object(key: str) -> bool:
    """Whether ``key`` may name one object (it is checked by listing); else it is a prefix."""
    return bool(key) and not key.endswith("/")


def _etag_md5(etag: str) -> str | None:
    """The MD5 hidden in an ETag, if it is a plain one (multipart ETags end in ``-N``)."""
    value = etag.strip().strip('"')
    if value.startswith("W/"):
        return None
    return value.lower() if _MD5_ETAG.match(value) else None


def _additional_checksums(answer: Mapping[str, Any]) -> dict[str, str]:
    """Full-object checksums from a HEAD/GET answer, as lowercase hex."""
    found: dict[str, str] = {}
    if str(answer.get("ChecksumType", "FULL_OBJECT")).upper() == "COMPOSITE":
        return found
    for ours, field_name in _ADDITIONAL.values():
        value = answer.get(field_name)
        if not value or "-" in value:  # "<b64>-N": a checksum of part checksums
            continue
        try:
            found[ours] = checksums.b64_to_hex(value)
        except ValueError:
            continue
    return found


def _verifiable(algorithms: list[str] | None) -> bool:
    for name in algorithms or ():
        entry = _ADDITIONAL.get(str(name).upper())
        if entry and checksums.available(entry[0]):
            return True
    return False


class S3Source(Source):
    """Objects of one S3 bucket under one key or prefix."""

    default_workers: ClassVar[int] = 16
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

    # ------------------------------------------------------------------ listing

    def list(self) -> Listing:
        objects, prefix = self._list_objects()
        self._prefix = prefix
        files = self._remote_files(objects, prefix)
        return Listing(files=files, fingerprint=fingerprint_of(files))

    def _where(self, prefix: str) -> str:
        return redact(f"s3://{self.bucket}/{prefix}")

    def _list_objects(self) -> tuple[list[dict[str, Any]], str | None]:
        """The objects to fetch and the directory prefix they are under (None: the key named
        one object exactly)."""
        key = self.key
        if key_names_object(key):
            # An exact object sorts first among the keys it prefixes: one cheap request.
            first = self._call(
                self.client.list_objects_v2, Bucket=self.bucket, Prefix=key, MaxKeys=1
            ).get("Contents", [])
            if first and first[0]["Key"] == key:
                return first, None
            prefix = key + "/"
        else:
            prefix = key
        objects = []
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=prefix)
        for page in self._guard(pages):
            for item in page.get("Contents", []):
                if item["Key"].endswith("/"):
                    continue  # a console "folder": no content, the directory exists anyway
                objects.append(item)
        if not objects:
            raise NotFoundError(
                f"no objects under {self._where(prefix)}",
                f"Check the bucket and the key of {self.uri.redacted}; a key that is not an "
                "object is read as the directory key/",
            )
        return objects, prefix

    def _guard(self, pages: Any) -> Iterator[dict[str, Any]]:
        """Iterate a paginator, mapping botocore errors to ours."""
        iterator = iter(pages)
        while True:
            try:
                page = next(iterator)
            except StopIteration:
                return
            except Exception as exc:
                raise self._map_error(exc, self.uri.redacted, listing=True) from exc
            yield page

    def _call(self, method: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return method(**kwargs)
        except Exception as exc:
            raise self._map_error(exc, self.uri.redacted, listing=True) from exc

    def _remote_files(self, objects: list[dict[str, Any]], prefix: str | None) -> list[RemoteFile]:
        trust_etag = os.environ.get(TRUST_ETAG_ENV, "true").strip().lower() not in ("0", "false")
        heads: dict[str, dict[str, Any]] = {}
        sample = next((o for o in objects if _etag_md5(o.get("ETag", ""))), None)
        if trust_etag and sample is not None:
            # SSE-KMS and SSE-C objects have 32-hex ETags that are not MD5s: look at one object
            # to learn whether this bucket encrypts that way before trusting any ETag.
            answer = self._head(sample["Key"])
            heads[sample["Key"]] = answer
            if answer.get("SSECustomerAlgorithm") or str(
                answer.get("ServerSideEncryption", "")
            ).startswith("aws:kms"):
                log.info("%s is KMS/SSE-C encrypted: ETags are not MD5s", self.uri.redacted)
                trust_etag = False
        wanted = [
            o["Key"]
            for o in objects
            if o["Key"] not in heads
            and (
                (
                    not (trust_etag and _etag_md5(o.get("ETag", "")))
                    and _verifiable(o.get("ChecksumAlgorithm"))
                )
                # A large object is worth one HEAD for a full-object CRC: verifying it costs
                # a fraction of the CPU of the ETag's MD5 (about 0.5 GB/s on one core).
                or int(o.get("Size", 0)) >= CHEAP_CHECKSUM_MIN_SIZE
                # So is one fetched in chunks whose listing names a CRC (CRC64NVME by default
                # for current SDKs): combined per chunk, no in-order read-back for the MD5.
                or (
                    int(o.get("Size", 0)) > self.settings.chunk_size
                    and _verifiable(o.get("ChecksumAlgorithm"))
                )
            )
        ]
        if len(wanted) > MAX_CHECKSUM_HEADS:
            log.info(
                "%d objects have no MD5 ETag; fetching additional checksums for the first %d",
                len(wanted),
                MAX_CHECKSUM_HEADS,
            )
            wanted = wanted[:MAX_CHECKSUM_HEADS]
        if wanted:
            workers = min(len(wanted), self.default_workers)
            with ThreadPoolExecutor(workers, thread_name_prefix="s3-head") as pool:
                heads.update(zip(wanted, pool.map(self._head, wanted), strict=True))

        files: list[RemoteFile] = []
        seen: dict[str, str] = {}
        for item in objects:
            key = item["Key"]
            relative = key.rpartition("/")[2] if prefix is None else key[len(prefix) :]
            path = safe_relpath(relative, what="object")
            if path in seen:
                raise SourceError(
                    f"{self.uri.redacted}: objects {seen[path]!r} and {key!r} both map to {path!r}",
                    "Rename one of the objects; keys with empty or '.' segments collide",
                )
            seen[path] = key
            etag = str(item.get("ETag", ""))
            sums: dict[str, str] = {}
            md5 = _etag_md5(etag)
            if md5 and trust_etag:
                sums["md5"] = md5
            head = heads.get(key, {})
            sums.update(_additional_checksums(head))
            version_id = head.get("VersionId")
            version = etag.strip('"') + (f"@{version_id}" if version_id else "")
            files.append(
                RemoteFile(
                    path=path,
                    size=int(item.get("Size", 0)),
                    checksums=sums,
                    version=version,
                    handle=(key, version_id),
                )
            )
        self._check_tree(files)
        return files

    def _check_tree(self, files: list[RemoteFile]) -> None:
        """A key cannot be both a file and a directory on disk (``a`` and ``a/b``)."""
        paths = {f.path for f in files}
        for path in paths:
            parent = path.rpartition("/")[0]
            while parent:
                if parent in paths:
                    raise SourceError(
                        f"{self.uri.redacted}: {parent!r} is both an object and a directory "
                        f"(it holds {path!r})",
                        "A model directory cannot hold both; remove or rename one object",
                    )
                parent = parent.rpartition("/")[0]

    def _head(self, key: str) -> dict[str, Any]:
        return self._call(
            self.client.head_object, Bucket=self.bucket, Key=key, ChecksumMode="ENABLED"
        )

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
            block = self.settings.write_size
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
            while remaining is None or remaining > 0:
                try:
                    block = body.read(BLOCK)
                except _STREAM_ERRORS as exc:
                    raise TransientError(
                        f"{where}: the transfer broke off: {redact(str(exc))}"
                    ) from exc
                if not block:
                    return
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
        finally:
            body.close()

    def _key_of(self, file: RemoteFile) -> str:
        """The object key of a file that carries no handle (rebuilt from a marker)."""
        if self._prefix is None:
            return self.key
        return self._prefix + file.path

    # ------------------------------------------------------------------ errors

    def _map_error(self, exc: BaseException, where: str, listing: bool) -> InitializerError:
        """Turn a botocore/urllib3 failure into one of our errors, never leaking secrets."""
        if isinstance(exc, InitializerError):
            return exc
        if isinstance(exc, bce.ClientError):
            return self._map_client_error(exc, where, listing)
        text = redact(str(exc))
        if isinstance(exc, bce.NoCredentialsError | bce.PartialCredentialsError):
            return AccessDeniedError(
                f"{where}: no usable AWS credentials (tried "
                f"{aws_credentials.credential_source()}): {text}",
                "Give the pod AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (KServe's s3 secret) or "
                "an IRSA role, or set awsAnonymousCredential=true for a public bucket",
            )
        if isinstance(exc, bce.CredentialRetrievalError | bce.UnknownCredentialError):
            return AccessDeniedError(
                f"{where}: could not obtain AWS credentials from "
                f"{aws_credentials.credential_source()}: {text}",
                "Check the service account's IAM role (AWS_ROLE_ARN, AWS_WEB_IDENTITY_TOKEN_FILE)",
            )
        if isinstance(exc, bce.SSLError):
            return SourceError(
                f"{where}: TLS handshake with {self._endpoint} failed: {text}",
                "Point AWS_CA_BUNDLE (or the global CA bundle) at the CA that signed the "
                "endpoint's certificate; S3_VERIFY_SSL=false disables verification (insecure)",
            )
        if isinstance(exc, bce.ParamValidationError):
            return UsageError(f"{where}: invalid S3 request: {text}", "Check the bucket name")
        if isinstance(exc, bce.NoRegionError):
            return UsageError(f"{where}: no AWS region configured", "Set AWS_DEFAULT_REGION")
        connect_failure = isinstance(
            exc, bce.EndpointConnectionError | bce.ConnectTimeoutError | bce.ProxyConnectionError
        )
        if connect_failure and listing:
            return SourceError(
                f"{where}: cannot connect to the S3 endpoint {self._endpoint}: {text}",
                "Check AWS_ENDPOINT_URL (scheme, host, port), DNS and network policies; "
                "S3_CONNECT_TIMEOUT and S3_MAX_ATTEMPTS control how long we try",
            )
        if connect_failure or isinstance(exc, _STREAM_ERRORS):
            return TransientError(f"{where}: connection to {self._endpoint} failed: {text}")
        if isinstance(exc, bce.BotoCoreError):
            return SourceError(f"{where}: S3 request failed: {text}")
        return SourceError(f"{where}: S3 request failed: {type(exc).__name__}: {text}")

    def _map_client_error(
        self, exc: bce.ClientError, where: str, listing: bool
    ) -> InitializerError:
        error = exc.response.get("Error", {}) or {}
        meta = exc.response.get("ResponseMetadata", {}) or {}
        code = str(error.get("Code") or "")
        status = int(meta.get("HTTPStatusCode") or 0)
        message = redact(str(error.get("Message") or code or status))
        headers = {k.lower(): v for k, v in (meta.get("HTTPHeaders") or {}).items()}
        detail = f"{code} ({status})" if code and code != str(status) else str(status)
        if code == "NoSuchBucket":
            return NotFoundError(f"{where}: bucket {self.bucket!r} does not exist")
        if code in _DENIED_CODES or status in (401, 403):
            return AccessDeniedError(
                f"{where}: access denied by the S3 endpoint: {detail}: {message} (credentials "
                f"tried: {aws_credentials.credential_source()})",
                _DENIED_HINTS.get(code),
            )
        if code in ("PermanentRedirect", "AuthorizationHeaderMalformed", "301") or status == 301:
            region = headers.get("x-amz-bucket-region")
            hint = f"Set AWS_DEFAULT_REGION={region}" if region else "Set AWS_DEFAULT_REGION"
            return SourceError(
                f"{where}: the bucket lives in another region: {detail}: {message}", hint
            )
        if (code in _TRANSIENT_CODES or status == 429 or status >= 500) and listing:
            # botocore has already retried (S3_MAX_ATTEMPTS); nothing retries a listing again.
            attempts = int(meta.get("RetryAttempts") or 0) + 1
            return TransientError(
                f"{where}: the S3 endpoint is throttling or failing: {detail}: {message}; "
                f"gave up after {attempts} attempts",
                "Wait and run again once the endpoint recovers, or raise S3_MAX_ATTEMPTS",
                retry_after=_retry_after(headers),
            )
        if code in _TRANSIENT_CODES or status == 429 or status >= 500:
            return TransientError(
                f"{where}: the S3 endpoint is overloaded or failing: {detail}: {message}",
                retry_after=_retry_after(headers),
            )
        if code in _NOT_FOUND_CODES or status == 404:
            if listing:
                return NotFoundError(f"{where}: not found: {detail}: {message}")
            return SourceChangedError(f"{where}: the object disappeared after it was listed")
        if code in ("InvalidRange", "PreconditionFailed") or status in (412, 416):
            return SourceChangedError(
                f"{where}: the object changed after it was listed: {detail}: {message}"
            )
        if code in ("InvalidObjectState",):
            return SourceError(
                f"{where}: the object is archived (Glacier/Deep Archive): {message}",
                "Restore the object before downloading it",
            )
        return SourceError(f"{where}: S3 error {detail}: {message}")

    def close(self) -> None:
        with contextlib.suppress(AttributeError):  # botocore < 1.26 has no close()
            self.client.close()


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
