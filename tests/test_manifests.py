"""Offline validation of every manifest under ``deploy/``.

- Core kinds (ConfigMap, PersistentVolumeClaim, Job, and the Pods KServe would build) are
  validated with ``kubernetes-validate --strict`` schemas (unknown fields rejected).
- KServe kinds (ClusterStorageContainer, InferenceService) are validated against the CRD
  openAPIV3 schemas vendored in ``tests/data/kserve-reference/``, made strict the same way.
- The ``inferenceservice-config`` patches keep every field of KServe's value.
- The wiring the docs describe holds: KServe's injection is simulated (its strategic merge of
  the ClusterStorageContainer into the init container), and the resulting pods are validated,
  their volume references resolved, and the env/annotation/config values checked against what
  the tool's settings make of them.
- LLMInferenceServices are validated against their CRD, and the pods KServe's llmisvc
  controller builds from them (workload_storage.go: one storage-initializer per pod template,
  LoRA pairs in the same container, the user's override merged in) are validated strictly.
- Each kustomization builds with ``kubectl kustomize`` when kubectl is on the machine.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DOCS = REPO / "docs" / "kubernetes.md"
#: KServe's CRDs and default config, vendored unchanged (see its README.md for the source).
REFERENCE = REPO / "tests" / "data" / "kserve-reference"

#: Oldest Kubernetes minor KServe's current releases support, and the newest schema bundled.
K8S_VERSIONS = ("1.29.0", "latest")
#: KServe's limits for the storage-initializer (inferenceservice-config / default.yaml).
KSERVE_LIMITS = {"cpu": "1", "memory": "1Gi"}
KSERVE_REQUESTS = {"cpu": "100m", "memory": "100Mi"}

READONLY_ANNOTATION = "storage.kserve.io/readonly"
READONLY_FIELDPATH = f"metadata.annotations['{READONLY_ANNOTATION}']"
CACHE_MOUNT = "/mnt/model-cache"
CONFIG_MOUNT = "/etc/storage-initializer"
MODEL_MOUNT = "/mnt/models"
KSERVE_SHARED_VOLUME = "kserve-provision-location"
KSERVE_INTERNAL_KEYS = (
    "modelFormat",
    "storageUri",
    "storage",
    "runtime",
    "runtimeVersion",
    "protocolVersion",
)
#: Files under deploy/ that are applied with `kubectl patch`, not through kustomize.
KUBECTL_PATCH_FILES = {"cluster/disable-default-patch.yaml"}

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def _load_all(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as handle:
        return [doc for doc in yaml.load_all(handle, Loader=_Loader) if doc is not None]


def _rel(path: Path) -> str:
    return path.relative_to(DEPLOY).as_posix()


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def _is_kustomize_file(path: Path, doc: Any) -> bool:
    if path.name in ("kustomization.yaml", "kustomization.yml", "kustomizeconfig.yaml"):
        return True
    return isinstance(doc, dict) and str(doc.get("apiVersion", "")).startswith(
        "kustomize.config.k8s.io/"
    )


def _patch_files() -> set[str]:
    """Files referenced as patches by some kustomization (relative to deploy/)."""
    names = set(KUBECTL_PATCH_FILES)
    for kustomization in DEPLOY.rglob("kustomization.yaml"):
        data = _load_all(kustomization)[0]
        for patch in data.get("patches", []) or []:
            if isinstance(patch, dict) and "path" in patch:
                names.add(_rel((kustomization.parent / patch["path"]).resolve()))
    return names


def _resources() -> list[tuple[str, dict[str, Any]]]:
    """(file, document) for every Kubernetes object under deploy/ that is not a patch."""
    patches = _patch_files()
    found = []
    for path in _yaml_files():
        docs = _load_all(path)
        if _rel(path) in patches or any(_is_kustomize_file(path, d) for d in docs):
            continue
        for doc in docs:
            found.append((_rel(path), doc))
    return found


def _by_kind(kind: str) -> list[tuple[str, dict[str, Any]]]:
    return [(name, doc) for name, doc in _resources() if doc.get("kind") == kind]


def _one(path: str) -> dict[str, Any]:
    docs = _load_all(DEPLOY / path)
    assert len(docs) == 1, f"{path}: expected one document"
    return docs[0]


@functools.cache
def _reference(name: str) -> list[Any]:
    return _load_all(REFERENCE / name)


def test_vendored_kserve_reference_is_unchanged() -> None:
    """The vendored KServe files are the upstream bytes its README lists (an edited CRD would
    let a wrong manifest pass), and every file the tests read is there."""
    listed = dict(
        re.findall(
            r"^\| (\S+\.yaml) \|.*\| ([0-9a-f]{64}) \|$",
            (REFERENCE / "README.md").read_text(),
            re.MULTILINE,
        )
    )
    present = {p.name for p in REFERENCE.glob("*.yaml")}
    assert present == set(listed), "tests/data/kserve-reference/README.md lists other files"
    for name, digest in listed.items():
        assert hashlib.sha256((REFERENCE / name).read_bytes()).hexdigest() == digest, name


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------


def _k8s_validate(doc: dict[str, Any], version: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    if version == "latest":
        version = kubernetes_validate.latest_version()
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        raise AssertionError(
            f"{doc['kind']} {doc['metadata'].get('name')}: {exc.message} "
            f"at {'.'.join(str(p) for p in exc.path)} (Kubernetes {version}, strict)"
        ) from None


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields rejected, as the API server's pruning would drop
    them silently (a typo such as ``volumeMount`` would otherwise pass unnoticed)."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: _strict(value) for key, value in schema.items()}
    if (
        "properties" in result
        and "additionalProperties" not in result
        and not result.get("x-kubernetes-preserve-unknown-fields")
    ):
        result["additionalProperties"] = False
    return result


@functools.cache
def _crd_validator(kind: str) -> Any:
    import jsonschema

    files = {
        "ClusterStorageContainer": "serving.kserve.io_clusterstoragecontainers.yaml",
        "InferenceService": "serving.kserve.io_inferenceservices.yaml",
        "LLMInferenceService": "serving.kserve.io_llminferenceservices.yaml",
    }
    crd = _reference(files[kind])[0]
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    schema = _strict(version["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema), f"{crd['spec']['group']}/{version['name']}"


def _crd_errors(doc: dict[str, Any]) -> list[str]:
    validator, api_version = _crd_validator(doc["kind"])
    errors = [f"apiVersion {doc.get('apiVersion')} is not {api_version}"] * (
        doc.get("apiVersion") != api_version
    )
    for error in sorted(validator.iter_errors(doc), key=lambda e: list(e.path)):
        errors.append(f"{'.'.join(str(p) for p in error.path) or '<root>'}: {error.message}")
    name = doc.get("metadata", {}).get("name", "")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
        errors.append(f"metadata.name {name!r} is not a DNS-1123 label")
    return errors


def _quantity(value: str | int | float) -> float:
    """A Kubernetes quantity as a number (cores for CPU, bytes for memory)."""
    text = str(value)
    suffixes = {
        "m": 1e-3,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
    }
    for suffix, factor in sorted(suffixes.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def _json6902(doc: dict[str, Any], operations: list[dict[str, Any]]) -> dict[str, Any]:
    """Apply the ``add``/``replace`` operations of an RFC 6902 patch (all that deploy/ uses)."""
    result = copy.deepcopy(doc)
    for operation in operations:
        assert operation["op"] in ("add", "replace"), f"unsupported op {operation['op']}"
        *parents, last = operation["path"].lstrip("/").split("/")
        target: Any = result
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        value = copy.deepcopy(operation["value"])
        if isinstance(target, list):
            if last == "-":
                target.append(value)
            else:
                target.insert(int(last), value)
        else:
            if operation["op"] == "replace":
                assert last in target, f"replace of missing {operation['path']}"
            target[last] = value
    return result


def _merge_list(base: list[Any], patch: list[Any], key: str) -> list[Any]:
    merged = [copy.deepcopy(item) for item in base]
    for item in patch:
        for index, existing in enumerate(merged):
            if existing.get(key) == item.get(key):
                merged[index] = _strategic_merge(existing, item)
                break
        else:
            merged.append(copy.deepcopy(item))
    return merged


#: Merge keys of corev1.Container lists (patchMergeKey in k8s.io/api).
_CONTAINER_MERGE_KEYS = {"env": "name", "volumeMounts": "mountPath", "ports": "containerPort"}


def _strategic_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """What KServe's mergeContainerSpecs does (strategicpatch over corev1.Container): maps
    merge recursively, env merges by name, volumeMounts by mountPath, other lists replace."""
    merged = copy.deepcopy(base)
    for key, value in patch.items():
        if key in _CONTAINER_MERGE_KEYS and isinstance(value, list):
            merged[key] = _merge_list(merged.get(key, []), value, _CONTAINER_MERGE_KEYS[key])
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _strategic_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _uri_claimed(csc: dict[str, Any], uri: str) -> bool:
    """KServe's IsStorageUriSupported: a prefix match or a regexp.MatchString (search)."""
    for fmt in csc["spec"]["supportedUriFormats"]:
        if "prefix" in fmt and uri.startswith(fmt["prefix"]):
            return True
        if "regex" in fmt and re.search(fmt["regex"], uri):
            return True
    return False


def _kserve_pod(isvc: dict[str, Any], csc: dict[str, Any] | None) -> dict[str, Any]:
    """The predictor pod as KServe's webhook builds it (storage_initializer_injector.go):
    the shared emptyDir kserve-provision-location at /mnt/models, the init container from the
    storageInitializer config with [uri, /mnt/models] as args, then merged with the
    ClusterStorageContainer that claims the URI."""
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    uri = model["storageUri"]
    annotations = dict(isvc["metadata"].get("annotations", {}))
    annotations.update(predictor.get("annotations", {}))
    annotations["internal.serving.kserve.io/storage-initializer-sourceuri"] = uri
    readonly = annotations.get(READONLY_ANNOTATION) != "false"

    container = {k: copy.deepcopy(v) for k, v in model.items() if k not in KSERVE_INTERNAL_KEYS}
    container.update(name="kserve-container", image="kserve/runtime:v0.15.0")
    container.setdefault("volumeMounts", []).append(
        {"name": KSERVE_SHARED_VOLUME, "mountPath": MODEL_MOUNT, "readOnly": readonly}
    )
    init = {
        "name": "storage-initializer",
        "image": "kserve/storage-initializer:v0.15.0",
        "args": [uri, MODEL_MOUNT],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [{"name": KSERVE_SHARED_VOLUME, "mountPath": MODEL_MOUNT}],
        "resources": {"limits": dict(KSERVE_LIMITS), "requests": dict(KSERVE_REQUESTS)},
    }
    if csc is not None:
        init = _strategic_merge(init, csc["spec"]["container"])
    volumes = copy.deepcopy(predictor.get("volumes", []))
    volumes.append({"name": KSERVE_SHARED_VOLUME, "emptyDir": {}})
    spec: dict[str, Any] = {"initContainers": [init], "containers": [container], "volumes": volumes}
    if "serviceAccountName" in predictor:
        spec["serviceAccountName"] = predictor["serviceAccountName"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{isvc['metadata']['name']}-predictor-0", "annotations": annotations},
        "spec": spec,
    }


def _dangling_mounts(pod_spec: dict[str, Any]) -> list[str]:
    """The API server's check that JSON schemas cannot express: every volumeMount names a
    volume of the pod."""
    volumes = {v["name"] for v in pod_spec.get("volumes", [])}
    return [
        f"{c['name']}: {m['name']} at {m['mountPath']}"
        for c in pod_spec.get("initContainers", []) + pod_spec.get("containers", [])
        for m in c.get("volumeMounts", [])
        if m["name"] not in volumes
    ]


def _env(container: dict[str, Any], pod: dict[str, Any] | None = None) -> dict[str, str]:
    """The container's environment as the kubelet resolves it (literal values and downward-API
    annotations; an absent annotation resolves to the empty string)."""
    result = {}
    for item in container.get("env", []):
        if "value" in item:
            result[item["name"]] = item["value"]
            continue
        field = item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath", "")
        match = re.fullmatch(r"metadata\.annotations\['([^']+)'\]", field)
        if match and pod is not None:
            result[item["name"]] = pod["metadata"].get("annotations", {}).get(match[1], "")
    return result


def _csc(path: str) -> dict[str, Any]:
    return _one(path)


def _shared_cache_csc() -> dict[str, Any]:
    base = _csc("cluster/clusterstoragecontainer.yaml")
    return _json6902(base, _one("cluster-shared-cache/shared-cache-patch.yaml"))


def _examples() -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in _by_kind("InferenceService")}


def _config_file() -> dict[str, Any]:
    return yaml.safe_load(_one("namespace/configmap.yaml")["data"]["config.yaml"])


# --------------------------------------------------------------------------------------------
# inventory and syntax
# --------------------------------------------------------------------------------------------


def test_deploy_has_every_promised_manifest() -> None:
    kinds = {doc.get("kind") for _, doc in _resources()}
    assert {
        "ClusterStorageContainer",
        "ConfigMap",
        "PersistentVolumeClaim",
        "InferenceService",
        "Job",
        "LLMInferenceService",
        "DaemonSet",
    } <= kinds
    assert (DEPLOY / "kserve-config/storage-initializer/storage-initializer-patch.yaml").is_file()
    assert (DEPLOY / "kserve-config/localmodel/localmodel-patch.yaml").is_file()


@pytest.mark.parametrize("path", _yaml_files(), ids=_rel)
def test_yaml_parses_and_objects_are_complete(path: Path) -> None:
    docs = _load_all(path)
    assert docs, f"{_rel(path)} is empty"
    if _rel(path) in _patch_files() or any(_is_kustomize_file(path, d) for d in docs):
        return
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{_rel(path)}: incomplete object"
        assert "namespace" not in doc["metadata"], (
            f"{_rel(path)}: leave the namespace to `kubectl -n` / kustomize"
        )


def test_every_file_is_reachable_from_a_kustomization() -> None:
    referenced: set[str] = set(KUBECTL_PATCH_FILES)
    for kustomization in DEPLOY.rglob("kustomization.yaml"):
        referenced.add(_rel(kustomization))
        data = _load_all(kustomization)[0]
        entries = list(data.get("resources", []) or []) + list(data.get("configurations", []) or [])
        entries += [p["path"] for p in data.get("patches", []) or [] if "path" in p]
        for entry in entries:
            target = (kustomization.parent / entry).resolve()
            assert target.exists(), f"{_rel(kustomization)} refers to missing {entry}"
            if target.is_file():
                referenced.add(_rel(target))
    orphans = [_rel(p) for p in _yaml_files() if _rel(p) not in referenced]
    assert not orphans, f"not referenced by any kustomization: {orphans}"


# --------------------------------------------------------------------------------------------
# core kinds: kubernetes-validate --strict
# --------------------------------------------------------------------------------------------


def _is_core(doc: dict[str, Any]) -> bool:
    """Kinds kubernetes-validate knows: the core and named groups of Kubernetes itself
    (apps, batch, rbac.authorization.k8s.io...), not CRDs (serving.kserve.io)."""
    group = str(doc.get("apiVersion", "")).rpartition("/")[0]
    return "." not in group or group.endswith(".k8s.io")


CORE = [(n, d) for n, d in _resources() if _is_core(d)]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(
    ("name", "doc"), CORE, ids=[f"{n}:{d['kind']}/{d['metadata']['name']}" for n, d in CORE]
)
def test_core_kinds_validate_strict(name: str, doc: dict[str, Any], version: str) -> None:
    _k8s_validate(doc, version)


@pytest.mark.parametrize(
    "path",
    [
        "kserve-config/storage-initializer/storage-initializer-patch.yaml",
        "kserve-config/localmodel/localmodel-patch.yaml",
    ],
)
def test_configmap_patches_validate_strict(path: str) -> None:
    _k8s_validate(_one(path), "latest")


def test_kubernetes_validate_cli_strict() -> None:
    """The command-line tool itself, as a user would run it, on the core-kind files."""
    exe = shutil.which("kubernetes-validate")
    if exe is None:
        pytest.skip("kubernetes-validate is not installed (pip install kubernetes-validate)")
    files = sorted({str(DEPLOY / name) for name, _ in CORE})
    result = subprocess.run(
        [exe, "--strict", "--quiet", "-k", "1.29.0", *files],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------------
# KServe kinds: the CRD schemas
# --------------------------------------------------------------------------------------------

KSERVE_KINDS = ("ClusterStorageContainer", "InferenceService", "LLMInferenceService")


@pytest.mark.parametrize(
    ("name", "doc"),
    [(n, d) for n, d in _resources() if d.get("kind") in KSERVE_KINDS],
    ids=[f"{n}:{d['metadata']['name']}" for n, d in _resources() if d.get("kind") in KSERVE_KINDS],
)
def test_kserve_kinds_validate_against_crd(name: str, doc: dict[str, Any]) -> None:
    assert not _crd_errors(doc), f"{name}: {_crd_errors(doc)}"


def test_shared_cache_overlay_validates_against_crd() -> None:
    assert not _crd_errors(_shared_cache_csc())


def test_disable_default_patch_keeps_kserve_default_valid() -> None:
    default = _reference("default.yaml")[0]
    patched = {**copy.deepcopy(default), **_one("cluster/disable-default-patch.yaml")}
    assert patched["disabled"] is True
    assert not _crd_errors(patched)


def test_strict_crd_schema_rejects_what_a_csc_cannot_hold() -> None:
    """The schema check is not vacuous: a ClusterStorageContainer cannot declare volumes (so the
    pod must), and a misspelt field is caught."""
    csc = _shared_cache_csc()
    with_volumes = copy.deepcopy(csc)
    with_volumes["spec"]["container"]["volumes"] = [{"name": "model-cache", "emptyDir": {}}]
    assert any("volumes" in e for e in _crd_errors(with_volumes))
    typo = copy.deepcopy(csc)
    typo["spec"]["supportedUriFormat"] = typo["spec"].pop("supportedUriFormats")
    assert _crd_errors(typo)


# --------------------------------------------------------------------------------------------
# the ClusterStorageContainers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["cluster/clusterstoragecontainer.yaml", "cluster/clusterstoragecontainer-localmodel.yaml"],
)
def test_csc_claims_every_uri_format_of_kserve_default(path: str) -> None:
    default = _reference("default.yaml")[0]
    ours = _csc(path)["spec"]["supportedUriFormats"]
    missing = [fmt for fmt in default["spec"]["supportedUriFormats"] if fmt not in ours]
    assert not missing, f"{path} does not claim {missing}"
    for fmt in ours:
        if "regex" in fmt:
            re.compile(fmt["regex"])


def test_csc_contract_fields() -> None:
    csc = _csc("cluster/clusterstoragecontainer.yaml")
    spec = csc["spec"]
    assert spec["workloadType"] == "initContainer"
    assert spec["supportsMultiModelDownload"] is True
    assert spec["container"]["name"] == "storage-initializer", "KServe finds it by this name"
    assert "args" not in spec["container"] and "command" not in spec["container"], (
        "KServe passes the URI pairs as args to the image's entrypoint; do not override them"
    )
    localmodel = _csc("cluster/clusterstoragecontainer-localmodel.yaml")["spec"]
    assert localmodel["workloadType"] == "localModelDownloadJob"


@pytest.mark.parametrize(
    "path",
    ["cluster/clusterstoragecontainer.yaml", "cluster/clusterstoragecontainer-localmodel.yaml"],
)
def test_csc_resources_within_kserve_defaults(path: str) -> None:
    resources = _csc(path)["spec"]["container"]["resources"]
    for name, limit in KSERVE_LIMITS.items():
        assert _quantity(resources["limits"][name]) <= _quantity(limit)
        assert _quantity(resources["requests"][name]) <= _quantity(resources["limits"][name])
        assert _quantity(resources["requests"][name]) >= _quantity(KSERVE_REQUESTS[name])


def test_csc_readonly_env_comes_from_the_annotation() -> None:
    for csc in (_csc("cluster/clusterstoragecontainer.yaml"), _shared_cache_csc()):
        env = {e["name"]: e for e in csc["spec"]["container"]["env"]}
        assert env["STORAGE_READONLY"]["valueFrom"]["fieldRef"]["fieldPath"] == READONLY_FIELDPATH


def test_direct_csc_mounts_nothing_shared_cache_csc_mounts_cache_and_config() -> None:
    assert "volumeMounts" not in _csc("cluster/clusterstoragecontainer.yaml")["spec"]["container"]
    container = _shared_cache_csc()["spec"]["container"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["model-cache"]["mountPath"] == CACHE_MOUNT
    assert not mounts["model-cache"].get("readOnly", False)
    assert mounts["storage-initializer-config"]["mountPath"] == CONFIG_MOUNT
    assert mounts["storage-initializer-config"]["readOnly"] is True
    env = _env(container)
    assert env["STORAGE_INITIALIZER_CACHE_DIR"] == CACHE_MOUNT
    assert "STORAGE_INITIALIZER_CONFIG" not in env, (
        "an explicit config path makes a missing (optional) ConfigMap an error"
    )


def test_images_are_pinned_and_consistent() -> None:
    images: list[tuple[str, str]] = []
    for path in _yaml_files():
        text = path.read_text(encoding="utf-8")
        images += [(_rel(path), m) for m in re.findall(r"^\s*image:\s*(\S+)", text, re.M)]
        for doc in _load_all(path):
            for key in ("storageInitializer", "localModel"):
                data = (doc.get("data") or {}) if isinstance(doc, dict) else {}
                if key in data:
                    value = json.loads(data[key])
                    images.append((_rel(path), value.get("image") or value["defaultJobImage"]))
    ours = {image for _, image in images if "storage-initializer" in image}
    assert ours, "no storage-initializer image reference found"
    assert len(ours) == 1, f"different storage-initializer images: {sorted(ours)}"
    for where, image in images:
        name, _, tag = image.rpartition(":")
        assert name and tag and "/" not in tag, f"{where}: image {image} has no tag"
        assert tag != "latest", f"{where}: image {image} uses the latest tag"


# --------------------------------------------------------------------------------------------
# the inferenceservice-config patches
# --------------------------------------------------------------------------------------------


def _kserve_configmap() -> dict[str, Any]:
    return _reference("inferenceservice.yaml")[0]


@pytest.mark.parametrize(
    ("path", "key", "image_field"),
    [
        (
            "kserve-config/storage-initializer/storage-initializer-patch.yaml",
            "storageInitializer",
            "image",
        ),
        ("kserve-config/localmodel/localmodel-patch.yaml", "localModel", "defaultJobImage"),
    ],
)
def test_configmap_patch_keeps_every_kserve_field(path: str, key: str, image_field: str) -> None:
    patch = _one(path)
    reference = _kserve_configmap()
    assert (patch["metadata"]["name"], patch["metadata"]["namespace"]) == (
        reference["metadata"]["name"],
        reference["metadata"]["namespace"],
    )
    assert set(patch["data"]) == {key}, "touch only the one key"
    ours = json.loads(patch["data"][key])
    stock = json.loads(reference["data"][key])
    assert set(ours) == set(stock), f"fields differ: {set(ours) ^ set(stock)}"
    changed = {field for field in stock if ours[field] != stock[field]}
    assert changed == {image_field}, f"only {image_field} may change, changed: {changed}"
    assert "storage-initializer" in ours[image_field]
    if key == "storageInitializer":
        for field in ("memoryRequest", "memoryLimit", "cpuRequest", "cpuLimit"):
            _quantity(ours[field])  # KServe's webhook fails on an unparsable quantity


def test_configmap_patch_applies_to_kserve_configmap() -> None:
    """A strategic merge of a ConfigMap replaces data keys one by one: after the patch every
    other key of inferenceservice-config is untouched."""
    reference = _kserve_configmap()
    patch = _one("kserve-config/storage-initializer/storage-initializer-patch.yaml")
    merged = copy.deepcopy(reference)
    merged["data"].update(patch["data"])
    for key, value in reference["data"].items():
        if key != "storageInitializer":
            assert merged["data"][key] == value
    _k8s_validate(merged, "latest")


# --------------------------------------------------------------------------------------------
# wiring: the pods KServe builds from the examples
# --------------------------------------------------------------------------------------------


def _pods() -> Iterator[tuple[str, dict[str, Any], dict[str, Any] | None]]:
    examples = _examples()
    yield "qwen-shared-cache", examples["qwen-shared-cache"], _shared_cache_csc()
    yield (
        "sklearn-iris-direct",
        examples["sklearn-iris-direct"],
        _csc("cluster/clusterstoragecontainer.yaml"),
    )
    # pvc:// is claimed by no ClusterStorageContainer: the inferenceservice-config image.
    yield "qwen-preseeded-pvc", examples["qwen-preseeded-pvc"], None


@pytest.mark.parametrize(("name", "isvc", "csc"), list(_pods()), ids=[p[0] for p in _pods()])
def test_kserve_built_pod_is_valid(
    name: str, isvc: dict[str, Any], csc: dict[str, Any] | None
) -> None:
    uri = isvc["spec"]["predictor"]["model"]["storageUri"]
    if csc is not None:
        assert _uri_claimed(csc, uri), f"{uri} is not claimed by the ClusterStorageContainer"
    else:
        direct = _csc("cluster/clusterstoragecontainer.yaml")
        assert not _uri_claimed(direct, uri.replace("pvc://", "/mnt/pvc/", 1))
        return
    pod = _kserve_pod(isvc, csc)
    assert not _dangling_mounts(pod["spec"]), _dangling_mounts(pod["spec"])
    for version in K8S_VERSIONS:
        _k8s_validate(pod, version)


def test_shared_cache_csc_breaks_pods_without_the_volumes() -> None:
    """Why the shared-cache variant is opt-in: with it, a pod that does not declare the
    volumes is invalid (the API server rejects it) — as docs/kubernetes.md says."""
    pod = _kserve_pod(_examples()["sklearn-iris-direct"], _shared_cache_csc())
    assert {m.split(":")[1].split()[0] for m in _dangling_mounts(pod["spec"])} == {
        "model-cache",
        "storage-initializer-config",
    }


def test_shared_cache_paths_agree_everywhere() -> None:
    """The symlinks point into the cache at the path the init container sees; the model
    container must see the same PVC at the same path, and the config must agree."""
    isvc = _examples()["qwen-shared-cache"]
    csc = _shared_cache_csc()
    pod = _kserve_pod(isvc, csc)
    init, model = pod["spec"]["initContainers"][0], pod["spec"]["containers"][0]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}

    def claim_mounts(container: dict[str, Any]) -> dict[str, str]:
        return {
            volumes[m["name"]]["persistentVolumeClaim"]["claimName"]: m["mountPath"]
            for m in container["volumeMounts"]
            if "persistentVolumeClaim" in volumes[m["name"]]
        }

    pvc = _one("namespace/pvc.yaml")
    assert claim_mounts(init) == claim_mounts(model) == {pvc["metadata"]["name"]: CACHE_MOUNT}
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    assert _env(init, pod)["STORAGE_INITIALIZER_CACHE_DIR"] == CACHE_MOUNT
    assert _config_file()["cache_dir"] == CACHE_MOUNT
    config_volume = volumes["storage-initializer-config"]["configMap"]
    assert config_volume["name"] == _one("namespace/configmap.yaml")["metadata"]["name"]
    assert config_volume.get("optional") is True
    # KServe's own mount of /mnt/models survives the merge with the CSC's mounts.
    assert {m["mountPath"] for m in init["volumeMounts"]} == {
        MODEL_MOUNT,
        CACHE_MOUNT,
        CONFIG_MOUNT,
    }


@pytest.mark.parametrize(
    ("name", "expected"), [("qwen-shared-cache", "true"), ("sklearn-iris-direct", "false")]
)
def test_readonly_annotation_reaches_the_init_container(name: str, expected: str) -> None:
    isvc = _examples()[name]
    csc = (
        _shared_cache_csc()
        if name == "qwen-shared-cache"
        else _csc("cluster/clusterstoragecontainer.yaml")
    )
    pod = _kserve_pod(isvc, csc)
    assert _env(pod["spec"]["initContainers"][0], pod)["STORAGE_READONLY"] == expected


def test_preseed_jobs_mount_what_they_write() -> None:
    jobs = _by_kind("Job")
    assert {job["spec"]["template"]["spec"]["containers"][0]["args"][0] for _, job in jobs} == {
        "pull",
        "prefetch",
    }
    for name, job in jobs:
        pod = job["spec"]["template"]["spec"]
        assert not _dangling_mounts(pod), f"{name}: {_dangling_mounts(pod)}"
        container = pod["containers"][0]
        assert container["command"] == ["storage-initializer"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        mounts = [m["mountPath"] for m in container["volumeMounts"]]
        assert "/tmp" in mounts, f"{name}: readOnlyRootFilesystem needs a writable /tmp"
        if container["args"][0] == "prefetch":
            continue  # what it writes is in its models.yaml: see the prefetch tests below
        positional = [a for a in container["args"] if not a.startswith("--")]
        assert positional[0] == "pull" and len(positional) == 3
        mounts = [m["mountPath"] for m in container["volumeMounts"]]
        env = _env(container)
        cache = env.get("STORAGE_INITIALIZER_CACHE_DIR")
        target = cache or positional[2]
        assert any(target == m or target.startswith(m + "/") for m in mounts), (
            f"{name}: {target} is not on a mounted volume"
        )
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert "/tmp" in mounts, f"{name}: readOnlyRootFilesystem needs a writable /tmp"


def test_preseeded_cache_uri_matches_the_cache_mode_example() -> None:
    job = _one("examples/preseed-job.yaml")
    isvc = _examples()["qwen-shared-cache"]
    assert (
        job["spec"]["template"]["spec"]["containers"][0]["args"][1]
        == (isvc["spec"]["predictor"]["model"]["storageUri"])
    )


def test_preseeded_pvc_path_matches_the_pvc_example() -> None:
    job = _one("examples/preseed-job-pvc.yaml")
    spec = job["spec"]["template"]["spec"]
    container = spec["containers"][0]
    target = [a for a in container["args"] if not a.startswith("--")][2]
    mount = next(m for m in container["volumeMounts"] if target.startswith(m["mountPath"]))
    claim = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    claim_name = claim["persistentVolumeClaim"]["claimName"]
    path = target[len(mount["mountPath"]) :]
    uri = _examples()["qwen-preseeded-pvc"]["spec"]["predictor"]["model"]["storageUri"]
    assert uri == f"pvc://{claim_name}{path}"


PREFETCH_JOB = "examples/prefetch-job.yaml"


def _prefetch_models_file() -> tuple[dict[str, Any], str, str]:
    """The prefetch Job's container, the path of its --from-file, and that file's text as the
    kubelet would project it from the ConfigMap the Job mounts there."""
    job = _one(PREFETCH_JOB)
    spec = job["spec"]["template"]["spec"]
    container = spec["containers"][0]
    args = container["args"]
    assert args[:2] == ["prefetch", "--from-file"] and len(args) == 3, args
    path = args[2]
    directory, _, key = path.rpartition("/")
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == directory)
    assert not mount.get("subPath"), "a whole ConfigMap volume, so edits reach the Job"
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    name = volume["configMap"]["name"]
    assert not volume["configMap"].get("optional"), "the Job is pointless without its list"
    items = volume["configMap"].get("items")
    if items:
        key = next(i["key"] for i in items if i["path"] == key)
    configmaps = {d["metadata"]["name"]: d for _, d in _by_kind("ConfigMap")}
    assert name in configmaps, f"the Job mounts ConfigMap {name}, which deploy/ does not define"
    data = configmaps[name]["data"]
    assert key in data, f"ConfigMap {name} has no key {key}"
    return container, path, data[key]


def _under_a_mount(container: dict[str, Any], path: str) -> dict[str, Any] | None:
    return next(
        (
            m
            for m in container["volumeMounts"]
            if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
        ),
        None,
    )


def test_prefetch_models_file_loads_with_the_real_loader(tmp_path: Path) -> None:
    """models.yaml of the ConfigMap, read by storage_initializer.prefetch.load_file and each
    model's settings by the tool's settings module, with the global config file the Job also
    mounts: every model lands on a volume of the Job, in the mode the examples serve it in."""
    prefetch = pytest.importorskip("storage_initializer.prefetch")
    settings = pytest.importorskip("storage_initializer.settings")
    container, _path, text = _prefetch_models_file()
    models = tmp_path / "models.yaml"
    models.write_text(text, encoding="utf-8")
    items, parallel, defaults = prefetch.load_file(models)
    assert items and parallel >= 1
    config = tmp_path / "config.yaml"
    config.write_text(_one("namespace/configmap.yaml")["data"]["config.yaml"], encoding="utf-8")
    environ = {"STORAGE_INITIALIZER_CONFIG": str(config)}
    spec = _one(PREFETCH_JOB)["spec"]["template"]["spec"]
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in spec["volumes"]
        if "persistentVolumeClaim" in v
    }
    cached, direct = set(), set()
    for item in items:
        loaded = settings.load({**defaults, **item.options}, environ)
        target = item.dest or (loaded.cache_dirs[0] if loaded.cache_dirs else None)
        assert target, f"{item.uri}: no dest and no cache_dir"
        mount = _under_a_mount(container, target)
        assert mount is not None, f"{item.uri}: {target} is not on a volume of the Job"
        assert mount["name"] in claims, f"{item.uri}: {target} is not on the PVC"
        if item.dest is None:
            assert loaded.cache_dirs == (CACHE_MOUNT,)
            cached.add(item.uri)
        else:
            assert loaded.cache_dirs == (), f"{item.uri}: dest {item.dest} would be cache mode"
            rest = item.dest[len(mount["mountPath"]) :]
            direct.add(f"pvc://{claims[mount['name']]}{rest}")
    examples = _examples()
    assert examples["qwen-shared-cache"]["spec"]["predictor"]["model"]["storageUri"] in cached
    assert examples["qwen-preseeded-pvc"]["spec"]["predictor"]["model"]["storageUri"] in direct


def test_prefetch_loader_rejects_a_broken_models_file(tmp_path: Path) -> None:
    """The check above is not vacuous: the same loader refuses a misspelt option."""
    prefetch = pytest.importorskip("storage_initializer.prefetch")
    errors = pytest.importorskip("storage_initializer.errors")
    _container, _path, text = _prefetch_models_file()
    broken = tmp_path / "models.yaml"
    broken.write_text(text.replace("cache_dir:", "cache_dri:", 1), encoding="utf-8")
    with pytest.raises(errors.UsageError, match="cache_dri"):
        prefetch.load_file(broken)


# --------------------------------------------------------------------------------------------
# what the tool makes of these values (its settings module)
# --------------------------------------------------------------------------------------------


def _settings(environ: dict[str, str], tmp_path: Path) -> Any:
    settings = pytest.importorskip("storage_initializer.settings")
    config = tmp_path / "config.yaml"
    config.write_text(_one("namespace/configmap.yaml")["data"]["config.yaml"], encoding="utf-8")
    return settings.load(environ={"STORAGE_INITIALIZER_CONFIG": str(config), **environ})


def test_global_config_file_is_understood_by_the_tool(tmp_path: Path) -> None:
    loaded = _settings({}, tmp_path)
    config = _config_file()
    assert loaded.read_only is True
    assert loaded.cache_dirs == (config["cache_dir"],)
    assert loaded.link_mode == config["link_mode"]
    assert loaded.stale_after == config["stale_after"]
    assert loaded.workers == config["workers"]


@pytest.mark.parametrize(
    ("annotation", "read_only"),
    [
        pytest.param("false", False, id="annotation-false"),
        pytest.param("true", True, id="annotation-true"),
        pytest.param(
            "",
            True,
            id="annotation-absent",
        ),
    ],
)
def test_readonly_annotation_semantics(annotation: str, read_only: bool, tmp_path: Path) -> None:
    """KServe's rule: only "false" makes the mount writable. The downward API turns an absent
    annotation into an empty STORAGE_READONLY, which must keep the read-only default."""
    assert _settings({"STORAGE_READONLY": annotation}, tmp_path).read_only is read_only


def test_direct_flag_turns_cache_mode_off(tmp_path: Path) -> None:
    """preseed-job-pvc.yaml passes --direct to override the config file's cache_dir; an empty
    environment variable is unset (the downward API gives "" for a missing annotation)."""
    assert (
        "--direct"
        in _one("examples/preseed-job-pvc.yaml")["spec"]["template"]["spec"]["containers"][0][
            "args"
        ]
    )
    settings = pytest.importorskip("storage_initializer.settings")
    config = tmp_path / "config.yaml"
    config.write_text(_one("namespace/configmap.yaml")["data"]["config.yaml"], encoding="utf-8")
    environ = {"STORAGE_INITIALIZER_CONFIG": str(config)}
    assert settings.load({"cache_dirs": [""]}, environ).cache_dirs == ()
    assert settings.load({}, {**environ, "STORAGE_INITIALIZER_CACHE_DIR": ""}).cache_dirs != ()


# --------------------------------------------------------------------------------------------
# docs agree with the manifests
# --------------------------------------------------------------------------------------------


def test_docs_name_existing_files_and_the_wiring() -> None:
    if not DOCS.is_file():
        pytest.fail(f"{DOCS} is missing")
    text = DOCS.read_text(encoding="utf-8")
    for path in sorted(set(re.findall(r"deploy/[\w./-]+", text))):
        path = path.rstrip(".")
        assert (REPO / path).exists(), f"docs/kubernetes.md names {path}, which does not exist"
    for needle in (
        READONLY_ANNOTATION,
        "STORAGE_READONLY",
        READONLY_FIELDPATH,
        CACHE_MOUNT,
        CONFIG_MOUNT + "/config.yaml",
        "model-cache",
        "storage-initializer-config",
        "FallbackToLogsOnError",
        "localModelDownloadJob",
        "defaultJobImage",
    ):
        assert needle in text, f"docs/kubernetes.md does not mention {needle}"


# --------------------------------------------------------------------------------------------
# kustomize (when kubectl is here)
# --------------------------------------------------------------------------------------------

KUSTOMIZATIONS = sorted(
    p.parent
    for p in DEPLOY.rglob("kustomization.yaml")
    if _load_all(p)[0].get("kind") != "Component"
)
needs_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl (for `kubectl kustomize`) is not installed"
)


def _kustomize(directory: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        ["kubectl", "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.load_all(result.stdout, Loader=_Loader) if d]


@needs_kubectl
@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: _rel(p))
def test_kustomization_builds_and_output_validates(directory: Path) -> None:
    for doc in _kustomize(directory):
        if doc["kind"] in KSERVE_KINDS:
            assert not _crd_errors(doc), _crd_errors(doc)
        else:
            _k8s_validate(doc, "latest")


@needs_kubectl
def test_kustomize_shared_cache_overlay_equals_the_simulated_patch() -> None:
    built = _kustomize(DEPLOY / "cluster-shared-cache")
    csc = next(d for d in built if d["metadata"]["name"] == "storage-initializer")
    assert csc == _shared_cache_csc()


@needs_kubectl
def test_kustomize_components_patch_kserve_configmap(tmp_path: Path) -> None:
    shutil.copy(REFERENCE / "inferenceservice.yaml", tmp_path / "inferenceservice.yaml")
    shutil.copytree(DEPLOY, tmp_path / "deploy")
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": ["inferenceservice.yaml"],
                "components": [
                    "deploy/kserve-config/storage-initializer",
                    "deploy/kserve-config/localmodel",
                ],
            }
        ),
        encoding="utf-8",
    )
    (configmap,) = _kustomize(tmp_path)
    reference = _kserve_configmap()
    assert set(configmap["data"]) == set(reference["data"])
    assert "storage-initializer" in json.loads(configmap["data"]["storageInitializer"])["image"]
    localmodel = json.loads(configmap["data"]["localModel"])
    assert "storage-initializer:" in localmodel["defaultJobImage"]
    assert configmap["data"]["credentials"] == reference["data"]["credentials"]


@needs_kubectl
def test_kustomize_image_override_reaches_the_clusterstoragecontainers(tmp_path: Path) -> None:
    shutil.copytree(DEPLOY, tmp_path / "deploy")
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": ["deploy/cluster-shared-cache"],
                "images": [
                    {
                        "name": "registry.example.com/storage-initializer",
                        "newName": "registry.internal/ml/storage-initializer",
                        "newTag": "1.2.3",
                    }
                ],
            }
        ),
        encoding="utf-8",
    )
    images = {d["spec"]["container"]["image"] for d in _kustomize(tmp_path)}
    assert images == {"registry.internal/ml/storage-initializer:1.2.3"}


# --------------------------------------------------------------------------------------------
# LLMInferenceService: the pods KServe's llmisvc controller builds
# --------------------------------------------------------------------------------------------

#: The emptyDir KServe's llmisvc controller adds (constants.StorageInitializerVolumeName).
LLMISVC_VOLUME = "kserve-provision-location"
LORA_ROOT = "/mnt/lora"
#: The main container's image in KServe's config-llm-template (the template merged under ours).
LLM_IMAGE = "ghcr.io/llm-d/llm-d-cuda:v0.9.0"
#: utils.AddDefaultHuggingFaceEnvVars: added to the init container for hf:// sources.
KSERVE_HF_ENV = {
    "HF_HUB_ENABLE_HF_TRANSFER": "1",
    "HF_XET_HIGH_PERFORMANCE": "1",
    "HF_XET_NUM_CONCURRENT_RANGE_GETS": "8",
}


def _llmisvcs() -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in _by_kind("LLMInferenceService")}


def _storage_initializer_config() -> dict[str, Any]:
    """The storageInitializer JSON the llmisvc controller builds its init container from (our
    inferenceservice-config patch: it does not consult ClusterStorageContainers)."""
    patch = _one("kserve-config/storage-initializer/storage-initializer-patch.yaml")
    return json.loads(patch["data"]["storageInitializer"])


def _lora_path(name: str) -> str:
    """sanitizeLoRAPathSegment: invalid characters become '-', '.' and '..' become adapter."""
    clean = re.sub(r"[^A-Za-z0-9._-]", "-", name)
    return f"{LORA_ROOT}/{'adapter' if clean in ('', '.', '..') else clean}"


def _common_parent(paths: list[str]) -> str:
    """utils.FindCommonParentPath."""
    if len(paths) == 1:
        return paths[0]
    parts = [p.strip("/").split("/") for p in paths]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return "/" + "/".join(common)


def llmisvc_pairs(llmisvc: dict[str, Any]) -> list[tuple[str, str]]:
    """The (uri, path) pairs of the one storage-initializer: the model, then the hf:// and
    s3:// LoRA adapters sorted by name (collectLoRADownloadPairs)."""
    model = llmisvc["spec"]["model"]
    pairs = [(model["uri"], MODEL_MOUNT)]
    adapters = sorted((model.get("lora") or {}).get("adapters") or [], key=lambda a: a["name"])
    for adapter in adapters:
        if adapter["uri"].startswith(("hf://", "s3://")):
            pairs.append((adapter["uri"], _lora_path(adapter["name"])))
    return pairs


def _llmisvc_pod(
    llmisvc: dict[str, Any], template: dict[str, Any], name: str
) -> dict[str, Any] | None:
    """One pod as attachModelArtifacts leaves it (None: storageInitializer.enabled false)."""
    if (llmisvc["spec"].get("storageInitializer") or {}).get("enabled") is False:
        return None
    spec = copy.deepcopy(template)
    override = next(
        (c for c in spec.get("initContainers", []) if c["name"] == "storage-initializer"), None
    )
    spec["initContainers"] = [
        c for c in spec.get("initContainers", []) if c["name"] != "storage-initializer"
    ]
    config = _storage_initializer_config()
    pairs = llmisvc_pairs(llmisvc)
    parent = _common_parent([path for _, path in pairs])
    init: dict[str, Any] = {
        "name": "storage-initializer",
        "image": config["image"],
        "args": [item for pair in pairs for item in pair],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "resources": {
            "limits": {"cpu": config["cpuLimit"], "memory": config["memoryLimit"]},
            "requests": {"cpu": config["cpuRequest"], "memory": config["memoryRequest"]},
        },
    }
    if override is not None:
        merged = _strategic_merge(init, override)
        merged["name"], merged["args"] = init["name"], init["args"]
        merged.pop("command", None)
        init = merged
    init.setdefault("volumeMounts", []).append(
        {"name": LLMISVC_VOLUME, "mountPath": parent, "readOnly": False}
    )
    if any(uri.startswith("hf://") for uri, _ in pairs):
        names = {e["name"] for e in init.get("env", [])}
        init.setdefault("env", []).extend(
            {"name": k, "value": v} for k, v in KSERVE_HF_ENV.items() if k not in names
        )
    spec["initContainers"].append(init)
    containers = spec.setdefault("containers", [])
    main = next((c for c in containers if c["name"] == "main"), None)
    if main is None:
        main = {"name": "main"}
        containers.append(main)
    main.setdefault("image", LLM_IMAGE)
    main.setdefault("volumeMounts", []).append(
        {"name": LLMISVC_VOLUME, "mountPath": parent, "readOnly": True}
    )
    spec.setdefault("volumes", []).append({"name": LLMISVC_VOLUME, "emptyDir": {}})
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def _group_size(spec: dict[str, Any]) -> int:
    """Pods per multi-node replica (leader + workers): data / dataLocal ranks, one per node."""
    parallelism = spec.get("parallelism") or {}
    return max(2, int(parallelism.get("data", 2)) // int(parallelism.get("dataLocal", 1)))


def llmisvc_pods(llmisvc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every pod of the service: decode (spec.template, or leader + workers with spec.worker)
    and prefill (spec.prefill likewise), replicas included."""
    name = llmisvc["metadata"]["name"]
    pods = []
    roles = [("", llmisvc["spec"])]
    if "prefill" in llmisvc["spec"]:
        roles.append(("-prefill", llmisvc["spec"]["prefill"]))
    for suffix, role in roles:
        for replica in range(int(role.get("replicas", 1))):
            members = [("", role["template"])]
            if "worker" in role:
                size = _group_size(llmisvc["spec"])
                members += [(f"-worker-{i}", role["worker"]) for i in range(1, size)]
            for member, template in members:
                pod = _llmisvc_pod(llmisvc, template, f"{name}{suffix}-{replica}{member}")
                if pod is not None:
                    pods.append(pod)
    return pods


def test_llmisvc_examples_cover_every_layout() -> None:
    found = _llmisvcs()
    assert any("prefill" in d["spec"] for d in found.values()), "no prefill/decode example"
    assert any("worker" in d["spec"] for d in found.values()), "no multi-node example"
    assert any(d["spec"]["model"].get("lora") for d in found.values()), "no LoRA example"
    assert any(
        int(d["spec"].get("replicas", 1)) > 1 and "worker" not in d["spec"] for d in found.values()
    ), "no single-node example with replicas"


@pytest.mark.parametrize("name", sorted(_llmisvcs()))
def test_llmisvc_built_pods_are_valid(name: str) -> None:
    llmisvc = _llmisvcs()[name]
    pods = llmisvc_pods(llmisvc)
    assert len(pods) >= 2
    for pod in pods:
        spec = pod["spec"]
        assert not _dangling_mounts(spec), _dangling_mounts(spec)
        names = [c["name"] for c in spec["initContainers"]]
        assert names.count("storage-initializer") == 1, names
        init = spec["initContainers"][names.index("storage-initializer")]
        env = {e["name"]: e for e in init["env"]}
        assert env["STORAGE_INITIALIZER_CACHE_DIR"]["value"] == CACHE_MOUNT
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {
            "name": "hf-secret",
            "key": "HF_TOKEN",
            "optional": True,
        }
        mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
        assert mounts[CACHE_MOUNT] == "model-cache"
        assert mounts[CONFIG_MOUNT] == "storage-initializer-config"
        main = next(c for c in spec["containers"] if c["name"] == "main")
        assert {"name": "model-cache", "mountPath": CACHE_MOUNT, "readOnly": True} in main[
            "volumeMounts"
        ], "the symlinks into the cache would dangle in the model server"
        claims = [v for v in spec["volumes"] if v["name"] == "model-cache"]
        assert claims[0]["persistentVolumeClaim"]["claimName"] == "model-cache"
        for version in K8S_VERSIONS:
            _k8s_validate(pod, version)


def test_llmisvc_lora_shares_the_init_container() -> None:
    lora = next(d for d in _llmisvcs().values() if d["spec"]["model"].get("lora"))
    init = next(
        c
        for c in llmisvc_pods(lora)[0]["spec"]["initContainers"]
        if c["name"] == "storage-initializer"
    )
    assert len(init["args"]) == 4 and init["args"][1] == MODEL_MOUNT
    assert init["args"][3].startswith(LORA_ROOT + "/")
    assert {"name": LLMISVC_VOLUME, "mountPath": "/mnt", "readOnly": False} in init["volumeMounts"]


def test_llmisvc_storage_initializer_can_be_disabled() -> None:
    llmisvc = copy.deepcopy(next(iter(_llmisvcs().values())))
    llmisvc["spec"]["storageInitializer"] = {"enabled": False}
    assert not _crd_errors(llmisvc)
    assert llmisvc_pods(llmisvc) == []


def test_strict_llmisvc_schema_rejects_a_misspelt_override() -> None:
    llmisvc = copy.deepcopy(next(iter(_llmisvcs().values())))
    llmisvc["spec"]["template"]["initContainers"][0]["volumeMount"] = []
    assert any("volumeMount" in e for e in _crd_errors(llmisvc))


# --------------------------------------------------------------------------------------------
# node preloading: the DaemonSet running `prefetch --watch`
# --------------------------------------------------------------------------------------------

PRELOAD = "node-preload/daemonset.yaml"


def _flag_values(args: list[str]) -> dict[str, str]:
    return {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}


def test_preload_daemonset_speaks_the_cli_and_mounts_what_it_uses(tmp_path: Path) -> None:
    from storage_initializer import prefetch as prefetch_mod
    from storage_initializer.cli import prefetch as prefetch_command

    spec = _one(PRELOAD)["spec"]["template"]["spec"]
    preload = next(c for c in spec["containers"] if c["name"] == "preload")
    sidecar = next(c for c in spec["containers"] if c["name"] == "node-labels")
    args = preload["args"]
    assert args[0] == "prefetch" and "--watch" in args
    known = {opt for param in prefetch_command.params for opt in param.opts}
    unknown = [a for a in args if a.startswith("--") and a not in known]
    assert not unknown, f"flags prefetch does not have: {unknown}"
    flags = _flag_values(args)
    for flag in ("--from-file", "--labels-file", "--cache-dir", "--ready-file"):
        assert _under_a_mount(preload, flags[flag]), f"{flag} {flags[flag]} is on no volume"
    assert not _under_a_mount(preload, flags["--cache-dir"]).get("readOnly")
    assert float(flags["--poll-interval"]) > 0
    # The sidecar writes the labels file the preloader reads, on the same volume.
    labels_mount = _under_a_mount(preload, flags["--labels-file"])
    assert labels_mount.get("readOnly")
    assert flags["--labels-file"] in sidecar["command"][-1]
    assert _under_a_mount(sidecar, flags["--labels-file"])["name"] == labels_mount["name"]
    # The models file is the ConfigMap's key, and the real loader reads its selectors.
    directory, _, key = flags["--from-file"].rpartition("/")
    mount = _under_a_mount(preload, flags["--from-file"])
    assert mount["mountPath"] == directory and not mount.get("subPath"), "subPath never updates"
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    configmap = _one("node-preload/models-configmap.yaml")
    assert configmap["metadata"]["name"] == volume["configMap"]["name"]
    models = tmp_path / key
    models.write_text(configmap["data"][key])
    items, _parallel, _defaults = prefetch_mod.load_file(models)
    assert any(item.node_selector for item in items)
    assert any(not item.node_selector for item in items)
    # The readiness probe looks at the file the preloader writes.
    assert flags["--ready-file"] in preload["readinessProbe"]["exec"]["command"]
    # The sidecar's kubectl needs get on nodes, granted to the pod's service account.
    role = next(d for _, d in _by_kind("ClusterRole") if "nodes" in d["rules"][0]["resources"])
    binding = next(d for _, d in _by_kind("ClusterRoleBinding"))
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["name"] == spec["serviceAccountName"]


HF_SECRET_REF = {"name": "hf-secret", "key": "HF_TOKEN", "optional": True}


@pytest.mark.parametrize(
    "csc",
    ["cluster/clusterstoragecontainer.yaml", "cluster/clusterstoragecontainer-localmodel.yaml"],
)
def test_cscs_map_an_optional_hf_token(csc: str) -> None:
    env = {e["name"]: e for e in _csc(csc)["spec"]["container"]["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == HF_SECRET_REF


def test_hf_token_reaches_the_pods_kserve_builds() -> None:
    """Through the shared-cache overlay and KServe's merge, into the init container only."""
    pod = _kserve_pod(_examples()["qwen-shared-cache"], _shared_cache_csc())
    init = pod["spec"]["initContainers"][0]
    token = next(e for e in init["env"] if e["name"] == "HF_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == HF_SECRET_REF
    for llmisvc in _llmisvcs().values():
        for built in llmisvc_pods(llmisvc):
            init = next(
                c for c in built["spec"]["initContainers"] if c["name"] == "storage-initializer"
            )
            assert "storage-initializer" in init["image"], "not this project's image"
            token = next(e for e in init["env"] if e["name"] == "HF_TOKEN")
            assert token["valueFrom"]["secretKeyRef"] == HF_SECRET_REF
