"""KServe's ``STORAGE_CONFIG`` / ``STORAGE_OVERRIDE_CONFIG``: JSON from the storage-config secret.

KServe injects the secret's entry as JSON; override keys win. For ``type: s3`` the keys map to
the usual environment variables, exactly as the stock initializer does, so that the S3 provider
has one place to read its configuration from. For ``type: hdfs``/``webhdfs`` each key becomes a
file in a private temporary directory named by ``HDFS_SECRET_DIR`` (the keytab and TLS files
base64-decoded), again as the stock does, so that the HDFS provider reads one layout whether the
secret was mounted or came through the storage-config secret. Secret values are registered for
redaction.
"""

from __future__ import annotations

import atexit
import base64
import binascii
import json
import os
import shutil
import tempfile
from collections.abc import MutableMapping
from typing import Any

from storage_initializer.errors import UsageError
from storage_initializer.redact import register_secret

S3_KEYS = (
    ("AWS_ENDPOINT_URL", "endpoint_url"),
    ("AWS_ACCESS_KEY_ID", "access_key_id"),
    ("AWS_SECRET_ACCESS_KEY", "secret_access_key"),
    ("AWS_DEFAULT_REGION", "region"),
    ("AWS_CA_BUNDLE", "ca_bundle"),
    ("S3_VERIFY_SSL", "verify_ssl"),
    ("awsAnonymousCredential", "anonymous"),
)
SECRET_KEYS = ("secret_access_key", "access_key_id", "session_token", "password", "token")
#: HDFS keys holding files, base64-encoded in the JSON (the stock's _HDFS_FILE_SECRETS).
HDFS_FILE_KEYS = ("KERBEROS_KEYTAB", "TLS_CERT", "TLS_KEY", "TLS_CA")


def _load(name: str, environ: MutableMapping[str, str]) -> dict[str, Any]:
    raw = environ.get(name, "").strip()
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        raise UsageError(
            f"{name} is not valid JSON", "Check the storage-config secret's entry"
        ) from None
    if not isinstance(data, dict):
        raise UsageError(f"{name} must be a JSON object")
    return data


def storage_spec(environ: MutableMapping[str, str] | None = None) -> dict[str, Any]:
    environ = os.environ if environ is None else environ
    spec = _load("STORAGE_CONFIG", environ)
    spec.update(_load("STORAGE_OVERRIDE_CONFIG", environ))
    for key in SECRET_KEYS:
        if isinstance(spec.get(key), str):
            register_secret(spec[key])
    return spec


def apply(environ: MutableMapping[str, str] | None = None) -> dict[str, Any]:
    """Export the spec's S3 keys to the environment, or write its HDFS keys to a secret
    directory (as the stock initializer does)."""
    environ = os.environ if environ is None else environ
    spec = storage_spec(environ)
    if spec.get("type") == "s3":
        for env_name, key in S3_KEYS:
            if key in spec and spec[key] is not None:
                value = spec[key]
                environ[env_name] = str(value).lower() if isinstance(value, bool) else str(value)
    elif spec.get("type") in ("hdfs", "webhdfs"):
        environ["HDFS_SECRET_DIR"] = write_hdfs_secret_dir(spec)
    return spec


def write_hdfs_secret_dir(spec: dict[str, Any]) -> str:
    """One file per key in a new 0700 directory under ``$TMPDIR``, removed at exit.

    The stock writes every key (``type`` included) and base64-decodes the file secrets; so do
    we. Files are 0600: they hold a keytab or a private key. A value that is not valid base64
    is a usage error naming the key, never echoing the value.
    """
    directory = tempfile.mkdtemp(prefix="storage-initializer-hdfs-")
    atexit.register(shutil.rmtree, directory, True)
    for key, value in spec.items():
        if value is None or "/" in key or key in ("", ".", ".."):
            continue
        if key in HDFS_FILE_KEYS:
            try:
                data = base64.b64decode(str(value), validate=False)
            except (binascii.Error, ValueError):
                raise UsageError(
                    f"storage-config key {key} of type {spec.get('type')} is not valid base64",
                    "Keytab and TLS files are base64-encoded in the storage-config secret",
                ) from None
        else:
            if isinstance(value, dict | list):
                text = json.dumps(value)  # HEADERS given as an object rather than a string
            else:
                text = str(value).lower() if isinstance(value, bool) else str(value)
            data = text.encode()
        handle = os.open(os.path.join(directory, key), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(handle, "wb") as out:
            out.write(data)
    return directory
