"""Opening a provider: one module per kind of URI (see :mod:`storage_initializer.schemes`),
imported only when a download needs it.

Importing lazily keeps the warm start fast: a replica that finds its model complete must not
pay for importing boto3, the Azure SDK or google-cloud-storage.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from storage_initializer.errors import UsageError
from storage_initializer.schemes import BY_KIND

if TYPE_CHECKING:
    from storage_initializer.providers.base import Source
    from storage_initializer.settings import Settings
    from storage_initializer.uri import SourceUri


def open_source(uri: SourceUri, settings: Settings) -> Source:
    """The provider of ``uri``'s kind (its row in :data:`~storage_initializer.schemes.BACKENDS`),
    importing its module now, so a warm start that never downloads never imports a cloud SDK."""
    backend = BY_KIND.get(uri.kind)
    if backend is None or backend.module is None or backend.source_class is None:
        raise UsageError(f"no provider for {uri.redacted}")
    extra = backend.extra
    try:
        module = importlib.import_module(f"{__name__}.{backend.module}")
    except ModuleNotFoundError as exc:
        if extra is None and not (exc.name or "").startswith("storage_initializer"):
            raise
        what = f"pip install 'storage-initializer[{extra}]'" if extra else "a newer release"
        raise UsageError(
            f"{uri.redacted}: {uri.kind} sources are not available in this installation",
            f"They need {what}",
        ) from exc
    source_class = getattr(module, backend.source_class)
    return source_class(uri, settings)
