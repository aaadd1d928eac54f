"""A warm start imports no cloud SDK: a replica that finds its model complete must not pay for
boto3, google-cloud-storage, the Azure SDK or huggingface_hub (providers are imported only when
a download needs them; see storage_initializer/schemes.py and providers/__init__.py).

Proved in real child processes, the CLI and KServe's entrypoint, against a real S3 server: the
first pull downloads (and does import boto3, so the check can fail), the second finds the model
complete; the modules loaded by then are listed at exit.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.helpers import clean_env, run
from tests.servers.s3 import S3Server, s3_server

__all__ = ["s3_server"]

#: Top-level packages of the cloud SDKs a warm start must not import.
SDKS = ("boto3", "botocore", "google.cloud", "azure", "huggingface_hub")

#: Runs a module as ``python -m`` would, then writes the names of every loaded module.
WRAPPER = """
import atexit, json, runpy, sys
out, module = sys.argv.pop(1), sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(sys.modules))))
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def loaded_sdks(module: str, args: list[str], env: dict[str, str], out: Path) -> list[str]:
    done = run([sys.executable, "-c", WRAPPER, str(out), module, *args], env)
    assert done.returncode == 0, done.describe()
    modules = json.loads(out.read_text())
    return sorted({m for m in modules for sdk in SDKS if m == sdk or m.startswith(sdk + ".")})


@pytest.mark.parametrize(
    ("module", "command"),
    [("storage_initializer", ["pull"]), ("storage_initializer.entrypoint", [])],
    ids=["cli", "entrypoint"],
)
def test_a_warm_start_imports_no_cloud_sdk(
    s3_server: S3Server, tmp_path: Path, module: str, command: list[str]
) -> None:
    bucket = s3_server.new_bucket({"model/config.json": b"{}", "model/w.bin": os.urandom(4096)})
    uri, dest = f"s3://{bucket}/model", str(tmp_path / "model")
    env = clean_env(s3_server.env())
    cold = loaded_sdks(module, [*command, uri, dest], env, tmp_path / "cold.json")
    assert "boto3" in cold  # the download did need it: the check below can fail
    warm = loaded_sdks(module, [*command, uri, dest], env, tmp_path / "warm.json")
    assert warm == [], f"a warm start imported {warm}"
