"""Helpers shared by the object-store provider tests (test_s3, test_gcs, test_data_plane).

Why: each of those files had its own copy of the environment scrubbing (for the provider
opened in this process, and for the CLI as a child), of the read that a cut-off body ends,
of the listing fixture and of the eight replicas pulling at once.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from storage_initializer.errors import TransientError

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
#: A directory ``model/`` (nested) among siblings whose names start the same: listing
#: ``model`` must return the directory's three files only.
SIBLINGS = {
    "model/config.json": b"{}",
    "model/shards/00001.bin": b"a" * 10,
    "model/shards/deep/er/x": b"xyz",
    "model-v2/config.json": b"v2",
    "model.txt": b"not me",
}


def _leaks(name: str, prefixes: tuple[str, ...], names: tuple[str, ...]) -> bool:
    return name.startswith(prefixes) or name in names


def clear_env(
    monkeypatch: pytest.MonkeyPatch,
    prefixes: tuple[str, ...],
    names: tuple[str, ...],
    server_env: Mapping[str, str],
) -> None:
    """This process's environment without the variables that would leak from the developer's
    shell into the provider under test (``prefixes``, ``names``), plus ``server_env``."""
    for name in list(os.environ):
        if _leaks(name, prefixes, names):
            monkeypatch.delenv(name)
    for name, value in server_env.items():
        monkeypatch.setenv(name, value)


def child_env(
    prefixes: tuple[str, ...], names: tuple[str, ...], server_env: Mapping[str, str]
) -> dict[str, str]:
    """The same for a child process (the CLI), which also imports this checkout."""
    env = {k: v for k, v in os.environ.items() if not _leaks(k, prefixes, names)}
    env.update(server_env)
    env["PYTHONPATH"] = str(REPO)
    return env


def read_until_broken(source: Any, file: Any) -> bytearray:
    """Read ``file`` whole while the proxy cuts its body: the read must end in the
    TransientError the engine resumes from; returns the bytes that arrived before it."""
    received = bytearray()
    with pytest.raises(TransientError, match="broke off"):
        for block in source.read(file):
            received += block
    return received


def pull_concurrently(
    argv: list[str], env: Mapping[str, str], count: int = 8
) -> tuple[list[int], list[str]]:
    """``count`` processes of ``argv`` at once (replicas on one node sharing a destination);
    their exit codes and outputs (stderr merged), in start order."""
    processes = [
        subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(count)
    ]
    outputs = [p.communicate(timeout=240)[0] for p in processes]
    return [p.returncode for p in processes], outputs
