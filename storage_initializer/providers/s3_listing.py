"""Listing an S3 key or prefix, and discovering each object's checksums.

A key naming one object exactly is that object; any other key is the directory ``key/``. Plain
32-hex ETags are MD5s unless the bucket encrypts with KMS/SSE-C (one HEAD of a sample object tells);
S3's additional checksums (CRC32, CRC32C, SHA256, ...) are not in ListObjectsV2's answer, so they
are fetched with HEADs only for objects that would otherwise go unverified or that are large
enough for a CRC to be worth it (see docs/providers/s3.md).

Its own module because listing and checksum discovery are one job, apart from reading bytes
(:mod:`s3`) and mapping errors (:mod:`s3_errors`).
"""

from __future__ import annotations

import builtins
import logging
import os
import re
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from storage_initializer import checksums
from storage_initializer.errors import NotFoundError
from storage_initializer.paths import safe_relpath
from storage_initializer.providers.base import Listing, RemoteFile, fingerprint_of
from storage_initializer.providers.object_layout import claim_path, refuse_file_directory_clash
from storage_initializer.providers.page_trail import PageTrail
from storage_initializer.providers.s3_errors import S3ErrorMapping
from storage_initializer.redact import redact

if TYPE_CHECKING:
    from storage_initializer.settings import Settings
    from storage_initializer.uri import SourceUri

log = logging.getLogger(__name__)

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


class S3Listing(S3ErrorMapping):
    """The listing of :class:`~.s3.S3Source`, as a mixin: it uses the source's client, bucket,
    key and settings, and maps failed requests with the error mapping it extends."""

    default_workers: int
    client: Any
    key: str
    uri: SourceUri
    settings: Settings
    _prefix: str | None

    def list(self) -> Listing:
        objects, prefix = self._list_objects()
        self._prefix = prefix
        files = self._remote_files(objects, prefix)
        return Listing(files=files, fingerprint=fingerprint_of(files))

    def _where(self, prefix: str) -> str:
        return redact(f"s3://{self.bucket}/{prefix}")

    def _list_objects(self) -> tuple[builtins.list[dict[str, Any]], str | None]:
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
        # botocore's paginator only refuses a token equal to the one before: A, B, A... loops.
        trail = PageTrail(
            f"{self.uri.redacted}: listing {self._where(prefix)}",
            "Check what answers for S3 (AWS_ENDPOINT_URL, a proxy in between): its "
            "pagination is broken",
        )
        for page in self._guard(pages):
            for item in page.get("Contents", []):
                if item["Key"].endswith("/"):
                    continue  # a console "folder": no content, the directory exists anyway
                objects.append(item)
            if page.get("IsTruncated"):
                trail.follow(str(page.get("NextContinuationToken") or ""))
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

    def _remote_files(
        self, objects: builtins.list[dict[str, Any]], prefix: str | None
    ) -> builtins.list[RemoteFile]:
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

        files: builtins.list[RemoteFile] = []
        seen: dict[str, str] = {}
        for item in objects:
            key = item["Key"]
            relative = key.rpartition("/")[2] if prefix is None else key[len(prefix) :]
            path = safe_relpath(relative, what="object")
            claim_path(seen, path, key, self.uri.redacted, "keys")
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

    def _check_tree(self, files: builtins.list[RemoteFile]) -> None:
        """A key cannot be both a file and a directory on disk (``a`` and ``a/b``)."""
        refuse_file_directory_clash({f.path for f in files}, self.uri.redacted)

    def _head(self, key: str) -> dict[str, Any]:
        return self._call(
            self.client.head_object, Bucket=self.bucket, Key=key, ChecksumMode="ENABLED"
        )
