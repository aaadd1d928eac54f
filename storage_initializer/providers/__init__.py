"""Provider registry: one module per kind of URI, imported only when a download needs it.

Importing lazily keeps the warm start fast: a replica that finds its model complete must not
pay for importing boto3, the Azure SDK or google-cloud-storage.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from storage_initializer.errors import UsageError

if TYPE_CHECKING:
    from storage_initializer.providers.base import Source
    from storage_initializer.settings import Settings
    from storage_initializer.uri import SourceUri

#: kind -> (module, class, pip extra that provides its dependencies or None for the core).
REGISTRY: dict[str, tuple[str, str, str | None]] = {
    "local": ("storage_initializer.providers.local", "LocalSource", None),
    "pvc": ("storage_initializer.providers.local", "LocalSource", None),
    "http": ("storage_initializer.providers.http", "HttpSource", None),
    "s3": ("storage_initializer.providers.s3", "S3Source", None),
    "gs": ("storage_initializer.providers.gcs", "GcsSource", None),
    "azure-blob": ("storage_initializer.providers.azure_blob", "AzureBlobSource", None),
    "azure-file": ("storage_initializer.providers.azure_file", "AzureFileSource", None),
    "hf": ("storage_initializer.providers.hf", "HfSource", None),
    "hdfs": ("storage_initializer.providers.hdfs", "HdfsSource", "hdfs"),
    "webhdfs": ("storage_initializer.providers.hdfs", "HdfsSource", "hdfs"),
    "oci": ("storage_initializer.providers.oci", "OciSource", "oci"),
    "git": ("storage_initializer.providers.git", "GitSource", "git"),
    "modelscope": ("storage_initializer.providers.modelscope", "ModelScopeSource", "modelscope"),
}


def open_source(uri: SourceUri, settings: Settings) -> Source:
    try:
        module_name, class_name, extra = REGISTRY[uri.kind]
    except KeyError:
        raise UsageError(f"no provider for {uri.redacted}") from None
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if extra is None and not exc.name.startswith("storage_initializer"):
            raise
        what = f"pip install 'storage-initializer[{extra}]'" if extra else "a newer release"
        raise UsageError(
            f"{uri.redacted}: {uri.kind} sources are not available in this installation",
            f"They need {what}",
        ) from exc
    source_class = getattr(module, class_name)
    return source_class(uri, settings)
