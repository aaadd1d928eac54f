"""Legacy ``pvc://`` (``/mnt/pvc/...``) sources: the model is already on a mounted volume, so
it is linked into DEST, as KServe does, never downloaded."""

from __future__ import annotations

import os
import time
from pathlib import Path

from storage_initializer.errors import DestinationError, NotFoundError
from storage_initializer.paths import selected
from storage_initializer.pulling.outcome import Result
from storage_initializer.pulling.published import prepare_dir
from storage_initializer.settings import Settings
from storage_initializer.store.fsutil import remove_path
from storage_initializer.uri import SourceUri


def link_pvc(uri: SourceUri, dest: Path, settings: Settings, started: float) -> Result:
    """``/mnt/pvc/...``: the model is already on a mounted volume; link it, as KServe does."""
    source = Path(uri.raw)
    if not source.exists():
        raise NotFoundError(
            f"cannot locate source {uri.redacted} on the PVC",
            "Check the PVC name and the path inside it (pvc://<claim>/<path>)",
        )
    prepare_dir(dest, "destination")
    names = [source.name] if source.is_file() else sorted(os.listdir(source))
    base = source.parent if source.is_file() else source
    linked = 0
    for name in names:
        if not selected(name, settings.include, settings.exclude):
            continue
        target = dest / name
        if target.is_symlink() and os.readlink(target) == str(base / name):
            linked += 1
            continue
        if target.exists() or target.is_symlink():
            if not settings.replace:
                raise DestinationError(
                    f"{target} already exists", "Use an empty destination, or pass --replace"
                )
            remove_path(target)
        os.symlink(base / name, target)
        linked += 1
    if not linked:
        raise NotFoundError(f"no model found in {uri.redacted}")
    return Result(
        uri.redacted, str(dest), "linked", files=linked, seconds=time.monotonic() - started
    )
