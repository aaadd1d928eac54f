"""The package stays clean under mypy (the ``[tool.mypy]`` section of pyproject.toml: Python
3.11, bodies of unannotated functions checked too). Run as its own process from the repository
root, with mypy's cache there, so a rerun checks only what changed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT

pytest.importorskip("mypy", reason="mypy is in the test extra")


def test_mypy_finds_no_error_in_the_package() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "storage_initializer"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
