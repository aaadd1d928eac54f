"""The KServe entrypoint contract (DESIGN §2), bit for bit, with real processes.

KServe calls ``initializer-entrypoint src0 dest0 [src1 dest1 …]`` and only looks at the exit code
and the tail of the log; anything else it relies on is checked here: the usage line on stdout,
destinations created, pairs in order, the last line of a failure, timestamps, and settings that
come from the environment and the mounted config file (the entrypoint has no flags).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tests.helpers import (
    USAGE,
    clean_env,
    entrypoint,
    modes,
    pattern,
    run,
    sha256,
    tree_digest,
)
from tests.servers.nginx import Nginx

ROOT = Path(__file__).resolve().parent.parent
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}")


@pytest.mark.parametrize("args", [[], ["s3://bucket/model"], ["a", "/tmp/b", "c"]])
def test_wrong_argument_count_prints_usage_and_exits_1(args: list[str]) -> None:
    result = entrypoint(*args)
    assert result.returncode == 1, result.describe()
    assert result.stdout == USAGE + "\n"


def test_script_at_kserve_path_has_the_same_contract(tmp: Path) -> None:
    """scripts/initializer-entrypoint is what the image exposes at KServe's path."""
    script = ROOT / "scripts" / "initializer-entrypoint"
    result = run([sys.executable, str(script), "only-one-arg"])
    assert result.returncode == 1
    assert result.stdout == USAGE + "\n"
    source = tmp / "src.bin"
    source.write_bytes(b"model")
    ok = run([sys.executable, str(script), str(source), str(tmp / "out")])
    assert ok.returncode == 0, ok.describe()
    assert (tmp / "out" / "src.bin").read_bytes() == b"model"


def test_one_pair_creates_the_destination(nginx: Nginx, tmp: Path) -> None:
    folder = nginx.new_dir()
    data = pattern(50_000, 1)
    nginx.put(f"{folder}/model.bin", data)
    dest = tmp / "deep" / "nested" / "models"
    result = entrypoint(nginx.url(f"{folder}/model.bin"), dest)
    assert result.returncode == 0, result.describe()
    assert tree_digest(dest) == {"model.bin": sha256(data)}


def test_two_pairs_are_processed_in_order(nginx: Nginx, tmp: Path) -> None:
    folder = nginx.new_dir()
    first, second = pattern(10_000, 2), pattern(12_000, 3)
    nginx.put(f"{folder}/first.bin", first)
    nginx.put(f"{folder}/second.bin", second)
    url1, url2 = nginx.url(f"{folder}/first.bin"), nginx.url(f"{folder}/second.bin")
    result = entrypoint(url1, tmp / "one", url2, tmp / "two")
    assert result.returncode == 0, result.describe()
    assert tree_digest(tmp / "one") == {"first.bin": sha256(first)}
    assert tree_digest(tmp / "two") == {"second.bin": sha256(second)}
    # The first pair is finished (its GET logged) before the second is started (its HEAD).
    log = [(r.method, r.uri) for r in nginx.requests(folder)]
    assert log.index(("GET", f"/{folder}/first.bin")) < log.index(("HEAD", f"/{folder}/second.bin"))
    text = result.stderr
    assert text.index(url1) < text.index(url2)


def test_failing_pair_ends_with_one_explanatory_line(nginx: Nginx, tmp: Path) -> None:
    folder = nginx.new_dir()
    nginx.put(f"{folder}/good.bin", b"good model")
    good = nginx.url(f"{folder}/good.bin")
    secret = "hunter2-very-secret"
    bad = nginx.url(f"{folder}/missing.bin").replace("http://", f"http://user:{secret}@")
    result = entrypoint(good, tmp / "ok", bad, tmp / "bad")
    assert result.returncode == 1, result.describe()
    last = result.last_line
    assert f"127.0.0.1:{nginx.http_port}/{folder}/missing.bin" in last
    assert "404" in last
    assert "ERROR" in last
    assert secret not in result.output
    assert (tmp / "ok" / "good.bin").read_bytes() == b"good model"
    assert not [p for p in (tmp / "bad").glob("*") if p.name != ".storage-initializer"]


def test_failure_of_first_pair_stops_before_the_second(nginx: Nginx, tmp: Path) -> None:
    folder = nginx.new_dir()
    nginx.put(f"{folder}/later.bin", b"later")
    result = entrypoint(
        nginx.url(f"{folder}/absent.bin"), tmp / "a", nginx.url(f"{folder}/later.bin"), tmp / "b"
    )
    assert result.returncode == 1
    assert "absent.bin" in result.last_line
    assert not (tmp / "b" / "later.bin").exists()


def test_log_lines_carry_timestamps(tmp: Path) -> None:
    source = tmp / "weights.bin"
    source.write_bytes(b"w" * 100)
    result = entrypoint(source, tmp / "dest")
    assert result.returncode == 0, result.describe()
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, "the entrypoint logged nothing"
    assert all(TIMESTAMP.match(line) for line in lines), lines


# -- settings from the environment and the mounted config file -----------------------------


def _config(tmp: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def _one_file(tmp: Path) -> Path:
    source = tmp / "src" / "model.bin"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(b"model bytes")
    return source


def test_config_file_makes_the_model_writable(tmp: Path) -> None:
    config = _config(tmp, "read_only: false\n")
    env = clean_env(STORAGE_INITIALIZER_CONFIG=str(config))
    result = entrypoint(_one_file(tmp), tmp / "dest", env=env)
    assert result.returncode == 0, result.describe()
    assert modes(tmp / "dest")["model.bin"] & 0o220 == 0o220


def test_default_is_read_only(tmp: Path) -> None:
    result = entrypoint(_one_file(tmp), tmp / "dest")
    assert result.returncode == 0, result.describe()
    assert modes(tmp / "dest") == {"model.bin": 0o444}


def test_json_config_file_is_read_too(tmp: Path) -> None:
    config = _config(tmp, '{"read_only": false}', "config.json")
    env = clean_env(STORAGE_INITIALIZER_CONFIG=str(config))
    result = entrypoint(_one_file(tmp), tmp / "dest", env=env)
    assert result.returncode == 0, result.describe()
    assert modes(tmp / "dest")["model.bin"] & 0o200


def test_environment_beats_config_file(tmp: Path) -> None:
    config = _config(tmp, "read_only: false\n")
    env = clean_env(STORAGE_INITIALIZER_CONFIG=str(config), STORAGE_READONLY="true")
    result = entrypoint(_one_file(tmp), tmp / "dest", env=env)
    assert result.returncode == 0, result.describe()
    assert modes(tmp / "dest") == {"model.bin": 0o444}


def test_environment_alone_makes_the_model_writable(tmp: Path) -> None:
    env = clean_env(STORAGE_READONLY="false")
    result = entrypoint(_one_file(tmp), tmp / "dest", env=env)
    assert result.returncode == 0, result.describe()
    assert modes(tmp / "dest")["model.bin"] & 0o200


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("link_mode: teleport\n", "link_mode"),
        ("read_only: perhaps\n", "read_only"),
        ("no_such_option: 1\n", "no_such_option"),
        ("- just\n- a list\n", "mapping"),
        ("read_only: [unclosed\n", "YAML"),
    ],
)
def test_bad_config_file_is_a_clear_error(tmp: Path, text: str, expected: str) -> None:
    config = _config(tmp, text)
    env = clean_env(STORAGE_INITIALIZER_CONFIG=str(config))
    result = entrypoint(_one_file(tmp), tmp / "dest", env=env)
    assert result.returncode == 1, result.describe()
    assert expected in result.last_line
    assert str(config) in result.last_line
    assert not (tmp / "dest" / "model.bin").exists()


def test_bad_environment_value_is_a_clear_error(tmp: Path) -> None:
    env = clean_env(STORAGE_INITIALIZER_STALE_AFTER="soon")
    result = entrypoint(_one_file(tmp), tmp / "dest", env=env)
    assert result.returncode == 1, result.describe()
    assert "STORAGE_INITIALIZER_STALE_AFTER" in result.last_line
    assert "soon" in result.last_line


def test_missing_config_file_named_explicitly_is_an_error(tmp: Path) -> None:
    env = clean_env(STORAGE_INITIALIZER_CONFIG=str(tmp / "absent.yaml"))
    result = entrypoint(_one_file(tmp), tmp / "dest", env=env)
    assert result.returncode == 1, result.describe()
    assert "absent.yaml" in result.last_line
