"""The boto3 session behind the S3 source: KServe's meaning of ``AWS_ENDPOINT_URL``, and a
credential failure that says which credential source was tried.

Why this exists (KServe issues #2113, #3482): botocore reads ``AWS_ENDPOINT_URL`` as the endpoint
of EVERY AWS service. With IRSA (``AWS_ROLE_ARN`` + ``AWS_WEB_IDENTITY_TOKEN_FILE``) and a MinIO
or Ceph endpoint, botocore's web-identity provider sends ``AssumeRoleWithWebIdentity`` to the S3
server, which answers with an S3 error page that botocore cannot parse (``ResponseParserError``),
and the pull fails with a message nobody can act on. In KServe, ``AWS_ENDPOINT_URL`` (set from
the ``serving.kserve.io/s3-endpoint`` annotation) means the S3 endpoint. So here it applies to
S3 only: STS uses ``AWS_ENDPOINT_URL_STS`` when set, else botocore's own (regional) STS endpoint.

The environment stays the only input; nothing here changes what boto3 would do for S3.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import boto3
import botocore.utils
from botocore.config import Config
from botocore.credentials import AssumeRoleWithWebIdentityProvider

WEB_IDENTITY = "assume-role-with-web-identity"


def sts_endpoint() -> str | None:
    """The STS endpoint we give botocore: ``AWS_ENDPOINT_URL_STS``, else None (botocore's
    default for the region, never ``AWS_ENDPOINT_URL``)."""
    return os.environ.get("AWS_ENDPOINT_URL_STS", "").strip() or None


def _sts_client_creator(session: Any, region: str | None) -> Any:
    """What botocore's web-identity provider calls to build its STS client, with the endpoint
    decided here: explicit ``AWS_ENDPOINT_URL_STS``, or configured endpoints ignored (so the
    global ``AWS_ENDPOINT_URL`` cannot leak in) and botocore's regional default used."""

    def create(service_name: str, **kwargs: Any) -> Any:
        if region and "region_name" not in kwargs:
            kwargs["region_name"] = region
        if service_name == "sts":
            endpoint = sts_endpoint()
            if endpoint:
                kwargs["endpoint_url"] = endpoint
            else:
                ignore = Config(ignore_configured_endpoint_urls=True)
                given = kwargs.get("config")
                kwargs["config"] = given.merge(ignore) if given is not None else ignore
        return session.create_client(service_name, **kwargs)

    return create


def s3_session(region: str | None) -> boto3.session.Session:
    """A boto3 session whose credential chain is boto3's own, except that the web-identity
    (IRSA) provider talks to STS, not to the S3 endpoint."""
    session = boto3.session.Session()
    core = session._session  # boto3 exposes no public accessor for its botocore session
    resolver = core.get_component("credential_provider")
    index = next(
        (i for i, p in enumerate(resolver.providers) if getattr(p, "METHOD", "") == WEB_IDENTITY),
        None,
    )
    if index is None:  # botocore changed its chain: keep it as it is
        return session
    resolver.providers[index] = AssumeRoleWithWebIdentityProvider(
        load_config=lambda: core.full_config,
        client_creator=_sts_client_creator(core, region),
        profile_name=core.get_config_variable("profile") or "default",
        cache={},
    )
    return session


def fast_timestamps(session: boto3.session.Session) -> None:
    """Parse the listing's timestamps with ``datetime.fromisoformat`` (botocore's default goes
    through dateutil: 0.4 ms an object, a quarter of what a small file costs in all). Call
    before the session makes a client; any other form falls back to botocore's parser."""
    factory = session._session.get_component("response_parser_factory")
    factory.set_parser_defaults(timestamp_parser=_timestamp)


def _timestamp(value: str) -> datetime.datetime:
    if not (isinstance(value, str) and len(value) >= 19 and value[4] == "-" and value[10] == "T"):
        return botocore.utils.parse_timestamp(value)  # epoch seconds, RFC 1123 headers, ...
    try:
        parsed = datetime.datetime.fromisoformat(value)
    except ValueError:
        return botocore.utils.parse_timestamp(value)
    if parsed.tzinfo is None:  # botocore's results are always aware (UTC when unspecified)
        parsed = parsed.replace(tzinfo=datetime.UTC)
    return parsed


def credential_source() -> str:
    """Which credential source the environment selects, in boto3's order, named without any
    secret: what a credential failure must tell the user to check."""
    env = os.environ
    if env.get("awsAnonymousCredential", "").strip().lower() == "true":
        return "anonymous (awsAnonymousCredential=true)"
    if env.get("AWS_ACCESS_KEY_ID"):
        kind = "static keys" + (" with a session token" if env.get("AWS_SESSION_TOKEN") else "")
        return f"{kind} from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
    token_file = env.get("AWS_WEB_IDENTITY_TOKEN_FILE")
    role = env.get("AWS_ROLE_ARN")
    if token_file or role:
        where = sts_endpoint() or "the regional STS endpoint (set AWS_ENDPOINT_URL_STS to change)"
        return (
            f"web identity (IRSA): role {role or '<AWS_ROLE_ARN unset>'}, token file "
            f"{token_file or '<AWS_WEB_IDENTITY_TOKEN_FILE unset>'}, STS at {where}"
        )
    if env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI") or env.get(
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"
    ):
        return "container credentials (EKS Pod Identity / ECS)"
    if env.get("AWS_PROFILE") or env.get("AWS_SHARED_CREDENTIALS_FILE"):
        return f"profile {env.get('AWS_PROFILE', 'default')} of the shared credentials file"
    return "boto3's default chain (shared files, then the instance metadata service)"
