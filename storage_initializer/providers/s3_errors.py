"""Mapping botocore/urllib3 failures of S3 requests to our errors: which S3 error codes mean
"access denied", "not found", "throttled", "changed since listed", with a hint for each, and
never a secret in the message.

Its own module because the mapping is one job shared by the listing (:mod:`s3_listing`), the boto3
reads and the lean reads (:mod:`s3_lean`, through a callback) of :class:`~.s3.S3Source`.
"""

from __future__ import annotations

from http.client import HTTPException

import botocore.exceptions as bce

from storage_initializer.errors import (
    AccessDeniedError,
    InitializerError,
    NotFoundError,
    SourceChangedError,
    SourceError,
    TransientError,
    UsageError,
)
from storage_initializer.providers import aws_credentials
from storage_initializer.providers.retry_after import retry_after
from storage_initializer.redact import redact

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


class S3ErrorMapping:
    """The error mapping of :class:`~.s3.S3Source`, as a mixin: it names the bucket and the
    endpoint the source talks to."""

    bucket: str
    _endpoint: str

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
                retry_after=retry_after(headers),
            )
        if code in _TRANSIENT_CODES or status == 429 or status >= 500:
            return TransientError(
                f"{where}: the S3 endpoint is overloaded or failing: {detail}: {message}",
                retry_after=retry_after(headers),
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
