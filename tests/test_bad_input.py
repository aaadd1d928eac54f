"""Bad input fails fast and clearly: exit 1, one final log line that names the URI (secrets
redacted) and the cause, and no model file visible in DEST.

KServe copies the tail of the init container's log into the InferenceService status, so the
last line is the whole user interface of a failure.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import (
    clean_env,
    entrypoint,
    marker_path,
    model_files,
    pattern,
    tar_bytes,
    truncating,
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


def test_truncated_transfer_is_retried_then_reported(nginx: Nginx, tmp: Path) -> None:
    body = pattern(200_000, 74)
    path = nginx.put(f"{nginx.new_dir()}/model.bin", body)
    with truncating(nginx) as server:
        url = f"{server.url}/{path}"
        env = clean_env(STORAGE_INITIALIZER_RETRIES="1")
        result = entrypoint(url, tmp / "dest", env=env)
        gets = server.count(method="GET")
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


# -- a destination this UID cannot write -----------------------------------------------------

UID = 1000
REPO = Path(__file__).resolve().parent.parent


def _traversable_by_others(path: Path) -> bool:
    return all(part.stat().st_mode & stat.S_IXOTH for part in [path, *path.parents])


class _Unprivileged:
    """Runs the entrypoint as UID/GID 1000 with no supplementary groups (``setpriv``). When
    Python lives where UID 1000 cannot enter (pyenv under /root), it is bind-mounted elsewhere
    in a private mount namespace: nothing on the machine changes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.tmp.mkdir()
        os.chown(self.tmp, UID, UID)
        prefix = Path(sys.base_prefix)
        self.mount: list[str] = []
        self.python_home = prefix
        if not _traversable_by_others(prefix):
            self.python_home = root / "python"
            self.python_home.mkdir()
            self.mount = [str(prefix), str(self.python_home)]

    def entrypoint(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        python = self.python_home / "bin" / Path(sys.executable).name
        environ = {
            "PATH": f"{self.python_home / 'bin'}:/usr/bin:/bin",
            "LD_LIBRARY_PATH": str(self.python_home / "lib"),
            "PYTHONPATH": str(REPO),
            "HOME": "/nonexistent",
            "TMPDIR": str(self.tmp),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
            "STORAGE_INITIALIZER_CONFIG": os.devnull,
        }
        command = ["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups"]
        command += ["env", "-i", *(f"{k}={v}" for k, v in environ.items())]
        command += [str(python), "-m", "storage_initializer.entrypoint", *map(str, args)]
        if self.mount:
            script = 'mount --make-rprivate / && mount --bind "$1" "$2" && shift 2 && exec "$@"'
            command = ["unshare", "-m", "sh", "-c", script, "sh", *self.mount, *command]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def unprivileged() -> Iterator[_Unprivileged]:
    if os.geteuid() != 0:
        pytest.skip("switching to UID 1000 needs root")
    for tool in ("setpriv", "unshare", "mount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} (util-linux) is not installed")
    if sys.prefix != sys.base_prefix and not _traversable_by_others(Path(sys.prefix)):
        pytest.skip(f"the virtualenv {sys.prefix} is not readable by UID {UID}")
    if not _traversable_by_others(REPO):
        pytest.skip(f"the work tree {REPO} is not readable by UID {UID}")
    root = Path(tempfile.mkdtemp(prefix="si-uid-", dir="/tmp"))
    os.chmod(root, 0o755)
    try:
        yield _Unprivileged(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("mode", [0o755, 0o700], ids=["root-0755", "root-0700-unreadable"])
def test_destination_this_uid_cannot_write(
    nginx: Nginx, unprivileged: _Unprivileged, mode: int
) -> None:
    folder = nginx.new_dir()
    nginx.put(f"{folder}/model.bin", pattern(5_000, 75))
    url = nginx.url(f"{folder}/model.bin")
    dest = unprivileged.root / "models"
    dest.mkdir()
    os.chmod(dest, mode)  # owned by root: UID 1000 may at most read it
    assert dest.stat().st_uid == 0

    result = unprivileged.entrypoint(_with_password(url), dest)

    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert "ERROR" in last and _redacted(url) in last, output
    assert f"{dest} is not writable by UID {UID}" in last, output
    assert "fsGroup" in last, output  # what to do about it
    assert PASSWORD not in output
    assert "Traceback" not in output
    assert os.listdir(dest) == []  # nothing written: no state directory, no model file
    assert [r for r in nginx.requests(folder) if r.method == "GET"] == []
