"""Every pod of every LLMInferenceService example, at once, as real processes.

Each example under deploy/llmisvc/ is rendered into its pods as KServe's llmisvc controller
builds them (tests/test_manifests.py: one storage-initializer per pod, the LoRA pairs in the
same container, the user's override merged in). The init container of each pod then runs as a
real ``initializer-entrypoint`` process with its args, its environment (the hf-secret's
HF_TOKEN, KServe's HF_* defaults) and its volume mounts translated to directories: ONE
directory per shared volume (the namespace's model-cache PVC and config ConfigMap) and one per
pod for its emptyDir. All start together against a loopback Hub server holding the models as
private repositories, behind a counting proxy: every process exits 0, every pod sees the whole
model (and its adapter), and the origin served each byte once: 1.00x the models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import clean_env, entrypoint_argv, start_all, wait_all
from tests.servers.hub import start_hub
from tests.servers.proxy import CountingProxy
from tests.test_manifests import (
    CONFIG_MOUNT,
    REFERENCE,
    _llmisvcs,
    _one,
    llmisvc_pairs,
    llmisvc_pods,
)

pytestmark = pytest.mark.skipif(not REFERENCE.is_dir(), reason="KServe reference data missing")

TOKEN = "hf_planted_llmisvc_token_0123456789"
BASE = {
    "config.json": b'{"architectures": ["Qwen2ForCausalLM"]}',
    "tokenizer.json": b'{"model": {"vocab": {}}}' * 100,
    "model.safetensors": bytes(range(256)) * 6000,
}
ADAPTER = {
    "adapter_config.json": b'{"r": 16, "lora_alpha": 32}',
    "adapter_model.safetensors": bytes(reversed(range(256))) * 800,
}


def _repos(examples: dict[str, dict[str, Any]]) -> dict[str, dict[str, bytes]]:
    """hf:// repo id -> files, for every URI the examples name (base models and adapters)."""
    repos: dict[str, dict[str, bytes]] = {}
    for llmisvc in examples.values():
        for index, (uri, _path) in enumerate(llmisvc_pairs(llmisvc)):
            assert uri.startswith("hf://"), f"{uri}: this test serves hf:// only"
            repos[uri.removeprefix("hf://")] = BASE if index == 0 else ADAPTER
    return repos


def _translate(value: str, mounts: dict[str, Path]) -> str:
    """A container path as the host directory of the innermost volume mounted over it."""
    for mount_path in sorted(mounts, key=len, reverse=True):
        if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
            return str(mounts[mount_path]) + value[len(mount_path) :]
    return value


def _volume_dirs(pod: dict[str, Any], root: Path, pod_dir: Path) -> dict[str, Path]:
    """Volume name -> directory: PVCs and ConfigMaps are namespace-wide (one directory shared
    by every pod), emptyDirs belong to their pod."""
    dirs = {}
    for volume in pod["spec"]["volumes"]:
        if "persistentVolumeClaim" in volume:
            where = root / "pvc" / volume["persistentVolumeClaim"]["claimName"]
        elif "configMap" in volume:
            where = root / "configmap" / volume["configMap"]["name"]
        else:
            where = pod_dir / volume["name"]
        where.mkdir(parents=True, exist_ok=True)
        dirs[volume["name"]] = where
    return dirs


def _project_configmaps(root: Path) -> None:
    configmap = _one("namespace/configmap.yaml")
    where = root / "configmap" / configmap["metadata"]["name"]
    where.mkdir(parents=True, exist_ok=True)
    for key, text in configmap["data"].items():
        (where / key).write_text(text)


def _resolve_env(container: dict[str, Any], secrets: dict[tuple[str, str], str]) -> dict[str, str]:
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref and (ref["name"], ref["key"]) in secrets:
            env[item["name"]] = secrets[(ref["name"], ref["key"])]
    return env


def test_every_llmisvc_pod_pulls_at_once_and_the_origin_serves_each_model_once(
    tmp_path: Path,
) -> None:
    examples = _llmisvcs()
    repos = _repos(examples)
    hub = start_hub()
    try:
        for repo_id, files in repos.items():
            hub.add_repo(repo_id, readers=(TOKEN,)).add_commit(files)
        volumes_root = tmp_path / "volumes"
        _project_configmaps(volumes_root)
        argvs, envs, expectations = [], [], []
        with CountingProxy(hub.url) as origin:
            for _name, llmisvc in sorted(examples.items()):
                for pod in llmisvc_pods(llmisvc):
                    pod_dir = tmp_path / "pods" / pod["metadata"]["name"]
                    volume_dirs = _volume_dirs(pod, volumes_root, pod_dir)
                    init = next(
                        c
                        for c in pod["spec"]["initContainers"]
                        if c["name"] == "storage-initializer"
                    )
                    mounts = {m["mountPath"]: volume_dirs[m["name"]] for m in init["volumeMounts"]}
                    env = _resolve_env(init, {("hf-secret", "HF_TOKEN"): TOKEN})
                    env = {k: _translate(v, mounts) for k, v in env.items()}
                    env.update(hub.env(home=str(pod_dir / "hf-home")))
                    env["HF_ENDPOINT"] = origin.url
                    env["POD_NAME"] = pod["metadata"]["name"]
                    termination = pod_dir / "termination-log"
                    termination.touch()  # the kubelet creates it
                    env["STORAGE_INITIALIZER_TERMINATION_LOG"] = str(termination)
                    assert CONFIG_MOUNT in mounts
                    env["STORAGE_INITIALIZER_CONFIG"] = _translate(
                        CONFIG_MOUNT + "/config.yaml", mounts
                    )
                    argvs.append(entrypoint_argv(*(_translate(a, mounts) for a in init["args"])))
                    envs.append(clean_env(env))
                    expectations.append(
                        (
                            pod["metadata"]["name"],
                            termination,
                            [
                                (Path(_translate(path, mounts)), BASE if i == 0 else ADAPTER)
                                for i, (_uri, path) in enumerate(llmisvc_pairs(llmisvc))
                            ],
                        )
                    )
            assert len(argvs) >= 12, "fewer pods than the examples promise"
            procs = []
            for argv, env in zip(argvs, envs, strict=True):
                procs += start_all([argv], env, tmp_path / "logs")
            runs = wait_all(procs, timeout=300)
            origin_bytes = origin.bytes_served(method="GET", path_contains="/resolve/")
    finally:
        hub.stop()

    for run, (pod_name, termination, dests) in zip(runs, expectations, strict=True):
        assert run.returncode == 0, f"{pod_name}: {run.describe()}"
        for dest, files in dests:
            for file_name, data in files.items():
                assert (dest / file_name).read_bytes() == data, f"{pod_name}: {dest / file_name}"
        result = json.loads(termination.read_text())
        assert result["outcome"] == "ok" and result["models"] == len(dests)
        assert TOKEN not in run.output and TOKEN not in termination.read_text()

    models = sum(len(v) for files in repos.values() for v in files.values())
    assert origin_bytes == models, f"origin served {origin_bytes / models:.2f}x the models"
    # One shared volume holds each model once: one cache entry per repo.
    cache = volumes_root / "pvc" / "model-cache"
    assert len([p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")]) == len(
        repos
    )


def test_without_the_token_the_private_model_fails_with_one_clear_line(tmp_path: Path) -> None:
    """The HF_TOKEN mapping is what lets the init container read a private model: a pod whose
    namespace lacks hf-secret (optional: true, so the variable is absent) fails, and says so."""
    llmisvc = next(iter(_llmisvcs().values()))
    uri = llmisvc_pairs(llmisvc)[0][0]
    hub = start_hub()
    try:
        hub.add_repo(uri.removeprefix("hf://"), readers=(TOKEN,)).add_commit(BASE)
        env = clean_env(hub.env(home=str(tmp_path / "hf-home")))
        env["STORAGE_INITIALIZER_TERMINATION_LOG"] = str(tmp_path / "termination-log")
        run = wait_all(start_all([entrypoint_argv(uri, tmp_path / "m")], env, tmp_path))[0]
    finally:
        hub.stop()
    assert run.returncode == 1
    assert uri in run.last_line
    assert "HF_TOKEN" in run.last_line, run.last_line
    assert json.loads((tmp_path / "termination-log").read_text())["outcome"] == "failed"


def test_examples_read_the_one_hf_secret() -> None:
    """The examples' docs name the secret the pods read: the same in every file."""
    names = set()
    for llmisvc in _llmisvcs().values():
        text = yaml.safe_dump(llmisvc)
        names.update(n for n in ("hf-secret", "hf-token") if n in text)
    assert names == {"hf-secret"}
