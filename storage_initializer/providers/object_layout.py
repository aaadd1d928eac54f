"""Whether the flat listing of an object store (S3, GCS) can be written as one directory tree.

Object names are flat: two names can map to one path (``a//b`` and ``a/b``), and one name can be
both an object and a "directory" of others (``a`` and ``a/b``). No directory holds either, so the
listing is refused, never half-written or mixed. Shared by the S3 and GCS providers, which used to
carry a copy each; Azure's ``check_layout`` asks the same question and words its own message.
"""

from __future__ import annotations

from collections.abc import Collection

from storage_initializer.errors import SourceError


def claim_path(seen: dict[str, str], path: str, name: str, where: str, noun: str) -> None:
    """Record that object ``name`` maps to ``path``; SourceError if another object did already.

    ``noun`` is what the store calls object names in the hint ("keys", "names").
    """
    if path in seen:
        raise SourceError(
            f"{where}: objects {seen[path]!r} and {name!r} both map to {path!r}",
            f"Rename one of the objects; {noun} with empty or '.' segments collide",
        )
    seen[path] = name


def file_directory_clash(paths: Collection[str]) -> tuple[str, str] | None:
    """``(parent, path)`` for a path whose parent directory ``parent`` is itself a file in
    ``paths`` (``a`` and ``a/b``), else None. Azure's ``check_layout`` asks the same question."""
    known = paths if isinstance(paths, set | dict) else set(paths)
    for path in paths:
        parent = path.rpartition("/")[0]
        while parent:
            if parent in known:
                return parent, path
            parent = parent.rpartition("/")[0]
    return None


def refuse_file_directory_clash(paths: Collection[str], where: str) -> None:
    """SourceError if a path is both a file and the directory of another (``a`` and ``a/b``)."""
    clash = file_directory_clash(paths)
    if clash:
        parent, path = clash
        raise SourceError(
            f"{where}: {parent!r} is both an object and a directory (it holds {path!r})",
            "A model directory cannot hold both; remove or rename one object",
        )
