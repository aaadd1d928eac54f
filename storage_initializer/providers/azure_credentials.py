"""Choosing the Azure credential the stock KServe initializer would choose: a SAS token in the URI,
then a service principal or workload identity (``AZURE_CLIENT_ID`` ..., with the legacy ``AZ_*``
names copied over) through ``DefaultAzureCredential``, then the account key
``AZURE_STORAGE_ACCESS_KEY``, then anonymous; every secret is registered for redaction.

Its own module because credential selection is one job shared by azure_blob and azure_file.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, unquote

from storage_initializer.redact import register_secret

if TYPE_CHECKING:
    from storage_initializer.providers.azure_common import AzureLocation

#: Legacy names the stock initializer accepts; copied to the names azure-identity reads.
LEGACY_ENV = ("CLIENT_ID", "TENANT_ID", "CLIENT_SECRET", "SUBSCRIPTION_ID")


def register_sas(sas: str) -> None:
    """Mask a SAS token wherever it may show up: whole, and its signature in both encodings."""
    register_secret(sas)
    register_secret(unquote(sas))
    for key, value in parse_qsl(sas, keep_blank_values=True):
        if key == "sig":
            register_secret(value)
            register_secret(quote(value, safe=""))


def copy_legacy_env() -> None:
    """Copy ``AZ_CLIENT_ID`` & co. to ``AZURE_*`` where those are unset (azure-identity reads
    only the latter). Unlike the stock initializer we never overwrite a value the user set."""
    for name in LEGACY_ENV:
        legacy = os.environ.get(f"AZ_{name}")
        if legacy and not os.environ.get(f"AZURE_{name}"):
            os.environ[f"AZURE_{name}"] = legacy


def select_credential(location: AzureLocation) -> tuple[Any, str]:
    """The credential for a client and a name for the log: ``(credential, mode)``.

    Order: SAS in the URI; service principal / workload identity when ``AZURE_CLIENT_ID`` is set
    (after copying the legacy names); account key; anonymous.
    """
    if location.sas:
        return location.sas, "SAS token from the URI"
    copy_legacy_env()
    if os.environ.get("AZURE_CLIENT_ID"):
        register_secret(os.environ.get("AZURE_CLIENT_SECRET"))
        from azure.identity import DefaultAzureCredential

        return DefaultAzureCredential(), "DefaultAzureCredential (AZURE_CLIENT_ID)"
    key = os.environ.get("AZURE_STORAGE_ACCESS_KEY")
    if key:
        register_secret(key)
        return (
            {"account_name": location.account, "account_key": key},
            "account key (AZURE_STORAGE_ACCESS_KEY)",
        )
    return None, "anonymous (no SAS, AZURE_CLIENT_ID or AZURE_STORAGE_ACCESS_KEY)"
