"""Bad input fails fast and clearly: exit 1, one final log line that names the URI (secrets
redacted) and the cause, and no model file visible in DEST.

KServe copies the tail of the init container's log into the InferenceService status, so the
last line is the whole user interface of a failure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import (
    TruncatingServer,
    clean_env,
    entrypoint,
    marker_path,
    model_files,
    pattern,
    tar_bytes,
)
from tests.servers.nginx import Nginx

PASSWORD = "pa55w0rd-do-not-print"


@dataclass
class Case:
    uri: str
    #: Substrings the last line must hold (besides the URI), case-insensitive.
    expected: list[str]
    #: What the last line must show of the URI (defaults to the URI itself).
    shown: str = ""
    env: dict[str, str] = field(default_factory=dict)
    dest: Path | None = None


def _with_password(url: str) -> str:
    return url.replace("://", f"://user:{PASSWORD}@", 1)


def _redacted(url: str) -> str:
    return url.replace("://", "://user:***@", 1)


def _http_case(nginx: Nginx, folder: str, location: str, name: str, expected: list[str]) -> Case:
    url = nginx.url(f"{folder}/{name}", location=location)
    return Case(_with_password(url), expected, shown=_redacted(url))


CASES: dict[str, Callable[[Nginx, str, Path], Case]] = {
    "unknown-scheme": lambda n, f, t: Case("foo://bucket/model", ["unsupported", "foo://"]),
    "malformed-no-bucket": lambda n, f, t: Case("s3:///model", ["malformed"]),
    "malformed-http-no-host": lambda n, f, t: Case("http:///model.bin", ["malformed"]),
    "not-a-uri": lambda n, f, t: Case("models/resnet", ["not a uri"]),
    "missing-local-file": lambda n, f, t: Case(str(t / "absent" / "model.bin"), ["not exist"]),
    "missing-file-uri": lambda n, f, t: Case(f"file://{t}/absent.bin", ["not exist"]),
    "http-404": lambda n, f, t: _http_case(n, f, "", "absent.bin", ["404"]),
    "http-401": lambda n, f, t: _http_case(n, f, "private", "model.bin", ["401", "headers"]),
    "http-403": lambda n, f, t: _http_case(n, f, "forbidden", "model.bin", ["403"]),
    "html-instead-of-model": lambda n, f, t: _http_case(n, f, "html", "model.bin", ["html"]),
    "corrupt-archive": lambda n, f, t: _http_case(n, f, "", "broken.tar.gz", ["corrupt"]),
    "truncated-archive": lambda n, f, t: _http_case(n, f, "", "cut.tar", ["corrupt"]),
    "connection-refused": lambda n, f, t: Case("http://127.0.0.1:9/model.bin", ["connect"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_with_one_clear_line(nginx: Nginx, tmp: Path, name: str) -> None:
    folder = nginx.new_dir()
    nginx.put(f"{folder}/model.bin", pattern(5_000, 70))
    nginx.put(f"{folder}/broken.tar.gz", b"\x1f\x8b\x08\x00" + pattern(4_000, 71))
    whole = tar_bytes({"config.json": pattern(3_000, 72), "model.bin": pattern(30_000, 73)})
    nginx.put(f"{folder}/cut.tar", whole[: len(whole) // 2])
    case = CASES[name](nginx, folder, tmp)
    dest = case.dest or tmp / "dest"
    result = entrypoint(case.uri, dest, env=clean_env(case.env))

    assert result.returncode == 1, result.describe()
    last = result.last_line
    assert "ERROR" in last, result.describe()
    assert (case.shown or case.uri) in last, result.describe()
    for word in case.expected:
        assert word.lower() in last.lower(), result.describe()
    assert PASSWORD not in result.output
    if dest.exists():
        assert model_files(dest) == {}
        assert not marker_path(dest).exists()


def test_truncated_transfer_is_retried_then_reported(tmp: Path) -> None:
    body = pattern(200_000, 74)
    with TruncatingServer(body) as server:
        url = server.url("model.bin")
        env = clean_env(STORAGE_INITIALIZER_RETRIES="1")
        result = entrypoint(url, tmp / "dest", env=env)
        gets = server.requests.count("GET")
    assert result.returncode == 1, result.describe()
    last = result.last_line
    assert url in last
    assert "2 attempts" in last or "attempt" in last, last
    assert "100000" in last or "closed" in last or "broke" in last, last
    assert gets == 2  # one try and one retry, as STORAGE_INITIALIZER_RETRIES says
    assert model_files(tmp / "dest") == {}


def test_destination_that_cannot_be_created(nginx: Nginx, tmp: Path) -> None:
    folder = nginx.new_dir()
    nginx.put(f"{folder}/model.bin", b"model")
    blocker = tmp / "a-file"
    blocker.write_bytes(b"not a directory")
    url = nginx.url(f"{folder}/model.bin")
    result = entrypoint(_with_password(url), blocker / "models")
    assert result.returncode == 1, result.describe()
    last = result.last_line
    assert _redacted(url) in last
    assert "cannot create" in last
    assert str(blocker / "models") in last
    assert PASSWORD not in result.output
    assert blocker.read_bytes() == b"not a directory"
    # Nothing was fetched for a destination that cannot hold the model.
    assert [r for r in nginx.requests(folder) if r.method == "GET"] == []
