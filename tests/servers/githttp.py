"""Real git servers on 127.0.0.1: ``git http-backend`` behind nginx (through fcgiwrap), and
``git daemon`` for ``git://``.

Why real servers: the git smart-HTTP protocol (ref advertisement, negotiation, shallow fetches,
protocol v2, what a server refuses) is what breaks clients, so the tests talk to the same
``git http-backend`` a Gitea/GitLab-style install runs, with nginx doing basic auth as such
installs do. Repositories are built in the fixture with the ``git`` CLI.

Locations of the nginx server:

* ``/git/<name>.git``: anonymous read access to every repository;
* ``/auth/<name>.git``: the same repositories behind HTTP basic auth (:data:`USER` /
  :attr:`GitHttp.password`).

The nginx access log (``METHOD URI STATUS BYTES "RANGE"``) counts the requests that reach the
origin, e.g. one ``git-upload-pack`` POST per clone.

Debian packages: ``git``, ``fcgiwrap``, ``nginx``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from tests.servers.nginx import Nginx, start_nginx
from tests.servers.process import end_process, free_port

FCGIWRAP = shutil.which("fcgiwrap") or "/usr/sbin/fcgiwrap"
GIT = shutil.which("git") or "/usr/bin/git"
HTTP_BACKEND = "/usr/lib/git-core/git-http-backend"
USER = "modeluser"
DEADLINE = 20.0
#: Environment of every git CLI call: reproducible, and blind to the caller's git config.
GIT_ENV = {
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_TERMINAL_PROMPT": "0",
}


def git(*args: str | os.PathLike[str], cwd: Path | None = None) -> str:
    """Run the git CLI; return its stdout (stripped)."""
    env = {**os.environ, **GIT_ENV}
    done = subprocess.run(
        [GIT, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(map(str, args))} failed: {done.stderr}")
    return done.stdout.strip()


def _wait_for(check: object, what: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        if check():  # type: ignore[operator]
            return
        time.sleep(0.02)  # readiness-probe interval
    raise RuntimeError(f"{what} was not ready before the deadline")


def _can_connect(address: str | tuple[str, int]) -> bool:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            sock.connect(address)
        return True
    except OSError:
        return False


class RepoBuilder:
    """A working clone of one bare repository served by the servers; commit, tag, push."""

    def __init__(self, bare: Path, work: Path) -> None:
        self.bare = bare
        self.work = work
        git("init", "-q", "--bare", "-b", "main", bare)
        git("init", "-q", "-b", "main", work)
        git("remote", "add", "origin", bare, cwd=work)

    def commit(
        self, files: Mapping[str, bytes], message: str = "update", remove: tuple[str, ...] = ()
    ) -> str:
        for name, data in files.items():
            target = self.work / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        for name in remove:
            git("rm", "-q", "-r", name, cwd=self.work)
        git("add", "-A", cwd=self.work)
        git("commit", "-q", "--allow-empty", "-m", message, cwd=self.work)
        return git("rev-parse", "HEAD", cwd=self.work)

    def symlink(self, name: str, target: str) -> None:
        path = self.work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, path)

    def branch(self, name: str) -> None:
        """Create ``name`` at the current commit and switch to it."""
        git("checkout", "-q", "-b", name, cwd=self.work)

    def checkout(self, name: str) -> None:
        git("checkout", "-q", name, cwd=self.work)

    def tag(self, name: str, annotated: bool = False) -> None:
        if annotated:
            git("tag", "-a", name, "-m", f"release {name}", cwd=self.work)
        else:
            git("tag", name, cwd=self.work)

    def push(self) -> None:
        git("push", "-q", "--all", "origin", cwd=self.work)
        git("push", "-q", "--tags", "origin", cwd=self.work)


class GitHttp:
    """nginx + fcgiwrap + git http-backend, and a ``git daemon``, over one repository root."""

    def __init__(self, prefix: Path) -> None:
        self.prefix = prefix
        self.repos = prefix / "repos"
        self.repos.mkdir(parents=True, exist_ok=True)
        self.socket = prefix / "fcgiwrap.sock"
        self.htpasswd = prefix / "htpasswd"
        self.password = "pw-" + secrets.token_hex(12)
        self.nginx: Nginx | None = None
        self.fcgiwrap: subprocess.Popen[bytes] | None = None
        self.daemon: subprocess.Popen[bytes] | None = None
        self.daemon_port = 0

    def _locations(self, docroot: Path, token: str) -> str:
        params = f"""
            fastcgi_pass unix:{self.socket};
            fastcgi_param SCRIPT_FILENAME {HTTP_BACKEND};
            fastcgi_param GIT_PROJECT_ROOT {self.repos};
            fastcgi_param GIT_HTTP_EXPORT_ALL "";
            fastcgi_param PATH_INFO $path;
            fastcgi_param QUERY_STRING $query_string;
            fastcgi_param REQUEST_METHOD $request_method;
            fastcgi_param CONTENT_TYPE $content_type;
            fastcgi_param CONTENT_LENGTH $content_length;
            fastcgi_param REMOTE_USER $remote_user;
            fastcgi_param REMOTE_ADDR $remote_addr;
            fastcgi_param SERVER_PROTOCOL $server_protocol;
            fastcgi_param GIT_PROTOCOL $http_git_protocol;
            fastcgi_param HOME {self.prefix};
        """
        return f"""
        client_max_body_size 0;
        location ~ ^/git(?<path>/.*)$ {{
            {params}
        }}
        location ~ ^/auth(?<path>/.*)$ {{
            auth_basic "git";
            auth_basic_user_file {self.htpasswd};
            {params}
        }}
        """

    def start(self) -> GitHttp:
        hashed = subprocess.run(
            ["openssl", "passwd", "-apr1", self.password],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        self.htpasswd.write_text(f"{USER}:{hashed}\n")
        self.fcgiwrap = subprocess.Popen(
            [FCGIWRAP, "-c", "4", "-s", f"unix:{self.socket}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **GIT_ENV},
            start_new_session=True,  # its pre-forked children are stopped with it (killpg)
        )
        _wait_for(lambda: _can_connect(str(self.socket)), "fcgiwrap", self.fcgiwrap)
        (self.prefix / "nginx").mkdir(exist_ok=True)
        self.nginx = start_nginx(self.prefix / "nginx", self._locations)
        for _attempt in range(5):
            self.daemon_port = free_port()
            self.daemon = subprocess.Popen(
                [
                    GIT, "daemon", "--reuseaddr", "--export-all", "--informative-errors",
                    "--listen=127.0.0.1", f"--port={self.daemon_port}",
                    f"--base-path={self.repos}", str(self.repos),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={**os.environ, **GIT_ENV},
            )  # fmt: skip
            try:
                _wait_for(
                    lambda: _can_connect(("127.0.0.1", self.daemon_port)), "git daemon", self.daemon
                )
                break
            except RuntimeError:
                self.daemon.wait(timeout=5)
        return self

    def stop(self) -> None:
        if self.nginx is not None:
            self.nginx.stop()
        if self.fcgiwrap is not None and self.fcgiwrap.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.fcgiwrap.pid, signal.SIGTERM)
        for process in (self.fcgiwrap, self.daemon):
            end_process(process)

    # -- repositories and URLs ---------------------------------------------------------------

    def new_repo(self, name: str | None = None) -> tuple[str, RepoBuilder]:
        """A fresh bare repository (unique name) and a builder for its content."""
        name = name or f"m-{secrets.token_hex(5)}"
        builder = RepoBuilder(self.repos / f"{name}.git", self.prefix / "work" / name)
        return name, builder

    def url(self, name: str, *, auth: bool = False, userinfo: str = "") -> str:
        assert self.nginx is not None
        location = "auth" if auth else "git"
        at = f"{userinfo}@" if userinfo else ""
        return f"http://{at}127.0.0.1:{self.nginx.http_port}/{location}/{name}.git"

    def https_url(self, name: str) -> str:
        assert self.nginx is not None
        return f"https://127.0.0.1:{self.nginx.https_port}/git/{name}.git"

    def daemon_url(self, name: str) -> str:
        return f"git://127.0.0.1:{self.daemon_port}/{name}.git"

    def upload_packs(self, name: str) -> int:
        """POSTs of git-upload-pack for ``name`` (one per fetch round) seen by nginx."""
        assert self.nginx is not None
        return len(
            [r for r in self.nginx.requests(f"/{name}.git/git-upload-pack") if r.method == "POST"]
        )

    def requests_for(self, name: str) -> list[str]:
        assert self.nginx is not None
        return [f"{r.method} {r.uri}" for r in self.nginx.requests(f"/{name}.git/")]


@pytest.fixture(scope="session")
def git_server() -> Iterator[GitHttp]:
    prefix = Path(tempfile.mkdtemp(prefix="si-git-"))
    server = GitHttp(prefix).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(prefix, ignore_errors=True)
