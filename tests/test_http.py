"""HTTP(S) sources against real nginx: content, permissions, TLS trust, headers, archives,
checksum pins and ranged chunked downloads (the access log shows every request made).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import (
    STATE_DIR,
    clean_env,
    cli,
    digests,
    entrypoint,
    marker_path,
    model_files,
    modes,
    pattern,
    sample_model,
    sha256,
    tar_bytes,
    tree_digest,
    zip_bytes,
)
from tests.servers.nginx import Nginx


def _publish(nginx: Nginx, name: str, data: bytes) -> tuple[str, str]:
    """Put ``data`` in a fresh docroot folder; returns (folder, path below the docroot)."""
    folder = nginx.new_dir()
    return folder, nginx.put(f"{folder}/{name}", data)


def test_http_download_is_identical_and_read_only(nginx: Nginx, tmp: Path) -> None:
    data = pattern(200_000, 10)
    folder, path = _publish(nginx, "model.bin", data)
    result = cli("pull", nginx.url(path), tmp / "dest")
    assert result.returncode == 0, result.describe()
    assert tree_digest(tmp / "dest") == {"model.bin": sha256(data)}
    assert modes(tmp / "dest") == {"model.bin": 0o444}
    methods = [r.method for r in nginx.wait_requests(folder, 2)]
    assert methods == ["HEAD", "GET"]


def test_read_only_archive_tree_has_0555_directories(nginx: Nginx, tmp: Path) -> None:
    model = sample_model(1)
    _folder, path = _publish(nginx, "model.tar.gz", tar_bytes(model, "w:gz"))
    result = cli("pull", nginx.url(path), tmp / "dest")
    assert result.returncode == 0, result.describe()
    found = modes(tmp / "dest")
    assert {found[name] for name in model} == {0o444}
    assert found["weights"] == 0o555
    assert found["weights/extra"] == 0o555


def test_writable_gives_group_writable_files_and_dirs(nginx: Nginx, tmp: Path) -> None:
    model = sample_model(2)
    _folder, path = _publish(nginx, "model.tar", tar_bytes(model))
    result = cli("pull", "--writable", nginx.url(path), tmp / "dest")
    assert result.returncode == 0, result.describe()
    found = modes(tmp / "dest")
    for name, mode in found.items():
        assert mode & 0o660 == 0o660, (name, oct(mode))
    assert tree_digest(tmp / "dest") == digests(model)


# -- TLS -------------------------------------------------------------------------------------


def test_https_trusted_with_requests_ca_bundle(nginx: Nginx, tmp: Path) -> None:
    data = pattern(70_000, 11)
    _folder, path = _publish(nginx, "model.bin", data)
    env = clean_env(REQUESTS_CA_BUNDLE=str(nginx.cert))
    result = cli("pull", nginx.url(path, https=True), tmp / "dest", env=env)
    assert result.returncode == 0, result.describe()
    assert tree_digest(tmp / "dest") == {"model.bin": sha256(data)}


def test_https_trusted_with_the_global_ca_bundle(nginx: Nginx, tmp: Path) -> None:
    """KServe's global CA: a ConfigMap mounted at CA_BUNDLE_VOLUME_MOUNT_POINT/cabundle.crt."""
    data = pattern(70_000, 12)
    _folder, path = _publish(nginx, "model.bin", data)
    mount = tmp / "custom-certs"
    mount.mkdir()
    (mount / "cabundle.crt").write_bytes(nginx.cert.read_bytes())
    env = clean_env(CA_BUNDLE_CONFIGMAP_NAME="x", CA_BUNDLE_VOLUME_MOUNT_POINT=str(mount))
    result = entrypoint(nginx.url(path, https=True), tmp / "dest", env=env)
    assert result.returncode == 0, result.describe()
    assert tree_digest(tmp / "dest") == {"model.bin": sha256(data)}


def test_https_untrusted_is_refused(nginx: Nginx, tmp: Path) -> None:
    _folder, path = _publish(nginx, "model.bin", b"secret model")
    url = nginx.url(path, https=True)
    result = entrypoint(url, tmp / "dest")
    assert result.returncode == 1, result.describe()
    assert "TLS" in result.last_line
    assert url in result.last_line
    assert model_files(tmp / "dest") == {}


# -- credentials in <host>-headers ---------------------------------------------------------


def test_host_headers_give_access_and_stay_secret(nginx: Nginx, tmp: Path) -> None:
    data = pattern(30_000, 13)
    _folder, path = _publish(nginx, "model.bin", data)
    url = nginx.url(path, location="private")
    denied = entrypoint(url, tmp / "denied")
    assert denied.returncode == 1
    assert "401" in denied.last_line
    headers = json.dumps({"Authorization": f"Bearer {nginx.token}"})
    env = clean_env({"127.0.0.1-headers": headers})
    result = entrypoint(url, tmp / "dest", env=env)
    assert result.returncode == 0, result.describe()
    assert tree_digest(tmp / "dest") == {"model.bin": sha256(data)}
    assert nginx.token not in result.output
    assert nginx.token not in marker_path(tmp / "dest").read_text()
    status = cli("status", "--json", tmp / "dest", env=env)
    assert nginx.token not in status.output


@pytest.mark.parametrize("value", ["Bearer not-json-abcdef", '["Authorization"]'])
def test_malformed_host_headers_fail_naming_the_variable(
    nginx: Nginx, tmp: Path, value: str
) -> None:
    _folder, path = _publish(nginx, "model.bin", b"payload")
    env = clean_env({"127.0.0.1-headers": value})
    result = entrypoint(nginx.url(path), tmp / "dest", env=env)
    assert result.returncode == 1, result.describe()
    assert "the environment variable 127.0.0.1-headers is not a JSON object" in result.output
    assert "not-json-abcdef" not in result.output  # the text may hold a token: never shown
    assert model_files(tmp / "dest") == {}


# -- archives ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "build"),
    [
        ("model.tar.gz", lambda m: tar_bytes(m, "w:gz")),
        ("model.tgz", lambda m: tar_bytes(m, "w:gz")),
        ("model.tar", tar_bytes),
        ("model.zip", zip_bytes),
    ],
)
def test_archives_are_extracted_and_removed(nginx: Nginx, tmp: Path, name: str, build) -> None:  # type: ignore[no-untyped-def]
    model = sample_model(3)
    _folder, path = _publish(nginx, name, build(model))
    result = entrypoint(nginx.url(path), tmp / "dest")
    assert result.returncode == 0, result.describe()
    assert tree_digest(tmp / "dest") == digests(model)
    assert not (tmp / "dest" / name).exists()
    verify = cli("verify", tmp / "dest")
    assert verify.returncode == 0, verify.describe()


# -- integrity pin -------------------------------------------------------------------------


def test_sha256_pin_that_matches(nginx: Nginx, tmp: Path) -> None:
    data = pattern(40_000, 14)
    _folder, path = _publish(nginx, "model.bin", data)
    result = cli("pull", f"{nginx.url(path)}#sha256={sha256(data)}", tmp / "dest")
    assert result.returncode == 0, result.describe()
    assert tree_digest(tmp / "dest") == {"model.bin": sha256(data)}
    marker = json.loads(marker_path(tmp / "dest").read_text())
    assert marker["files"][0]["checksums"]["sha256"] == sha256(data)


def test_sha256_pin_that_does_not_match(nginx: Nginx, tmp: Path) -> None:
    data = pattern(40_000, 15)
    _folder, path = _publish(nginx, "model.bin", data)
    wrong = sha256(b"something else")
    url = f"{nginx.url(path)}#sha256={wrong}"
    result = entrypoint(url, tmp / "dest")
    assert result.returncode == 1, result.describe()
    assert "model.bin" in result.last_line
    assert nginx.url(path) in result.last_line
    assert model_files(tmp / "dest") == {}
    assert not marker_path(tmp / "dest").exists()


# -- ranged chunks -------------------------------------------------------------------------


def test_large_file_is_fetched_in_ranged_chunks(nginx: Nginx, tmp: Path) -> None:
    size = 5 * 1024 * 1024 + 123
    data = pattern(size, 16)
    folder, path = _publish(nginx, "big.bin", data)
    result = cli("pull", "--chunk-size", "1MiB", nginx.url(path), tmp / "dest")
    assert result.returncode == 0, result.describe()
    assert (tmp / "dest" / "big.bin").read_bytes() == data
    gets = [r for r in nginx.wait_requests(folder, 7) if r.method == "GET"]
    assert len(gets) == 6, gets
    assert all(r.status == 206 for r in gets)
    assert sorted(r.range for r in gets) == sorted(
        f"bytes={s}-{min(s + (1 << 20), size) - 1}" for s in range(0, size, 1 << 20)
    )
    assert sum(r.bytes_sent for r in gets) == size


@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_sizes_at_chunk_boundaries(nginx: Nginx, tmp: Path, delta: int) -> None:
    chunk = 64 * 1024
    size = chunk + delta
    data = pattern(size, 17 + delta)
    folder, path = _publish(nginx, "edge.bin", data)
    env = clean_env(STORAGE_INITIALIZER_CHUNK_SIZE="64KiB")
    result = cli("pull", nginx.url(path), tmp / "dest", env=env)
    assert result.returncode == 0, result.describe()
    assert (tmp / "dest" / "edge.bin").read_bytes() == data
    expected = 2 if size > chunk else 1
    gets = [r for r in nginx.wait_requests(folder, 1 + expected) if r.method == "GET"]
    assert len(gets) == expected, gets
    assert sum(r.bytes_sent for r in gets) == size
    if expected == 2:
        assert sorted(r.range for r in gets) == [f"bytes=0-{chunk - 1}", f"bytes={chunk}-{chunk}"]


def test_state_directory_is_the_only_extra_entry(nginx: Nginx, tmp: Path) -> None:
    """A model server listing DEST sees the model and one hidden directory, nothing else."""
    _folder, path = _publish(nginx, "model.bin", b"m" * 1000)
    result = cli("pull", nginx.url(path), tmp / "dest")
    assert result.returncode == 0, result.describe()
    assert sorted(p.name for p in (tmp / "dest").iterdir()) == [STATE_DIR, "model.bin"]
