"""``prefetch --watch`` as the DaemonSet runs it: a real process, a real S3 server (moto) behind
a counting proxy, a models file mounted the way the kubelet mounts a ConfigMap (``..data``
symlink swapped on update) and a labels file that changes while it runs. Synchronisation is on
the readiness file and the log, never on sleeps."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import Proc, clean_env, cli_argv, poll_until, start
from tests.servers.proxy import CountingProxy
from tests.servers.s3 import S3Server, s3_server

__all__ = ["s3_server"]

MODELS = {
    "a": b"A" * 70_000,  # selector gpu=h100
    "b": b"B" * 50_000,  # no selector: every node
    "c": b"C" * 30_000,  # selector zone=x
    "d": b"D" * 20_000,  # added later, no selector
}


class ConfigMapMount:
    """A directory laid out as the kubelet lays out a ConfigMap volume: the visible file is a
    symlink through ``..data``, which an update swaps atomically to a new timestamped dir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.generation = 0
        root.mkdir()

    def write(self, name: str, text: str) -> Path:
        self.generation += 1
        version = self.root / f"..2026_12_07_00_00_{self.generation:02d}.000"
        version.mkdir()
        (version / name).write_text(text)
        link = self.root / "..data_tmp"
        link.symlink_to(version.name)
        os.replace(link, self.root / "..data")
        visible = self.root / name
        if not visible.is_symlink():
            visible.symlink_to(f"..data/{name}")
        return visible


def _models_yaml(
    bucket: str, entries: dict[str, dict[str, str]], defaults: dict[str, str] | None = None
) -> str:
    models: list[dict[str, Any]] = []
    for name, selector in entries.items():
        model: dict[str, Any] = {"uri": f"s3://{bucket}/{name}"}
        if selector:
            model["nodeSelector"] = selector
        models.append(model)
    return yaml.safe_dump({"models": models, **({"defaults": defaults} if defaults else {})})


def _write_labels(path: Path, labels: dict[str, str]) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text("".join(f'{k}="{v}"\n' for k, v in labels.items()))
    os.replace(temporary, path)


def _ready(path: Path) -> set[str] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return {r["uri"].rsplit("/", 1)[1] for r in data["ready"]}


def _wait_ready(path: Path, expected: set[str], proc: Proc) -> None:
    def check() -> bool:
        assert proc.popen.poll() is None, "the watcher died"
        return _ready(path) == expected

    poll_until(check, deadline=60, what=f"ready == {sorted(expected)}")


def _start(tmp_path: Path, env: dict[str, str], models: Path, min_idle: str) -> Proc:
    argv = cli_argv(
        "prefetch",
        "--from-file",
        models,
        "--watch",
        "--labels-file",
        tmp_path / "labels",
        "--ready-file",
        tmp_path / "ready.json",
        "--cache-dir",
        tmp_path / "node-cache",
        "--poll-interval",
        "0.05",
        "--min-idle",
        min_idle,
    )
    return start(argv, env, tmp_path / "logs")


def _entry_dirs(cache: Path) -> int:
    return sum(1 for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_watch_follows_labels_and_models(s3_server: S3Server, tmp_path: Path) -> None:
    bucket = s3_server.new_bucket({f"{k}/w.bin": v for k, v in MODELS.items()})
    mount = ConfigMapMount(tmp_path / "configmap")
    models = mount.write(
        "models.yaml", _models_yaml(bucket, {"a": {"gpu": "h100"}, "b": {}, "c": {"zone": "x"}})
    )
    _write_labels(tmp_path / "labels", {"gpu": "h100", "kubernetes.io/hostname": "node-1"})
    ready = tmp_path / "ready.json"
    cache = tmp_path / "node-cache"
    with CountingProxy(s3_server.endpoint) as origin:
        env = clean_env(s3_server.env(origin.url), AWS_EC2_METADATA_DISABLED="true")
        proc = _start(tmp_path, env, models, "0")
        try:
            _wait_ready(ready, {"a", "b"}, proc)
            assert _entry_dirs(cache) == 2

            # The node is relabelled: a no longer matches, c does.
            _write_labels(tmp_path / "labels", {"gpu": "a100", "zone": "x"})
            _wait_ready(ready, {"b", "c"}, proc)
            poll_until(lambda: _entry_dirs(cache) == 2, what="a removed")

            # The ConfigMap is updated (..data swap): b goes, d comes.
            mount.write("models.yaml", _models_yaml(bucket, {"c": {"zone": "x"}, "d": {}}))
            _wait_ready(ready, {"c", "d"}, proc)
            poll_until(lambda: _entry_dirs(cache) == 2, what="b removed")
            state = json.loads(ready.read_text())
            assert state["failed"] == [] and state["pending"] == []
        finally:
            proc.popen.send_signal(signal.SIGTERM)
            done = proc.wait(timeout=60)
        assert done.returncode == 0, done.describe()
        assert "stopped: SIGTERM received" in done.stderr
        assert "removed" in done.stderr
        # Each model came from the origin exactly once.
        got = origin.bytes_served(method="GET", path_contains="/w.bin")
        assert got == sum(len(v) for v in MODELS.values()), origin.requests
    for name in ("c", "d"):
        files = [p for p in cache.rglob("w.bin")]
        assert any(p.read_bytes() == MODELS[name] for p in files)


def test_min_idle_keeps_a_recently_used_model(s3_server: S3Server, tmp_path: Path) -> None:
    bucket = s3_server.new_bucket({f"{k}/w.bin": v for k, v in MODELS.items()})
    mount = ConfigMapMount(tmp_path / "configmap")
    # A cache_dir in the file's defaults (written for `prefetch` Jobs) does not move the node's.
    elsewhere = tmp_path / "elsewhere"
    models = mount.write(
        "models.yaml",
        _models_yaml(bucket, {"a": {"gpu": "h100"}, "b": {}}, {"cache_dir": str(elsewhere)}),
    )
    _write_labels(tmp_path / "labels", {"gpu": "h100"})
    ready = tmp_path / "ready.json"
    env = clean_env(s3_server.env(), AWS_EC2_METADATA_DISABLED="true")
    proc = _start(tmp_path, env, models, "3600")
    try:
        _wait_ready(ready, {"a", "b"}, proc)
        _write_labels(tmp_path / "labels", {"gpu": "a100"})
        _wait_ready(ready, {"b"}, proc)
        # Used (preloaded) moments ago: within --min-idle it stays on the node, still managed.
        assert _entry_dirs(tmp_path / "node-cache") == 2
        assert len(json.loads(ready.read_text())["managed"]) == 2
        assert not elsewhere.exists()
    finally:
        proc.popen.send_signal(signal.SIGTERM)
        done = proc.wait(timeout=60)
    assert done.returncode == 0, done.describe()


def test_a_broken_models_file_keeps_what_is_ready(s3_server: S3Server, tmp_path: Path) -> None:
    bucket = s3_server.new_bucket({f"{k}/w.bin": v for k, v in MODELS.items()})
    mount = ConfigMapMount(tmp_path / "configmap")
    models = mount.write("models.yaml", _models_yaml(bucket, {"b": {}}))
    ready = tmp_path / "ready.json"
    env = clean_env(s3_server.env(), AWS_EC2_METADATA_DISABLED="true")
    proc = _start(tmp_path, env, models, "0")
    try:
        _wait_ready(ready, {"b"}, proc)
        mount.write("models.yaml", "models: [unclosed\n")
        poll_until(
            lambda: "cannot use the models" in Path(proc._err.name).read_text(),
            what="the error line",
        )
        assert _ready(ready) == {"b"}
        assert _entry_dirs(tmp_path / "node-cache") == 1
    finally:
        proc.popen.send_signal(signal.SIGTERM)
        done = proc.wait(timeout=60)
    assert done.returncode == 0, done.describe()
