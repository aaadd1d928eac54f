"""The HDFS settings, read as KServe's stock initializer reads them, and Kerberos from them.

One job: turn ``HDFS_SECRET_DIR`` (the mounted ``hdfscreds`` secret, or the directory
:mod:`storage_initializer.storage_config` writes from a ``type: hdfs`` entry) into an
:class:`HdfsConfig`, and the URI into the HDFS path the stock would read. Kept apart from the
WebHDFS client (:mod:`.hdfs`) so that configuration errors and the lazy Kerberos import are found
in one place; the client only consumes the result.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import requests

from storage_initializer.errors import AccessDeniedError, UsageError
from storage_initializer.providers.httpcommon import secret_headers

DEFAULT_SECRET_DIR = "/var/secrets/kserve-hdfscreds"
#: Settings whose file is used by path (binary secrets), as the stock's _HDFS_FILE_SECRETS.
FILE_SECRETS = ("KERBEROS_KEYTAB", "TLS_CERT", "TLS_KEY", "TLS_CA")
#: Settings read as text.
TEXT_SETTINGS = (
    "HDFS_NAMENODE",
    "USER_PROXY",
    "HDFS_ROOTPATH",
    "TLS_SKIP_VERIFY",
    "HEADERS",
    "N_THREADS",
    "KERBEROS_PRINCIPAL",
)


@dataclass(frozen=True)
class HdfsConfig:
    """The settings of ``HDFS_SECRET_DIR``; file secrets are paths, the rest text."""

    secret_dir: str
    namenodes: tuple[str, ...]
    user_proxy: str | None = None
    root: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    tls_skip_verify: bool = False
    headers: Mapping[str, str] = field(default_factory=dict)
    n_threads: int | None = None
    kerberos_principal: str | None = None
    kerberos_keytab: str | None = None


def _normalise_namenode(url: str) -> str:
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url  # the hdfs package requires a scheme; a bare host:port means http
    if url.endswith("/webhdfs/v1"):
        url = url[: -len("/webhdfs/v1")]
    return url


def load_config(environ: Mapping[str, str] | None = None) -> HdfsConfig:
    """Read ``HDFS_SECRET_DIR`` as the stock initializer does, with clear errors.

    Text values are stripped (a secret made ``--from-file`` ends with a newline, which the stock
    would send as part of the namenode URL). A missing directory is not an error by itself: the
    missing namenode is, and the message says where it was looked for.
    """
    environ = os.environ if environ is None else environ
    secret_dir = environ.get("HDFS_SECRET_DIR") or DEFAULT_SECRET_DIR
    values: dict[str, str | None] = {}
    for name in (*TEXT_SETTINGS, *FILE_SECRETS):
        path = os.path.join(secret_dir, name)
        if not os.path.isfile(path):
            values[name] = None
        elif name in FILE_SECRETS:
            values[name] = path
        else:
            try:
                with open(path, encoding="utf-8") as handle:
                    values[name] = handle.read().strip() or None
            except (OSError, UnicodeDecodeError) as exc:
                raise UsageError(
                    f"cannot read the HDFS setting {path}: {type(exc).__name__}"
                ) from None
    namenode = values["HDFS_NAMENODE"]
    if not namenode:
        raise UsageError(
            f"no HDFS namenode configured: {os.path.join(secret_dir, 'HDFS_NAMENODE')} "
            "does not exist or is empty",
            "Mount the HDFS secret (files HDFS_NAMENODE, ...) at HDFS_SECRET_DIR "
            f"(default {DEFAULT_SECRET_DIR}), or give a storage-config entry of type hdfs",
        )
    headers: dict[str, str] = {}
    if values["HEADERS"]:
        headers = secret_headers(values["HEADERS"], os.path.join(secret_dir, "HEADERS"))
    threads: int | None = None
    if values["N_THREADS"]:
        try:
            threads = int(values["N_THREADS"])
        except ValueError:
            threads = 0
        if threads < 1:
            raise UsageError(
                f"N_THREADS in {secret_dir} must be a positive integer, got {values['N_THREADS']!r}"
            )
    skip = (values["TLS_SKIP_VERIFY"] or "false").strip().lower() == "true"
    return HdfsConfig(
        secret_dir=secret_dir,
        namenodes=tuple(_normalise_namenode(u) for u in namenode.split(";") if u.strip()),
        user_proxy=values["USER_PROXY"],
        root=values["HDFS_ROOTPATH"],
        tls_cert=values["TLS_CERT"],
        tls_key=values["TLS_KEY"],
        tls_ca=values["TLS_CA"],
        tls_skip_verify=skip,
        headers=headers,
        n_threads=threads,
        kerberos_principal=values["KERBEROS_PRINCIPAL"],
        kerberos_keytab=values["KERBEROS_KEYTAB"],
    )


def uri_path(raw: str) -> str:
    """Everything after ``hdfs://``/``webhdfs://``: the stock's notion of the HDFS path."""
    scheme, sep, rest = raw.strip().partition("://")
    if not sep or scheme.lower() not in ("hdfs", "webhdfs"):
        raise UsageError(f"{raw!r} is not an hdfs:// or webhdfs:// URI")
    return rest


def _kerberos_auth(principal: str, keytab: str | None, redacted: str) -> requests.auth.AuthBase:
    """SPNEGO with credentials from the keytab, kept in a private in-memory cache (the stock's
    krbContext writes the process-wide ticket cache instead)."""
    try:
        import gssapi
        from requests_gssapi import OPTIONAL, HTTPSPNEGOAuth
    except ImportError:
        raise UsageError(
            f"{redacted}: KERBEROS_PRINCIPAL is set but Kerberos support is not installed",
            "Kerberos needs pip install 'storage-initializer[kerberos]' (requests-gssapi)",
        ) from None
    if not keytab:
        raise UsageError(
            f"{redacted}: KERBEROS_PRINCIPAL is set but there is no KERBEROS_KEYTAB file",
            "Add the keytab (base64 in the storage-config secret) next to the principal",
        )
    try:
        name = gssapi.Name(principal, gssapi.NameType.kerberos_principal)
        store = {"client_keytab": keytab, "ccache": f"MEMORY:storage-initializer-{os.getpid()}"}
        creds = gssapi.Credentials(name=name, usage="initiate", store=store)
    except gssapi.exceptions.GSSError as exc:
        raise AccessDeniedError(
            f"{redacted}: Kerberos login as {principal} with the keytab failed: {exc}",
            "Check KERBEROS_PRINCIPAL, the keytab and the cluster's krb5.conf",
        ) from None
    return HTTPSPNEGOAuth(creds=creds, mutual_authentication=OPTIONAL)
