"""IRSA (web identity) behind a custom S3 endpoint, KServe issues #2113 and #3482.

Two real moto servers on 127.0.0.1, each behind a counting proxy: one plays the S3 endpoint
(``AWS_ENDPOINT_URL``), the other STS. botocore alone would send ``AssumeRoleWithWebIdentity``
to ``AWS_ENDPOINT_URL``; the S3 endpoint must see no STS request (an STS call is a ``POST /``
with a form body; S3 reads are GETs/HEADs under the bucket).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import clean_env, run
from tests.servers.process import free_port
from tests.servers.proxy import CountingProxy
from tests.servers.s3 import REGION, S3Server, s3_server, start_moto

__all__ = ["s3_server"]

ROLE = "arn:aws:iam::123456789012:role/model-reader"
TOKEN = "eyJhbGciOiJSUzI1NiJ9.planted-web-identity-token-secret.c2lnbmF0dXJl"
MODEL = {"model/config.json": b'{"layers": 2}', "model/weights.bin": os.urandom(300_000)}


@pytest.fixture(scope="module")
def sts_server() -> Iterator[S3Server]:
    """A second moto server, used only for STS."""
    server = start_moto()
    try:
        yield server
    finally:
        server.stop()


def _irsa_env(tmp_path: Path, s3_endpoint: str, **extra: str) -> dict[str, str]:
    """What EKS's pod identity webhook injects, plus KServe's S3 endpoint; no static keys."""
    token = tmp_path / "token"
    token.write_text(TOKEN)
    return clean_env(
        {
            "AWS_ENDPOINT_URL": s3_endpoint,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ROLE_ARN": ROLE,
            "AWS_WEB_IDENTITY_TOKEN_FILE": str(token),
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
            **extra,
        }
    )


def _pull(uri: str, dest: Path, env: dict[str, str]):  # type: ignore[no-untyped-def]
    return run([sys.executable, "-m", "storage_initializer", "pull", uri, str(dest)], env)


def _sts_calls(proxy: CountingProxy) -> int:
    return proxy.count(method="POST")


def test_irsa_sends_sts_to_its_own_endpoint_not_to_s3(
    s3_server: S3Server, sts_server: S3Server, tmp_path: Path
) -> None:
    bucket = s3_server.new_bucket(MODEL)
    with CountingProxy(s3_server.endpoint) as s3, CountingProxy(sts_server.endpoint) as sts:
        env = _irsa_env(tmp_path, s3.url, AWS_ENDPOINT_URL_STS=sts.url)
        done = _pull(f"s3://{bucket}/model", tmp_path / "out", env)
        assert done.returncode == 0, done.describe()
        assert (tmp_path / "out" / "weights.bin").read_bytes() == MODEL["model/weights.bin"]
        assert _sts_calls(sts) >= 1, "the role was not assumed through the STS endpoint"
        assert _sts_calls(s3) == 0, [r.path for r in s3.requests]
        assert s3.count(method="GET") >= 2
    assert TOKEN not in done.output


def test_aws_endpoint_url_is_never_the_sts_endpoint(s3_server: S3Server, tmp_path: Path) -> None:
    """Without AWS_ENDPOINT_URL_STS, STS is botocore's regional endpoint, reached here through
    an HTTPS proxy that refuses connections (the machine is offline): the pull fails, with a
    last line naming the credential source tried, and the S3 endpoint saw no STS call (stock
    botocore sends AssumeRoleWithWebIdentity there, and moto even answers it)."""
    bucket = s3_server.new_bucket(MODEL)
    closed = free_port()
    with CountingProxy(s3_server.endpoint) as s3:
        env = _irsa_env(
            tmp_path,
            s3.url,
            HTTPS_PROXY=f"http://127.0.0.1:{closed}",
            NO_PROXY="127.0.0.1,localhost",
            AWS_MAX_ATTEMPTS="1",
        )
        done = _pull(f"s3://{bucket}/model", tmp_path / "out", env)
        assert _sts_calls(s3) == 0, [r.path for r in s3.requests]
    assert done.returncode == 1, done.describe()
    assert "web identity (IRSA)" in done.last_line, done.describe()
    assert ROLE in done.last_line
    assert "regional STS endpoint" in done.last_line
    assert TOKEN not in done.output
    assert not (tmp_path / "out" / "weights.bin").exists()


def test_unreadable_token_file_names_the_source_without_the_token(
    s3_server: S3Server, tmp_path: Path
) -> None:
    bucket = s3_server.new_bucket(MODEL)
    env = _irsa_env(tmp_path, s3_server.endpoint)
    env["AWS_WEB_IDENTITY_TOKEN_FILE"] = str(tmp_path / "missing-token")
    done = _pull(f"s3://{bucket}/model", tmp_path / "out", env)
    assert done.returncode == 1, done.describe()
    assert "could not obtain AWS credentials from web identity (IRSA)" in done.last_line
    assert "missing-token" in done.last_line
    assert TOKEN not in done.output


def test_access_denied_names_the_static_keys_without_the_secret(
    s3_server: S3Server, tmp_path: Path
) -> None:
    """A 403 of the endpoint (a fault at the proxy, as MinIO answers a wrong secret) says which
    credential source was used, never the secret."""
    from tests.servers.proxy import s3_error
    from tests.servers.s3 import SECRET_KEY

    bucket = s3_server.new_bucket(MODEL)
    with CountingProxy(s3_server.endpoint) as s3:
        s3.set_faults(s3_error("SignatureDoesNotMatch", "bad signature", status=403))
        env = clean_env(
            s3_server.env(s3.url),
            AWS_CONFIG_FILE=os.devnull,
            AWS_SHARED_CREDENTIALS_FILE=os.devnull,
            AWS_EC2_METADATA_DISABLED="true",
        )
        done = _pull(f"s3://{bucket}/model", tmp_path / "out", env)
    assert done.returncode == 1, done.describe()
    assert "static keys from the environment" in done.last_line, done.last_line
    assert SECRET_KEY not in done.output
