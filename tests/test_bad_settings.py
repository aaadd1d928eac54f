"""A bad setting value is explained in the user's terms, naming where it came from.

Every option can come from a flag, an environment variable or the config file; whichever it
was, the last log line says which (``--chunk-size``, ``STORAGE_INITIALIZER_CHUNK_SIZE``, the
config file and its key), the value, and what a good value looks like — never a Python exception
text such as ``invalid literal for int()``. Runs the real CLI and entrypoint as processes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import helpers

#: option -> (bad value, words of the explanation)
BAD = {
    "chunk-size": ("lots", "is not a size; use e.g. 32MiB"),
    "workers": ("many", "is not a whole number; use e.g. 8"),
    "stale-after": ("soon", "is not a number; use e.g. 30"),
    "retries": ("2.5", "is not a whole number"),
    "lock-timeout": ("-3", "is negative; use a value ≥ 0"),
    "progress-interval": ("nan", "is not a finite number"),
    "max-size": ("huge", "is not a size; use e.g. 32MiB"),
    "link-mode": ("reflink", "is not one of symlink, hardlink, copy"),
    "stall-timeout": ("-1", "is negative; use a value ≥ 0"),
    "min-rate": ("fast", "is not a size; use e.g. 32MiB"),
    "timeout": ("inf", "is not a finite number"),
    "write-size": ("big", "is not a size; use e.g. 32MiB"),
    "read-size": ("0", "is zero; use a value > 0"),
}
PYTHON_WORDS = ("invalid literal", "could not convert", "ValueError", "Traceback", "base 10")


def _check(run: helpers.Run, where: str, value: str, words: str) -> None:
    assert run.returncode != 0, run.describe()
    last = run.last_line
    assert f"{where}: '{value}' {words}" in last, last
    assert not any(w in run.stderr for w in PYTHON_WORDS), run.stderr


@pytest.mark.parametrize("option", sorted(BAD))
def test_bad_flag_value(tmp_path: Path, option: str) -> None:
    value, words = BAD[option]
    run = helpers.cli("pull", f"--{option}", value, tmp_path / "src", tmp_path / "dest")
    if option == "link-mode":  # a click.Choice: click's own message is in the user's terms
        assert run.returncode == 2 and "'reflink' is not one of 'symlink'" in run.last_line
        return
    _check(run, f"--{option}", value, words)


@pytest.mark.parametrize("option", sorted(BAD))
def test_bad_environment_value(tmp_path: Path, option: str) -> None:
    value, words = BAD[option]
    variable = "STORAGE_INITIALIZER_" + option.upper().replace("-", "_")
    env = helpers.clean_env({variable: value})
    run = helpers.entrypoint(tmp_path / "src", tmp_path / "dest", env=env)
    _check(run, variable, value, words)


@pytest.mark.parametrize("option", sorted(BAD))
def test_bad_config_file_value(tmp_path: Path, option: str) -> None:
    value, words = BAD[option]
    config = tmp_path / "config.yaml"
    config.write_text(f"{option}: '{value}'\n", encoding="utf-8")
    env = helpers.clean_env(STORAGE_INITIALIZER_CONFIG=str(config))
    run = helpers.entrypoint(tmp_path / "src", tmp_path / "dest", env=env)
    _check(run, f"config file {config}, key {option}", value, words)


def test_bad_boolean_in_the_config_file_names_its_key(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text('{"writable": "perhaps"}', encoding="utf-8")
    env = helpers.clean_env(STORAGE_INITIALIZER_CONFIG=str(config))
    run = helpers.entrypoint(tmp_path / "src", tmp_path / "dest", env=env)
    _check(run, f"config file {config}, key writable", "perhaps", "is not true or false")


def test_a_config_value_of_the_wrong_type_is_explained(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("workers: [1, 2]\nchunk_size: {a: 1}\n", encoding="utf-8")
    env = helpers.clean_env(STORAGE_INITIALIZER_CONFIG=str(config))
    run = helpers.entrypoint(tmp_path / "src", tmp_path / "dest", env=env)
    assert run.returncode != 0
    assert f"config file {config}, key workers: '[1, 2]' is not a whole number" in run.last_line
