"""Shared pytest fixtures: a temporary directory that can hold read-only models, and nginx.

Kept minimal on purpose: backend-specific servers live in ``tests/servers/`` and are imported
by the tests that need them, so that a test run never starts a server it does not use.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers.nginx import nginx

__all__ = ["nginx"]  # session-scoped; started only by the tests that ask for it


def _make_writable(path: Path) -> None:
    for dirpath, _dirs, _files in os.walk(path):
        os.chmod(dirpath, 0o700)


@pytest.fixture
def tmp() -> Iterator[Path]:
    """A fresh directory, removed afterwards even though the models in it are read-only (a
    non-root user cannot delete files from a 0555 directory without chmod first)."""
    path = Path(tempfile.mkdtemp(prefix="si-test-"))
    try:
        yield path
    finally:
        _make_writable(path)
        shutil.rmtree(path, ignore_errors=True)
