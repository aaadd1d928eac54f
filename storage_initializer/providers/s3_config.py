"""S3 client settings from the environment: the botocore ``Config``, TLS verification, endpoint
and region, read exactly as KServe's stock initializer reads them (its ``get_S3_config`` and
``_get_s3_client_kwargs``), so an existing ``s3-secret`` keeps working.

Its own module because it is the one job of turning environment variables into client arguments,
testable without a server (tests/test_s3.py calls :func:`s3_config` and :func:`verify_setting`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

from botocore import UNSIGNED
from botocore.config import Config

from storage_initializer import tls
from storage_initializer.errors import UsageError

log = logging.getLogger(__name__)

#: The endpoint for which the stock initializer forces virtual addressing outside us-east-1.
LEGACY_ENDPOINT = "https://s3.amazonaws.com"


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
