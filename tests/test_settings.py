"""Settings precedence: flag > environment > config file > built-in default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from storage_initializer import settings
from storage_initializer.errors import UsageError


def write_config(tmp_path: Path, text: str, name: str = "config.yaml") -> dict[str, str]:
    path = tmp_path / name
    path.write_text(text)
    return {"STORAGE_INITIALIZER_CONFIG": str(path)}


def test_defaults_without_any_source(tmp_path: Path) -> None:
    env = {"STORAGE_INITIALIZER_CONFIG": ""}
    loaded = settings.load({}, {**env, "HOME": str(tmp_path)})
    assert loaded.read_only is True
    assert loaded.stale_after == 30.0
    assert loaded.link_mode == "symlink"
    assert loaded.cache_dirs == ()


def test_config_file_beats_default(tmp_path: Path) -> None:
    env = write_config(tmp_path, "read_only: false\nstale-after: 12\ncache_dir: /c\n")
    loaded = settings.load({}, env)
    assert loaded.read_only is False
    assert loaded.stale_after == 12.0
    assert loaded.cache_dirs == ("/c",)
    assert loaded.origins["stale_after"].startswith("config")


def test_env_beats_config_file(tmp_path: Path) -> None:
    env = write_config(tmp_path, "read_only: false\nworkers: 3\n")
    env.update(STORAGE_READONLY="true", STORAGE_INITIALIZER_WORKERS="7")
    loaded = settings.load({}, env)
    assert loaded.read_only is True
    assert loaded.workers == 7


def test_flag_beats_env(tmp_path: Path) -> None:
    env = write_config(tmp_path, "workers: 3\n")
    env["STORAGE_INITIALIZER_WORKERS"] = "7"
    loaded = settings.load({"workers": 2, "read_only": False}, env)
    assert loaded.workers == 2
    assert loaded.read_only is False
    assert loaded.origins["workers"] == "flag"


def test_json_config_and_writable_alias(tmp_path: Path) -> None:
    env = write_config(tmp_path, json.dumps({"writable": True}), "config.json")
    assert settings.load({}, env).read_only is False


def test_kserve_pattern_variables(tmp_path: Path) -> None:
    env = {
        "STORAGE_INITIALIZER_CONFIG": "",
        "STORAGE_ALLOW_PATTERNS": '["*.json", "*.safetensors"]',
        "STORAGE_IGNORE_PATTERNS": "*.bin, *.pt",
    }
    loaded = settings.load({}, env)
    assert loaded.include == ("*.json", "*.safetensors")
    assert loaded.exclude == ("*.bin", "*.pt")


def test_chunk_size_units() -> None:
    loaded = settings.load({}, {"STORAGE_INITIALIZER_CHUNK_SIZE": "8MiB"})
    assert loaded.chunk_size == 8 * 1024 * 1024


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"STORAGE_READONLY": "maybe"}, "STORAGE_READONLY: 'maybe' is not true or false"),
        ({"STORAGE_INITIALIZER_STALE_AFTER": "0"}, "STORAGE_INITIALIZER_STALE_AFTER: '0' is zero"),
        ({"STORAGE_INITIALIZER_LINK_MODE": "reflink"}, "'reflink' is not one of symlink"),
        ({"STORAGE_INITIALIZER_WORKERS": "-1"}, "STORAGE_INITIALIZER_WORKERS: '-1' is negative"),
    ],
)
def test_bad_values_are_errors_naming_the_option(env: dict[str, str], needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        settings.load({}, env)


def test_unknown_config_key_is_an_error(tmp_path: Path) -> None:
    env = write_config(tmp_path, "stale_afterr: 3\n")
    with pytest.raises(UsageError, match="unknown option"):
        settings.load({}, env)


def test_missing_named_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        settings.load({}, {"STORAGE_INITIALIZER_CONFIG": str(tmp_path / "nope.yaml")})
