"""Test utilities: run the real CLI and entrypoint as processes, start many at once, hash trees.

Everything runs as a subprocess (``sys.executable -m storage_initializer …``) because the
behaviour under test is between processes: locks, leases, exit codes, the last log line.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.servers.proxy import CountingProxy, Fault

if TYPE_CHECKING:
    from tests.servers.nginx import Nginx

REPO_ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = ".storage-initializer"
USAGE = "Usage: initializer-entrypoint src_uri_0 dest_path_0 ... src_uri_n dest_path_n"
TIMEOUT = 120.0
#: Environment variables that would change the behaviour under test if the caller had them.
_SCRUB_PREFIXES = ("STORAGE_", "AWS_", "AZURE_", "AZ_", "HF_", "GOOGLE_", "S3_")
_SCRUB_NAMES = (
    "REQUESTS_CA_BUNDLE",
    "SSL_CERT_FILE",
    "CURL_CA_BUNDLE",
    "CA_BUNDLE_CONFIGMAP_NAME",
    "CA_BUNDLE_VOLUME_MOUNT_POINT",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "http_proxy",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
    "POD_NAME",
)


def clean_env(extra: Mapping[str, str] | None = None, **more: str) -> dict[str, str]:
    """The environment of a child process: ours minus anything that configures the product,
    plus ``extra``. The default config path (/etc/storage-initializer) is pointed at an empty
    file so that a machine-wide config file cannot leak into a test."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_SCRUB_PREFIXES)
        and k not in _SCRUB_NAMES
        and not k.endswith("-headers")
    }
    env["STORAGE_INITIALIZER_CONFIG"] = str(_empty_config())
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    env.update(more)
    return env


_EMPTY_CONFIG: Path | None = None


def _empty_config() -> Path:
    global _EMPTY_CONFIG
    if _EMPTY_CONFIG is None:
        import tempfile

        handle, name = tempfile.mkstemp(prefix="si-empty-config-", suffix=".yaml")
        os.close(handle)
        _EMPTY_CONFIG = Path(name)
    return _EMPTY_CONFIG


@dataclass
class Run:
    """A finished process."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def last_line(self) -> str:
        """The last non-empty stderr line: what KServe copies into the InferenceService."""
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else ""

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def json_events(self, event: str | None = None) -> list[dict[str, Any]]:
        """Log records of a ``--log-format json`` run (optionally only one ``event``)."""
        found = []
        for line in self.stderr.splitlines():
            with contextlib.suppress(ValueError):
                data = json.loads(line)
                if isinstance(data, dict) and (event is None or data.get("event") == event):
                    found.append(data)
        return found

    def outcome(self) -> str:
        """The outcome of the (last) summary of a json-logged run."""
        events = self.json_events("summary")
        assert events, f"no summary line in:\n{self.stderr}"
        return str(events[-1]["outcome"])

    def describe(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


def cli_argv(*args: str | os.PathLike[str]) -> list[str]:
    return [sys.executable, "-m", "storage_initializer", *map(str, args)]


def entrypoint_argv(*args: str | os.PathLike[str]) -> list[str]:
    return [sys.executable, "-m", "storage_initializer.entrypoint", *map(str, args)]


def run(argv: list[str], env: Mapping[str, str] | None = None, timeout: float = TIMEOUT) -> Run:
    env = dict(env) if env is not None else clean_env()
    done = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    return Run(argv, done.returncode, done.stdout, done.stderr)


def cli(*args: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Run:
    """``storage-initializer ARGS`` as a child process."""
    return run(cli_argv(*args), env)


def entrypoint(*args: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Run:
    """``initializer-entrypoint ARGS`` as a child process."""
    return run(entrypoint_argv(*args), env)


class Proc:
    """A started child process whose output is collected into files (never a full pipe)."""

    def __init__(self, argv: list[str], env: Mapping[str, str], workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.argv = argv
        self._out = open(workdir / f"out.{id(self)}", "w+")  # noqa: SIM115 - closed in wait()
        self._err = open(workdir / f"err.{id(self)}", "w+")  # noqa: SIM115
        self.popen = subprocess.Popen(
            argv,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=self._err,
            text=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait(self, timeout: float = TIMEOUT) -> Run:
        try:
            code = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            raise
        outputs = []
        for handle in (self._out, self._err):
            handle.seek(0)
            outputs.append(handle.read())
            handle.close()
        return Run(self.argv, code, outputs[0], outputs[1])

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()


def start(argv: list[str], env: Mapping[str, str], workdir: Path) -> Proc:
    return Proc(argv, env, workdir)


def start_all(argvs: list[list[str]], env: Mapping[str, str], workdir: Path) -> list[Proc]:
    """Start every process before waiting for any: they run at the same time."""
    return [Proc(argv, env, workdir) for argv in argvs]


def wait_all(procs: list[Proc], timeout: float = TIMEOUT) -> list[Run]:
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            p.kill()


def poll_until(
    condition: Callable[[], Any], deadline: float = 30.0, what: str = "condition"
) -> Any:
    """Call ``condition`` until it returns something truthy; fail after ``deadline`` seconds."""
    end = time.monotonic() + deadline
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline}s waiting for {what}")
        time.sleep(0.02)  # polling interval


# -- the stock KServe initializer -----------------------------------------------------------

#: Why a comparison with the stock initializer is skipped (the only accepted reason).
NO_STOCK_REASON = (
    "the stock initializer is not installed: set KSERVE_STORAGE_PYTHON, or create "
    ".work/kserve-venv with kserve-storage==0.21.0 (scripts/test does)"
)


def stock_python() -> Path | None:
    """The python of the stock initializer (kserve-storage==0.21.0): KSERVE_STORAGE_PYTHON
    (exported by scripts/test), else <repo>/.work/kserve-venv, else /opt/kserve-venv."""
    candidates = [
        os.environ.get("KSERVE_STORAGE_PYTHON", ""),
        str(REPO_ROOT / ".work" / "kserve-venv" / "bin" / "python"),
        "/opt/kserve-venv/bin/python",
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def stock_download(
    uri: str, dest: Path, env: Mapping[str, str], timeout: float = TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """``Storage.download(uri, dest)`` of the stock initializer, in its own virtualenv."""
    python = stock_python()
    assert python is not None, NO_STOCK_REASON
    return subprocess.run(
        [
            str(python),
            "-c",
            "import sys; from kserve_storage import Storage; "
            "Storage.download(sys.argv[1], sys.argv[2])",
            uri,
            str(dest),
        ],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


# -- trees ---------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` (e.g. ``"64m"``) mounted at ``mount``: a volume that fills up.
    Skips the test, saying why, where this machine does not let us mount one (not root)."""
    mount.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        import pytest

        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'not root'})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def model_files(dest: Path) -> dict[str, Path]:
    """Relative path → path of every model file visible in ``dest`` (our state dir excluded,
    links followed, as a model server would see them)."""
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(dest, followlinks=True):
        if Path(dirpath) == dest and STATE_DIR in dirnames:
            dirnames.remove(STATE_DIR)
        for name in filenames:
            full = Path(dirpath) / name
            found[full.relative_to(dest).as_posix()] = full
    return found


def tree_digest(dest: Path) -> dict[str, str]:
    """Relative path → sha256 of every model file in ``dest``."""
    return {rel: sha256(full.read_bytes()) for rel, full in model_files(dest).items()}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digests(files: Mapping[str, bytes]) -> dict[str, str]:
    return {name: sha256(data) for name, data in files.items()}


def modes(dest: Path) -> dict[str, int]:
    """Relative path → permission bits of every model file and directory (links followed)."""
    found: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(dest, followlinks=True):
        if Path(dirpath) == dest and STATE_DIR in dirnames:
            dirnames.remove(STATE_DIR)
        for name in [*dirnames, *filenames]:
            full = Path(dirpath) / name
            found[full.relative_to(dest).as_posix()] = stat.S_IMODE(os.stat(full).st_mode)
    return found


def marker_path(entry: Path) -> Path:
    return entry / STATE_DIR / "marker.json"


# -- providers in process -------------------------------------------------------------------


def read_all(
    source: Any, file: Any, start: int = 0, end: int | None = None, *, chunk: int | None = None
) -> bytes:
    """Bytes ``[start, end)`` of ``file`` through ``source.read`` in one request, or, with
    ``chunk``, the whole file read in ``chunk``-sized ranges reassembled in order (what the
    engine's chunked reads do). One copy for every provider test."""
    if chunk is None:
        return b"".join(source.read(file, start, end))
    assert file.size is not None, "chunked reads need a size"
    return b"".join(
        b"".join(source.read(file, offset, min(file.size, offset + chunk)))
        for offset in range(0, file.size, chunk)
    )


def read_tree(source: Any, listing: Any) -> dict[str, bytes]:
    """Relative path -> content of every file of ``listing``, each read whole."""
    return {f.path: read_all(source, f) for f in listing.files}


def payload(size: int, seed: int | str = 0) -> bytes:
    """Deterministic, non-repeating bytes, so a misplaced range cannot go unnoticed."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def listing(uri: str, **settings: Any) -> Any:
    """The provider's listing of ``uri`` (opened with ``Settings(**settings)``, then closed)."""
    from storage_initializer.providers import open_source
    from storage_initializer.settings import Settings
    from storage_initializer.uri import parse

    source = open_source(parse(uri), Settings(**settings))
    try:
        return source.list()
    finally:
        source.close()


def paths(uri: str) -> dict[str, int | None]:
    """Relative path -> size of every file the provider lists for ``uri``."""
    return {f.path: f.size for f in listing(uri).files}


def pull_command(uri: str, dest: Path, *extra: str) -> list[str]:
    """The argv of ``storage-initializer pull URI DEST EXTRA...``."""
    return cli_argv("pull", uri, dest, *extra)


def tree(root: Path) -> dict[str, bytes]:
    """Relative path -> content of every file below ``root``, our state directory excluded."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and STATE_DIR not in p.relative_to(root).parts
    }


# -- archives ------------------------------------------------------------------------------


def tar_bytes(files: Mapping[str, bytes], mode: str = "w") -> bytes:
    """A tar archive (``mode`` "w" or "w:gz") of ``files``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:  # type: ignore[call-overload]
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def zip_bytes(files: Mapping[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def sample_model(seed: int = 0, sizes: tuple[int, ...] = (1000, 20_000, 3)) -> dict[str, bytes]:
    """A small model with nested paths and distinct, reproducible contents."""
    names = ["config.json", "weights/model.bin", "weights/extra/tokenizer.txt"]
    model = {}
    for index, size in enumerate(sizes):
        name = names[index] if index < len(names) else f"weights/part-{index}.bin"
        model[name] = pattern(size, seed * 31 + index)
    return model


def pattern(size: int, seed: int = 0) -> bytes:
    """``size`` deterministic bytes that differ between seeds and positions (no long runs, so
    a chunk written at the wrong offset is detected)."""
    block = hashlib.sha256(f"seed-{seed}".encode()).digest()
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(block + counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:size])


@contextlib.contextmanager
def truncating(nginx: Nginx, fraction: float = 0.5) -> Iterator[CountingProxy]:
    """A counting proxy in front of ``nginx`` that is the origin dying mid-transfer: every GET
    answered whole (``Range`` stripped, no ``Accept-Ranges``: a client cannot resume and must
    start over) and cut after ``fraction`` of its announced ``Content-Length``."""
    with CountingProxy(f"http://127.0.0.1:{nginx.http_port}") as proxy:
        proxy.set_faults(
            Fault(kind="strip", method="HEAD", hide_headers=("Accept-Ranges",)),
            Fault(
                kind="truncate",
                method="GET",
                truncate_fraction=fraction,
                strip_headers=("Range", "If-Range"),
                hide_headers=("Accept-Ranges",),
            ),
        )
        yield proxy
