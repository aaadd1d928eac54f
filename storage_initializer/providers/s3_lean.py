"""A lean ranged GET for S3: botocore signs, one plain HTTP connection per worker reads.

A GET through boto3 costs a few hundred microseconds of Python per request (parameter
validation, event hooks, the retry handler, urllib3's pool) and copies every block a couple of
times on its way out of urllib3. For a model of many small files that is most of the CPU a
file costs. Here botocore still does what it is good at: it resolves the endpoint and the
addressing style (path, virtual host, accelerate), takes credentials from its chain (keys,
IRSA, instance profile; refreshed when they near expiry) and signs, as a SigV4 presigned URL
that we cache per object for a few minutes. The request itself goes through
:mod:`lean_http` (one ``http.client`` connection per worker thread, kept alive), and the body
is read in blocks of the engine's write size straight from the socket.

Every GET is pinned to the listed version: ``If-Match`` with the listed ETag (and the
``versionId`` when the listing had one), so an object replaced during the pull answers 412 and
we raise :class:`SourceChangedError` instead of stitching two versions. Other error answers are
turned into botocore ``ClientError``\\ s from their XML body and mapped by the provider's own
mapper, so messages and hints are those of the SDK path; a broken or short body is a
:class:`TransientError` (the engine resumes the chunk).

Not used (the boto3 path is) behind an HTTP(S) proxy, or with ``STORAGE_INITIALIZER_S3_LEAN``
false.
"""

from __future__ import annotations

import http.client
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator
from typing import Any

import botocore.exceptions as bce
from botocore.auth import S3SigV4QueryAuth, _host_from_url
from botocore.awsrequest import AWSRequest
from botocore.utils import percent_encode

from storage_initializer.errors import (
    InitializerError,
    SourceChangedError,
    TransientError,
)
from storage_initializer.providers import lean_http
from storage_initializer.redact import redact

#: Presigned URLs live this long; we re-sign well before (credentials may be short-lived).
URL_EXPIRES = 3600
URL_REUSE = 300.0
ENV = "STORAGE_INITIALIZER_S3_LEAN"
#: The key of the one URL botocore presigns per bucket (see LeanGetter._sign).
PROBE = "si-probe-0c4f2e"
SIGV4 = "AWS4-HMAC-SHA256"


def wanted() -> bool:
    """Whether the lean path is asked for (default yes)."""
    return lean_http.wanted(ENV)


proxied = lean_http.proxied


class LeanGetter:
    """Ranged, pinned GETs of one bucket's objects."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        verify: bool | str,
        timeouts: tuple[float, float],
        map_error: Callable[[BaseException, str], InitializerError],
    ) -> None:
        self.client = client  # its config presigns with SigV4 (s3.s3_config)
        #: botocore's User-Agent (with AWS_SDK_UA_APP_ID), so server logs see the same client.
        creator = getattr(client, "_user_agent_creator", None)
        self.user_agent = str(
            creator.to_string() if creator is not None else client.meta.config.user_agent
        )
        self.bucket = bucket
        self.connections = lean_http.Connections(verify, *timeouts)
        self.map_error = map_error
        self._urls: dict[tuple[str, str | None], tuple[str, float]] = {}
        self._urls_lock = threading.Lock()
        self._template_value: tuple[str, str, Any, str] | bool | None = False

    # -- signing -----------------------------------------------------------------------------

    def _url(self, key: str, version_id: str | None) -> str:
        now = time.monotonic()
        with self._urls_lock:
            cached = self._urls.get((key, version_id))
        if cached is not None and now - cached[1] < URL_REUSE:
            return cached[0]
        url = self._sign(key, version_id)
        with self._urls_lock:
            if len(self._urls) > 10_000:
                self._urls.clear()
            self._urls[(key, version_id)] = (url, now)
        return url

    def _sign(self, key: str, version_id: str | None) -> str:
        """A presigned GET URL. botocore's ``generate_presigned_url`` resolves the endpoint
        ruleset on every call (0.5 to 1.7 ms measured); the URL of any key of the bucket
        differs from a probe's only in the key, so botocore presigns one probe and we sign
        the others with the same SigV4 query signer, region and credential chain. The signed
        ``host`` header is the same for every key too: botocore derives it from the URL (two
        URL parses and an IPv6 check, a third of a signature's 70 us) unless the request
        carries it, so the request carries the value botocore derived once from the probe."""
        template = self._template()
        if template is None:
            params: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
            if version_id:
                params["VersionId"] = version_id
            url: str = self.client.generate_presigned_url(
                "get_object", Params=params, ExpiresIn=URL_EXPIRES
            )
            return url
        prefix, region, signer, host = template
        url = prefix + percent_encode(key, safe="/~")
        if version_id:
            url += "?versionId=" + percent_encode(version_id)
        credentials = self.client._request_signer._credentials
        if signer is None or credentials is None:  # anonymous: an unsigned URL
            return url
        request = AWSRequest(method="GET", url=url, headers={"host": host})
        signer(credentials.get_frozen_credentials(), "s3", region, expires=URL_EXPIRES).add_auth(
            request
        )
        return str(request.url)

    def _template(self) -> tuple[str, str, Any, str] | None:
        """(URL prefix of the bucket's keys, signing region, SigV4 query signer class, the
        ``host`` header it signs), from one URL botocore presigned; None when the probe's URL
        is not of the expected shape."""
        if self._template_value is not False:
            return self._template_value  # type: ignore[return-value]
        probe = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": PROBE}, ExpiresIn=URL_EXPIRES
        )
        value: tuple[str, str, Any, str] | None = None
        base, _, query = probe.partition("?")
        if base.endswith("/" + PROBE) and base.count(PROBE) == 1:
            fields = urllib.parse.parse_qs(query)
            credential = (fields.get("X-Amz-Credential") or [""])[0].split("/")
            if not query:
                value = (base[: -len(PROBE)], "", None, "")  # unsigned (anonymous access)
            elif len(credential) == 5 and fields.get("X-Amz-Algorithm") == [SIGV4]:
                # botocore's pure-Python signer: 0.1 ms a URL, where the awscrt-backed one
                # botocore picks when awscrt is installed takes 0.3 ms (the same signature).
                value = (
                    base[: -len(PROBE)],
                    credential[2],
                    S3SigV4QueryAuth,
                    _host_from_url(probe),
                )
        self._template_value = value
        return value

    # -- reading -----------------------------------------------------------------------------

    def read(
        self,
        key: str,
        version_id: str | None,
        etag: str | None,
        start: int,
        end: int | None,
        whole: bool,
        block: int,
        where: str,
    ) -> Iterator[bytes]:
        headers = {"Accept-Encoding": "identity", "User-Agent": self.user_agent}
        if not whole:
            headers["Range"] = lean_http.range_header(start, end)
        if etag:
            headers["If-Match"] = f'"{etag}"'
        try:
            url = self._url(key, version_id)
        except Exception as exc:
            raise self.map_error(exc, where) from exc
        try:
            answer = self.connections.get(url, headers)
        except (OSError, http.client.HTTPException) as exc:
            raise TransientError(
                f"{where}: connection to the S3 endpoint failed: {type(exc).__name__}: "
                f"{redact(str(exc))}"
            ) from None
        if answer.status not in (200, 206):
            self._fail(answer, where)
        yield from lean_http.ranged_body(answer, start, end, whole, block, where)

    def _fail(self, answer: lean_http.Answer, where: str) -> None:
        status = answer.status
        headers, body = lean_http.error_answer(answer)
        if status == 412:
            raise SourceChangedError(
                f"{where}: the object changed after it was listed (412 Precondition Failed to a "
                "GET pinned to the listed ETag)"
            )
        code, message = _error_fields(body)
        error = bce.ClientError(
            {
                "Error": {
                    "Code": code or str(status),
                    "Message": message or answer.response.reason,
                },
                "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": headers},
            },
            "GetObject",
        )
        raise self.map_error(error, where)

    def close(self) -> None:
        """Close the calling thread's connections (the others close with their threads)."""
        self.connections.close()


def _error_fields(body: bytes) -> tuple[str, str]:
    """``Code`` and ``Message`` of an S3 XML error body ("" when there is none)."""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return "", ""
    code = root.findtext("Code") or ""
    message = root.findtext("Message") or ""
    return code, redact(message)
