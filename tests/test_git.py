"""git sources against real servers: ``git http-backend`` behind nginx (anonymous and basic
auth, HTTP and HTTPS) and ``git daemon`` (``git://``), repositories built with the git CLI.

What is proved: the tree at the asked ref (branch, light and annotated tag, advertised and
unadvertised commits, abbreviated sha) with no ``.git``; the commit as fingerprint; credentials
right/wrong/missing and never printed; clear errors (unknown ref, missing repository,
unreachable host); links and submodules; end-to-end through the CLI; eight replicas, one clone;
and git served by a plain install (dulwich is a core dependency).
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest

from storage_initializer import schemes
from storage_initializer.errors import AccessDeniedError, NotFoundError, SourceError, UsageError
from storage_initializer.providers import open_source
from storage_initializer.providers.git import parse_location
from storage_initializer.settings import Settings
from storage_initializer.uri import parse
from tests.helpers import (
    NO_STOCK_REASON,
    STATE_DIR,
    clean_env,
    cli,
    cli_argv,
    marker_path,
    model_files,
    start_all,
    stock_download,
    stock_python,
    tree_digest,
    wait_all,
)
from tests.servers.githttp import USER, GitHttp, RepoBuilder, git, git_server
from tests.servers.process import free_port

__all__ = ["git_server"]


@pytest.fixture(autouse=True)
def _no_git_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GIT_USERNAME", "GIT_PASSWORD", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        monkeypatch.delenv(name, raising=False)


class Repo:
    """A repository with history: three commits on main, a branch, light and annotated tags."""

    def __init__(self, server: GitHttp) -> None:
        self.name, builder = server.new_repo()
        self.builder: RepoBuilder = builder
        self.first = builder.commit({"config.json": b'{"v": 1}', "weights/a.bin": b"a" * 3000})
        builder.tag("v1")
        builder.tag("v1-annotated", annotated=True)
        self.middle = builder.commit({"config.json": b'{"v": 2}'})
        self.head = builder.commit({"config.json": b'{"v": 3}', "README.md": b"# model\n"})
        builder.branch("experiment")
        self.experiment = builder.commit({"config.json": b'{"v": "x"}'})
        builder.checkout("main")
        builder.push()


@pytest.fixture(scope="module")
def repo(git_server: GitHttp) -> Repo:
    return Repo(git_server)


def listing(url: str) -> tuple[str, dict[str, bytes]]:
    source = open_source(parse(url), Settings())
    try:
        found = source.list()
        files = {f.path: b"".join(source.read(f)) for f in found.files}
        for f in found.files:
            assert f.size == len(files[f.path])
        return found.fingerprint, files
    finally:
        source.close()


def git_env(**more: str) -> dict[str, str]:
    env = clean_env(STORAGE_INITIALIZER_LOG_FORMAT="json")
    for name in ("GIT_USERNAME", "GIT_PASSWORD"):
        env.pop(name, None)
    env.update(more)
    return env


# -- refs and layout -----------------------------------------------------------------------------


def test_default_is_the_remote_head_without_git_metadata(git_server: GitHttp, repo: Repo) -> None:
    fingerprint, files = listing(git_server.url(repo.name))
    assert fingerprint == repo.head
    assert files == {
        "config.json": b'{"v": 3}',
        "README.md": b"# model\n",
        "weights/a.bin": b"a" * 3000,
    }


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("main", "head"),
        ("experiment", "experiment"),
        ("v1", "first"),
        ("v1-annotated", "first"),
        ("first", "first"),  # full sha of a tagged commit
        ("middle", "middle"),  # full sha that no ref advertises
        ("middle8", "middle"),  # abbreviated sha: full fetch, then resolved
    ],
)
def test_refs(git_server: GitHttp, repo: Repo, ref: str, expected: str) -> None:
    if ref in ("first", "middle"):
        ref = getattr(repo, ref)
    elif ref == "middle8":
        ref = repo.middle[:8]
    fingerprint, files = listing(f"{git_server.url(repo.name)}@{ref}")
    assert fingerprint == getattr(repo, expected)
    version = {"head": b"3", "experiment": b'"x"', "first": b"1", "middle": b"2"}[expected]
    assert files["config.json"] == b'{"v": ' + version + b"}"
    assert ("README.md" in files) == (expected in ("head", "experiment"))


def test_git_daemon_protocol(git_server: GitHttp, repo: Repo) -> None:
    fingerprint, files = listing(f"{git_server.daemon_url(repo.name)}@v1")
    assert fingerprint == repo.first
    assert set(files) == {"config.json", "weights/a.bin"}


def test_https_with_the_servers_ca(
    git_server: GitHttp, repo: Repo, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = git_server.https_url(repo.name)
    with pytest.raises(SourceError, match="TLS verification failed"):
        listing(url)
    assert git_server.nginx is not None
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(git_server.nginx.cert))
    assert listing(url)[0] == repo.head


def test_unknown_ref_names_the_refs_that_exist(
    git_server: GitHttp, repo: Repo, tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch = tmp / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with pytest.raises(NotFoundError, match="no branch, tag or commit named 'nope'") as caught:
        listing(f"{git_server.url(repo.name)}@nope")
    assert "experiment" in caught.value.describe() and "v1" in caught.value.describe()
    with pytest.raises(NotFoundError, match="no branch, tag or commit named 'deadbeef'"):
        listing(f"{git_server.url(repo.name)}@deadbeef")
    assert list(scratch.iterdir()) == []  # a failed listing leaves nothing in $TMPDIR


def test_missing_repository_and_unreachable_host(git_server: GitHttp) -> None:
    with pytest.raises(NotFoundError, match="not found"):
        listing(git_server.url("no-such-repo"))
    with pytest.raises(SourceError, match="cannot reach the git server"):
        listing(f"http://127.0.0.1:{free_port()}/x/model.git")


def test_links_submodules_and_lfs_pointers(git_server: GitHttp) -> None:
    name, builder = git_server.new_repo()
    builder.symlink("latest.bin", "weights/real.bin")
    builder.symlink("current", "weights")
    builder.symlink("escape", "../../../etc/passwd")
    lfs = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 9\n"
    builder.commit({"weights/real.bin": b"real", "big.safetensors": lfs})
    sub = git("rev-parse", "HEAD", cwd=builder.work)
    git("update-index", "--add", "--cacheinfo", f"160000,{sub},vendored", cwd=builder.work)
    git("commit", "-q", "-m", "submodule", cwd=builder.work)
    builder.push()
    _, files = listing(git_server.url(name))
    assert files == {
        "weights/real.bin": b"real",
        "latest.bin": b"real",
        "current/real.bin": b"real",
        "big.safetensors": lfs,
    }


def test_location_parsing() -> None:
    env = {"GIT_USERNAME": "env-user", "GIT_PASSWORD": "env-secret"}
    found = parse_location("https://url-user@host/o/m.git@release/v1", env)
    assert (found.url, found.ref, found.username) == (
        "https://host/o/m.git",
        "release/v1",
        "url-user",
    )
    assert found.password == "env-secret"
    found = parse_location("https://u:in-url-secret@host/m.git", {})
    assert (found.url, found.ref, found.password) == ("https://host/m.git", None, "in-url-secret")
    with pytest.raises(UsageError):
        parse_location("https://host/model", {})


# -- credentials ---------------------------------------------------------------------------------


def test_credentials_right_wrong_missing(
    git_server: GitHttp, repo: Repo, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = git_server.url(repo.name, auth=True)
    with pytest.raises(AccessDeniedError, match="requires authentication"):
        listing(url)
    monkeypatch.setenv("GIT_USERNAME", USER)
    monkeypatch.setenv("GIT_PASSWORD", "wrong-password-123")
    with pytest.raises(AccessDeniedError, match="refused the credentials"):
        listing(url)
    monkeypatch.setenv("GIT_PASSWORD", git_server.password)
    assert listing(url)[0] == repo.head
    # A user in the URL wins over GIT_USERNAME (stock behaviour).
    monkeypatch.setenv("GIT_USERNAME", "somebody-else")
    assert listing(git_server.url(repo.name, auth=True, userinfo=USER))[0] == repo.head


def test_secrets_never_in_output_or_marker(git_server: GitHttp, repo: Repo, tmp: Path) -> None:
    url = git_server.url(repo.name, auth=True, userinfo=USER)
    wrong = cli("pull", url, tmp / "a", env=git_env(GIT_PASSWORD="wrong-password-123"))
    assert wrong.returncode == 1
    assert "refused the credentials" in wrong.last_line and repo.name in wrong.last_line
    assert "wrong-password-123" not in wrong.output
    # A password written in the URL is used, and masked.
    inline = git_server.url(repo.name, auth=True, userinfo=f"{USER}:{git_server.password}")
    done = cli("pull", inline, tmp / "b", env=git_env())
    assert done.returncode == 0, done.describe()
    assert git_server.password not in done.output
    assert git_server.password not in marker_path(tmp / "b").read_text()
    done = cli("pull", url, tmp / "c", env=git_env(GIT_PASSWORD=git_server.password))
    assert done.returncode == 0, done.describe()
    assert git_server.password not in done.output


# -- end to end ----------------------------------------------------------------------------------


def test_cli_pull_end_to_end(git_server: GitHttp, repo: Repo, tmp: Path) -> None:
    dest = tmp / "model"
    done = cli("pull", f"{git_server.url(repo.name)}@v1", dest, env=git_env())
    assert done.returncode == 0, done.describe()
    assert sorted(model_files(dest)) == ["config.json", "weights/a.bin"]
    assert not (dest / ".git").exists()
    marker = json.loads(marker_path(dest).read_text())
    assert marker["fingerprint"] == repo.first
    assert {f["path"]: f["checksums"]["sha256"] for f in marker["files"]} == tree_digest(dest)
    assert not os.access(dest / "config.json", os.W_OK) or os.geteuid() == 0
    assert (dest / "config.json").stat().st_mode & 0o777 == 0o444
    again = cli("pull", f"{git_server.url(repo.name)}@v1", dest, env=git_env())
    assert again.returncode == 0 and again.outcome() == "complete"
    unknown = cli("pull", f"{git_server.url(repo.name)}@nope", tmp / "x", env=git_env())
    assert unknown.returncode == 1
    assert "no branch, tag or commit named 'nope'" in unknown.last_line


# -- keeping .git (git_keep_metadata) ------------------------------------------------------------


def _git_in(dest: Path, *args: str) -> str:
    """The real git CLI run inside the pulled model (HOME isolated from the user's config)."""
    done = subprocess.run(
        ["git", "-C", str(dest), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HOME": str(dest.parent), "GIT_CONFIG_NOSYSTEM": "1"},
    )
    assert done.returncode == 0, f"git {' '.join(args)}: {done.stderr}"
    return done.stdout.strip()


@pytest.mark.parametrize(
    ("ref", "commit", "branch"),
    [
        (None, "head", "main"),  # the remote HEAD, checked out on its branch, as a clone would
        ("experiment", "experiment", "experiment"),
        ("v1-annotated", "first", None),  # a tag: detached HEAD, the tags kept
        ("middle", "middle", None),  # a commit no ref advertises: detached HEAD, no refs
    ],
)
def test_keep_metadata_leaves_a_working_git_repository(
    git_server: GitHttp, repo: Repo, tmp: Path, ref: str | None, commit: str, branch: str | None
) -> None:
    """STORAGE_INITIALIZER_GIT_KEEP_METADATA=true: the model holds a .git in which the real git
    CLI shows the pulled commit (git log), a clean work tree (git status), the branch or a
    detached HEAD, and origin without credentials; its files are in the marker, verified."""
    sha = getattr(repo, commit)
    url = git_server.url(repo.name, auth=True, userinfo=USER)
    uri = url if ref is None else f"{url}@{getattr(repo, ref) if ref == 'middle' else ref}"
    dest = tmp / "model"
    env = git_env(STORAGE_INITIALIZER_GIT_KEEP_METADATA="true", GIT_PASSWORD=git_server.password)
    done = cli("pull", uri, dest, env=env)
    assert done.returncode == 0, done.describe()
    # Before any git command: `git status` may refresh .git/index where it can write (root).
    marker = json.loads(marker_path(dest).read_text())
    assert marker["fingerprint"] == sha + "+.git"
    recorded = {f["path"]: f["checksums"]["sha256"] for f in marker["files"]}
    assert recorded == tree_digest(dest)
    assert ".git/HEAD" in recorded and any(p.endswith(".pack") for p in recorded)
    assert _git_in(dest, "log", "-1", "--format=%H") == sha
    shallow = _git_in(dest, "rev-parse", "--is-shallow-repository")
    assert shallow == "true" or ref == "middle", shallow  # middle: shallow if the server allows
    assert _git_in(dest, "status", "--porcelain") == ""
    assert _git_in(dest, "rev-parse", "--abbrev-ref", "HEAD") == (branch or "HEAD")
    assert _git_in(dest, "remote", "get-url", "origin") == git_server.url(repo.name, auth=True)
    assert _git_in(dest, "cat-file", "-p", f"{sha}:config.json") == (
        (dest / "config.json").read_text()
    )
    _git_in(dest, "fsck", "--no-dangling")
    if ref == "v1-annotated":
        assert set(_git_in(dest, "tag", "--points-at", "HEAD").split()) == {"v1", "v1-annotated"}
    assert git_server.password not in (dest / ".git" / "config").read_text()


def test_keep_metadata_from_the_config_file_and_with_filters(
    git_server: GitHttp, repo: Repo, tmp: Path
) -> None:
    """The config-file key git_keep_metadata works too; filters that would cut .git in pieces
    leave no .git at all (a partial one is not a repository) and say how to keep it; --revalidate
    after turning the setting on brings .git to a model pulled without it."""
    config = tmp / "config.yaml"
    config.write_text("git_keep_metadata: true\n")
    url = git_server.url(repo.name)
    done = cli("pull", url, tmp / "a", env=git_env(STORAGE_INITIALIZER_CONFIG=str(config)))
    assert done.returncode == 0, done.describe()
    assert _git_in(tmp / "a", "log", "-1", "--format=%H") == repo.head
    filtered = cli(
        "pull",
        url,
        tmp / "b",
        env=git_env(STORAGE_INITIALIZER_CONFIG=str(config), STORAGE_ALLOW_PATTERNS="*.json"),
    )
    assert filtered.returncode == 0, filtered.describe()
    assert sorted(model_files(tmp / "b")) == ["config.json"]
    assert "add '.git/*' to the include patterns" in filtered.stderr
    kept = cli(
        "pull",
        url,
        tmp / "c",
        env=git_env(STORAGE_INITIALIZER_CONFIG=str(config), STORAGE_ALLOW_PATTERNS="*.json,.git/*"),
    )
    assert kept.returncode == 0, kept.describe()
    assert _git_in(tmp / "c", "log", "-1", "--format=%H") == repo.head
    plain = cli("pull", url, tmp / "d", env=git_env())
    assert plain.returncode == 0 and not (tmp / "d" / ".git").exists()
    again = cli(
        "pull",
        "--revalidate",
        url,
        tmp / "d",
        env=git_env(STORAGE_INITIALIZER_GIT_KEEP_METADATA="1"),
    )
    assert again.returncode == 0, again.describe()
    assert again.outcome() == "downloaded"
    assert _git_in(tmp / "d", "log", "-1", "--format=%H") == repo.head


def test_eight_replicas_clone_once(git_server: GitHttp, tmp: Path) -> None:
    name, builder = git_server.new_repo()
    builder.commit({f"shard-{i}.bin": os.urandom(200_000) for i in range(6)})
    builder.push()
    url = git_server.url(name)
    baseline = cli("pull", url, tmp / "baseline", env=git_env())
    assert baseline.returncode == 0, baseline.describe()
    one_clone = git_server.requests_for(name)
    procs = start_all(
        [cli_argv("pull", url, tmp / "shared") for _ in range(8)], git_env(), tmp / "logs"
    )
    runs = wait_all(procs)
    for result in runs:
        assert result.returncode == 0, result.describe()
    outcomes = collections.Counter(r.outcome() for r in runs)
    assert outcomes["downloaded"] == 1, outcomes
    assert len(git_server.requests_for(name)) == 2 * len(one_clone)
    assert tree_digest(tmp / "shared") == tree_digest(tmp / "baseline")


# -- packaging -----------------------------------------------------------------------------------


def test_a_plain_install_serves_git() -> None:
    """The stock initializer serves git URIs out of the box, so a drop-in must: dulwich is a
    core dependency, not an extra, and the git row of the scheme table names no extra."""
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert any(dep.startswith("dulwich") for dep in project["dependencies"])
    assert not any(
        dep.startswith("dulwich")
        for deps in project["optional-dependencies"].values()
        for dep in deps
    )
    assert schemes.BY_KIND["git"].extra is None


def test_missing_dulwich_is_named(git_server: GitHttp, repo: Repo, tmp: Path) -> None:
    """dulwich made unimportable in a child process (a broken installation): the pull fails
    with one line naming the missing module."""
    code = (
        "import sys, runpy; sys.modules['dulwich'] = None; "
        f"sys.argv = ['storage-initializer', 'pull', {git_server.url(repo.name)!r}, "
        f"{str(tmp / 'm')!r}]; runpy.run_module('storage_initializer', run_name='__main__')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=git_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    last = [line for line in done.stderr.splitlines() if line.strip()][-1]
    assert "dulwich" in last and git_server.url(repo.name) in last, done.stderr


# -- the stock initializer on the same server ----------------------------------------------------


@pytest.mark.skipif(stock_python() is None, reason=NO_STOCK_REASON)
def test_stock_initializer_gets_the_same_tree(git_server: GitHttp, repo: Repo, tmp: Path) -> None:
    """The stock one only recognises https://….git and clones HEAD with a .git directory."""
    assert git_server.nginx is not None
    url = git_server.https_url(repo.name)
    env = git_env(SSL_CERT_FILE=str(git_server.nginx.cert))
    stock = stock_download(url, tmp / "stock", env)
    assert stock.returncode == 0, stock.stderr
    ours = cli(
        "pull", url, tmp / "ours", env=git_env(REQUESTS_CA_BUNDLE=str(git_server.nginx.cert))
    )
    assert ours.returncode == 0, ours.describe()
    stock_tree = {k: v for k, v in tree_digest(tmp / "stock").items() if not k.startswith(".git/")}
    assert (tmp / "stock" / ".git").is_dir() and not (tmp / "ours" / ".git").exists()
    assert tree_digest(tmp / "ours") == stock_tree
    assert STATE_DIR not in os.listdir(tmp / "stock")
    # With git_keep_metadata ours keeps a .git too: git sees the same commit, branch and origin.
    kept = cli(
        "pull",
        url,
        tmp / "kept",
        env=git_env(
            REQUESTS_CA_BUNDLE=str(git_server.nginx.cert), STORAGE_INITIALIZER_GIT_KEEP_METADATA="1"
        ),
    )
    assert kept.returncode == 0, kept.describe()
    for question in (
        ("log", "-1", "--format=%H"),
        ("rev-parse", "--abbrev-ref", "HEAD"),
        ("remote", "get-url", "origin"),
        ("status", "--porcelain"),
    ):
        assert _git_in(tmp / "kept", *question) == _git_in(tmp / "stock", *question), question
