"""Archive extraction treats every member as hostile; each test fails if its defence is removed."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from storage_initializer.archive import ArchiveError, Limits, extract
from storage_initializer.paths import UnsafePathError


def make_tar(path: Path, members: list[tarfile.TarInfo], data: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info in members:
            payload = data.get(info.name)
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return path


def file_member(name: str, payload: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mode = 0o4755  # setuid: must not survive
    return info


def test_valid_tar_is_extracted_with_hashes(tmp_path: Path) -> None:
    archive = make_tar(
        tmp_path / "m.tar.gz",
        [file_member("model/config.json", b"{}"), file_member("model/w.bin", b"x" * 1000)],
        {"model/config.json": b"{}", "model/w.bin": b"x" * 1000},
    )
    out = tmp_path / "out"
    files = {f.path: f for f in extract(archive, out)}
    assert set(files) == {"model/config.json", "model/w.bin"}
    assert (out / "model/w.bin").read_bytes() == b"x" * 1000
    assert not os.stat(out / "model/w.bin").st_mode & 0o4000


@pytest.mark.parametrize("name", ["../evil", "/etc/evil", "a/../../evil"])
def test_tar_traversal_refused(tmp_path: Path, name: str) -> None:
    archive = make_tar(tmp_path / "t.tar.gz", [file_member(name, b"bad")], {name: b"bad"})
    with pytest.raises(UnsafePathError):
        extract(archive, tmp_path / "out")
    assert not (tmp_path / "evil").exists()


def test_tar_symlink_to_etc_then_file_through_it(tmp_path: Path) -> None:
    link = tarfile.TarInfo("etc")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc"
    archive = make_tar(
        tmp_path / "t.tar.gz", [link, file_member("etc/evil", b"bad")], {"etc/evil": b"bad"}
    )
    with pytest.raises(UnsafePathError):
        extract(archive, tmp_path / "out")
    assert not Path("/etc/evil").exists()


def test_tar_relative_symlink_out_of_tree_refused(tmp_path: Path) -> None:
    link = tarfile.TarInfo("model/escape")
    link.type = tarfile.SYMTYPE
    link.linkname = "../../outside"
    archive = make_tar(tmp_path / "t.tar.gz", [link], {})
    with pytest.raises(UnsafePathError):
        extract(archive, tmp_path / "out")


def test_tar_hardlink_to_outside_refused(tmp_path: Path) -> None:
    link = tarfile.TarInfo("model/passwd")
    link.type = tarfile.LNKTYPE
    link.linkname = "/etc/passwd"
    archive = make_tar(tmp_path / "t.tar.gz", [link], {})
    with pytest.raises(UnsafePathError):
        extract(archive, tmp_path / "out")


def test_tar_internal_link_becomes_a_copy(tmp_path: Path) -> None:
    link = tarfile.TarInfo("model/alias.bin")
    link.type = tarfile.SYMTYPE
    link.linkname = "w.bin"
    archive = make_tar(
        tmp_path / "t.tar.gz", [file_member("model/w.bin", b"abc"), link], {"model/w.bin": b"abc"}
    )
    out = tmp_path / "out"
    extract(archive, out)
    alias = out / "model/alias.bin"
    assert not alias.is_symlink()
    assert alias.read_bytes() == b"abc"


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE])
def test_tar_device_nodes_refused(tmp_path: Path, kind: bytes) -> None:
    node = tarfile.TarInfo("model/dev")
    node.type = kind
    archive = make_tar(tmp_path / "t.tar.gz", [node], {})
    with pytest.raises(UnsafePathError):
        extract(archive, tmp_path / "out")


def test_zip_slip_refused(tmp_path: Path) -> None:
    archive = tmp_path / "z.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../../zip-slip.txt", b"bad")
    with pytest.raises(UnsafePathError):
        extract(archive, tmp_path / "out" / "deeper")
    assert not (tmp_path / "zip-slip.txt").exists()


def test_zip_bomb_stops_at_the_limit(tmp_path: Path) -> None:
    archive = tmp_path / "bomb.zip"
    zeros = b"\0" * (1 << 20)
    with (
        zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_BZIP2) as zf,
        zf.open("weights.bin", "w") as member,
    ):
        for _ in range(256):  # 256 MiB of zeros in a few kilobytes
            member.write(zeros)
    assert archive.stat().st_size < 64 * 1024
    out = tmp_path / "out"
    with pytest.raises(ArchiveError, match="archive bomb"):
        extract(archive, out, Limits(max_ratio=1000, ratio_floor=16 << 20))
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert written <= (16 << 20) + (1 << 20)


def test_too_many_members(tmp_path: Path) -> None:
    archive = tmp_path / "many.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(20):
            zf.writestr(f"f{i}", b"x")
    with pytest.raises(ArchiveError, match="members"):
        extract(archive, tmp_path / "out", Limits(max_members=10))


def test_corrupt_archive_is_a_clear_error(tmp_path: Path) -> None:
    archive = tmp_path / "broken.tar.gz"
    archive.write_bytes(b"\x1f\x8b\x08\x00garbage-not-a-gzip-stream" * 10)
    with pytest.raises(ArchiveError, match="corrupt or truncated"):
        extract(archive, tmp_path / "out")


def test_local_archive_pull_end_to_end(tmp_path: Path) -> None:
    """A single archive as the source is extracted into DEST and the archive removed."""
    archive = make_tar(
        tmp_path / "model.tgz",
        [file_member("config.json", b'{"a": 1}'), file_member("sub/w.bin", b"w" * 4096)],
        {"config.json": b'{"a": 1}', "sub/w.bin": b"w" * 4096},
    )
    dest = tmp_path / "dest"
    run = subprocess.run(
        [sys.executable, "-m", "storage_initializer.entrypoint", str(archive), str(dest)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert sorted(
        p.relative_to(dest).as_posix()
        for p in dest.rglob("*")
        if p.is_file() and ".storage-initializer" not in p.parts
    ) == ["config.json", "sub/w.bin"]
    verify = subprocess.run(
        [sys.executable, "-m", "storage_initializer", "verify", str(dest)], capture_output=True
    )
    assert verify.returncode == 0
