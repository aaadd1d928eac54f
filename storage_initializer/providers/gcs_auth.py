"""GCS credentials and endpoint from the environment, as KServe's stock initializer finds them:
``GOOGLE_APPLICATION_CREDENTIALS`` (a key file that must load), else Application Default
Credentials (Workload Identity, the metadata server), else anonymous; ``STORAGE_EMULATOR_HOST``
means an emulator with anonymous credentials.

Its own module because choosing credentials is one job, apart from listing and reading
(:mod:`gcs`) and error mapping (:mod:`gcs_errors`).
"""

from __future__ import annotations

import os

import google.auth
from google.auth import exceptions as auth_exc
from google.auth.credentials import AnonymousCredentials, Credentials

from storage_initializer.errors import UsageError
from storage_initializer.redact import redact

#: We only read; a read-only token limits what a leaked token could do.
SCOPES = ("https://www.googleapis.com/auth/devstorage.read_only",)
EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
CREDENTIALS_ENV = "GOOGLE_APPLICATION_CREDENTIALS"


def emulator_endpoint() -> str | None:
    """``STORAGE_EMULATOR_HOST`` as a URL; a bare ``host:port`` (as many emulator guides write it)
    gets ``http://``, which google-cloud-storage would otherwise send to requests unchanged."""
    value = os.environ.get(EMULATOR_ENV, "").strip().rstrip("/")
    if not value:
        return None
    return value if "://" in value else "http://" + value


def load_credentials() -> tuple[Credentials, str | None, str]:
    """(credentials, project, what to call them in logs and hints).

    An emulator gets anonymous credentials (as google-cloud-storage gives it). A key file named
    by ``GOOGLE_APPLICATION_CREDENTIALS`` must load: the stock initializer silently falls back to
    anonymous when it does not, which turns a broken secret mount into a confusing 401 later.
    Otherwise Application Default Credentials, else anonymous (the stock behaviour).
    """
    if emulator_endpoint():
        return AnonymousCredentials(), None, f"anonymous credentials ({EMULATOR_ENV} is set)"
    keyfile = os.environ.get(CREDENTIALS_ENV, "").strip()
    if keyfile:
        try:
            if not os.path.isfile(keyfile):
                raise auth_exc.DefaultCredentialsError(f"File {keyfile} was not found.")
            # google.auth.default reads the file as the stock initializer's storage.Client()
            # does (service account, external account, authorized user).
            credentials, project = google.auth.default(scopes=SCOPES)
        except auth_exc.DefaultCredentialsError as exc:
            raise UsageError(
                f"{CREDENTIALS_ENV}={keyfile} cannot be used: {redact(str(exc))}",
                "Mount the service account key JSON there (KServe's GCS secret), or unset "
                f"{CREDENTIALS_ENV} to use Workload Identity or anonymous access",
            ) from exc
        return credentials, project, f"the credentials in {CREDENTIALS_ENV}={keyfile}"
    try:
        credentials, project = google.auth.default(scopes=SCOPES)
    except auth_exc.DefaultCredentialsError:
        return AnonymousCredentials(), None, "anonymous credentials (no credentials found)"
    return credentials, project, "Application Default Credentials (e.g. Workload Identity)"
