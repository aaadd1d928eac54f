"""Archive extraction treats every member as hostile; each test fails if its defence is removed."""

from __future__ import annotations

import bz2
import functools
import io
import os
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path

import pytest

from storage_initializer import crcmath
from storage_initializer.archive import ArchiveError, Limits, extract
from storage_initializer.paths import STATE_DIR_NAME as STATE
from storage_initializer.paths import UnsafePathError
from tests import helpers
from tests.helpers import clean_env, entrypoint_argv, tar_bytes
from tests.servers.nginx import Nginx


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


# -- archive bombs: a 9 KB zip of 10 GiB, and the limits as settings -------------------------

#: Zeros per bzip2 block: bzip2 first run-length encodes runs of up to 259 equal bytes into 5,
#: so 40 MiB of zeros fit the 900 kB block of level 9, and the block compresses to 279 bits.
BOMB_BLOCK = 40 << 20
BZ2_END = 0x177245385090  # 48-bit end-of-stream magic


@functools.cache
def _zero_block() -> tuple[int, int, int]:
    """(bits, bit length, CRC) of one bzip2 block of BOMB_BLOCK zeros, cut from a real stream."""
    stream = bz2.compress(bytes(BOMB_BLOCK), 9)
    assert len(stream) < 100, "expected one tiny block"
    bits, total = int.from_bytes(stream, "big"), len(stream) * 8
    for pad in range(8):  # the stream ends with the end magic, a 32-bit CRC, then padding
        end = total - pad - 80
        if (bits >> (total - end - 48)) & ((1 << 48) - 1) == BZ2_END:
            break
    else:
        raise AssertionError("no end-of-stream magic in the bzip2 stream")
    length = end - 32  # after "BZh9"
    block = (bits >> (total - end)) & ((1 << length) - 1)
    return block, length, (block >> (length - 80)) & 0xFFFFFFFF  # after the 48-bit block magic


def bzip2_zeros(blocks: int) -> bytes:
    """A valid bzip2 stream of ``blocks`` × BOMB_BLOCK zeros, built by repeating one compressed
    block (blocks are bit strings, not byte-aligned) instead of compressing gigabytes: about
    35 bytes per 40 MiB, in milliseconds."""
    block, length, crc = _zero_block()
    acc, size, combined = int.from_bytes(b"BZh9", "big"), 32, 0
    for _ in range(blocks):
        acc, size = (acc << length) | block, size + length
        combined = (((combined << 1) | (combined >> 31)) & 0xFFFFFFFF) ^ crc
    acc, size = (((acc << 48) | BZ2_END) << 32) | combined, size + 80
    pad = -size % 8
    return (acc << pad).to_bytes((size + pad) // 8, "big")


def zeros_crc32(count: int) -> int:
    """CRC-32 of ``count`` zero bytes without reading them (the product's CRC combination)."""
    crc, piece = 0, zlib.crc32(bytes(BOMB_BLOCK))
    assert count % BOMB_BLOCK == 0
    for _ in range(count // BOMB_BLOCK):
        crc = crcmath.combine("crc32", crc, piece, BOMB_BLOCK)
    return crc


def bomb_zip(blocks: int = 256, name: str = "weights.bin", announce: int = 0) -> bytes:
    """A zip whose one member really expands to ``blocks`` × 40 MiB (256: 10 GiB), compressed
    with bzip2 (method 12) in about 9 KB: ratio 1.2 million to one, where deflate tops out near
    1032. The sizes are ZIP64 fields, as a member over 4 GiB needs. ``announce`` makes the
    headers lie: that size (a multiple of 40 MiB) and its CRC instead of the real ones."""
    data = bzip2_zeros(blocks)
    size = announce or blocks * BOMB_BLOCK
    crc = zeros_crc32(size)
    filename = name.encode()
    zip64 = struct.pack("<HHQQ", 0x0001, 16, size, len(data))
    local = (
        struct.pack(
            "<IHHHHHIIIHH", 0x04034B50, 46, 0, 12, 0, 0, crc, 0xFFFFFFFF, 0xFFFFFFFF,
            len(filename), len(zip64),
        )
        + filename
        + zip64
    )  # fmt: skip
    central = (
        struct.pack(
            "<IHHHHHHIIIHHHHHII", 0x02014B50, 46, 46, 0, 12, 0, 0, crc, 0xFFFFFFFF,
            0xFFFFFFFF, len(filename), len(zip64), 0, 0, 0, 0o100644 << 16, 0,
        )
        + filename
        + zip64
    )  # fmt: skip
    offset = len(local) + len(data)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central), offset, 0)
    return local + data + central + end


def test_bomb_builder_makes_a_real_zip(tmp_path: Path) -> None:
    """The construction is sound: a small one extracts in full with zipfile's CRC check, and the
    10 GiB one announces 10 GiB from 9 KB and really starts with zeros."""
    small = tmp_path / "small.zip"
    small.write_bytes(bomb_zip(blocks=3))
    with zipfile.ZipFile(small) as zf, zf.open("weights.bin") as member:
        read = 0
        # Large reads: zipfile re-slices its buffer per read, and one block is 40 MiB.
        while chunk := member.read(BOMB_BLOCK):
            assert chunk.count(0) == len(chunk)
            read += len(chunk)
    assert read == 3 * BOMB_BLOCK  # and zipfile raised no "Bad CRC-32" at the end
    big = tmp_path / "big.zip"
    big.write_bytes(bomb_zip())
    assert big.stat().st_size < 10_000
    with zipfile.ZipFile(big) as zf:
        info = zf.getinfo("weights.bin")
        assert (info.file_size, info.compress_type) == (10 << 30, zipfile.ZIP_BZIP2)
    # Not through zipfile: its first read of this member would inflate gigabytes (see below).
    assert bz2.BZ2Decompressor().decompress(bzip2_zeros(256), 1 << 20) == bytes(1 << 20)


def test_10_gib_bomb_is_refused_before_writing_a_byte(tmp_path: Path) -> None:
    archive = tmp_path / "bomb.zip"
    archive.write_bytes(bomb_zip())
    out = tmp_path / "out"
    with pytest.raises(ArchiveError, match="archive bomb") as caught:
        extract(archive, out, Limits())  # the defaults
    assert "10.0 GiB" in str(caught.value) and "64.0 MiB" in str(caught.value)
    assert [p for p in out.rglob("*") if p.is_file()] == []


def test_bzip2_member_lying_about_its_size_is_stopped_in_bounded_memory(tmp_path: Path) -> None:
    """Headers announcing 40 MiB of a member that expands to 10 GiB pass the announced-size
    check; zipfile itself would inflate gigabytes into memory on its first read. Run under a
    1 GiB address-space limit, as in a pod: refused, not a MemoryError or an OOM kill."""
    archive = tmp_path / "liar.zip"
    archive.write_bytes(bomb_zip(announce=BOMB_BLOCK))
    out = tmp_path / "out"
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from storage_initializer.archive import ArchiveError, Limits, extract\n"
        "try:\n"
        "    extract(Path(sys.argv[1]), Path(sys.argv[2]), Limits())\n"
        "except ArchiveError as exc:\n"
        "    print(exc)\n"
        "    sys.exit(3)\n"
    )
    argv = ["prlimit", f"--as={1 << 30}", "--", sys.executable, "-c", script, archive, out]
    run = helpers.run([str(a) for a in argv])
    assert run.returncode == 3, run.describe()
    assert "expands beyond the 40.0 MiB it announces" in run.stdout
    assert sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) <= BOMB_BLOCK


def test_copies_made_for_links_count_against_the_limit(tmp_path: Path) -> None:
    """One 1 MiB file and 40 links to it: 41 MiB of output from a 1 MiB archive."""
    payload = os.urandom(1 << 20)  # incompressible: the archive is as big as the file
    links = []
    for i in range(40):
        link = tarfile.TarInfo(f"model/copy-{i}.bin")
        link.type = tarfile.SYMTYPE
        link.linkname = "w.bin"
        links.append(link)
    archive = make_tar(
        tmp_path / "t.tar.gz",
        [file_member("model/w.bin", payload), *links],
        {"model/w.bin": payload},
    )
    out = tmp_path / "out"
    with pytest.raises(ArchiveError, match="archive bomb"):
        extract(archive, out, Limits(max_ratio=2, ratio_floor=4 << 20))
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert written <= 4 << 20


def test_total_uncompressed_size_is_capped(tmp_path: Path) -> None:
    files = {f"part-{i}.bin": os.urandom(10_000) for i in range(3)}
    archive = make_tar(tmp_path / "t.tar.gz", [file_member(n, d) for n, d in files.items()], files)
    out = tmp_path / "out"
    with pytest.raises(ArchiveError, match="STORAGE_INITIALIZER_ARCHIVE_MAX_SIZE"):
        extract(archive, out, Limits(max_size=25_000))
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert written <= 25_000
    assert len(extract(archive, tmp_path / "fits", Limits(max_size=30_000))) == 3


def test_bomb_from_nginx_end_to_end_with_default_limits(nginx: Nginx, tmp: Path) -> None:
    """What the issue asks: the 9 KB zip of 10 GiB, served by a real web server, pulled by the
    KServe entrypoint with no setting changed. A file-size rlimit of 1 GiB on the process keeps
    the machine safe should the defence ever go: the pull then fails differently (EFBIG)
    instead of writing 10 GiB."""
    folder = nginx.new_dir()
    nginx.put(f"{folder}/bomb.zip", bomb_zip())
    url = nginx.url(f"{folder}/bomb.zip")
    dest = tmp / "models"
    run = helpers.run(["prlimit", f"--fsize={1 << 30}", "--", *entrypoint_argv(url, dest)])
    assert run.returncode == 1, run.describe()
    last = run.last_line
    assert f"failed to download {url}" in last, last
    assert "bomb.zip expands to at least 10.0 GiB" in last
    assert "refusing a possible archive bomb" in last
    assert "Raise STORAGE_INITIALIZER_ARCHIVE_MAX_RATIO" in last
    assert [p for p in dest.rglob("*") if p.is_file() and STATE not in p.parts] == []
    staging = dest / STATE / "staging"
    assert not staging.exists() or list(staging.iterdir()) == [], list(staging.rglob("*"))


def _small_tgz(tmp: Path) -> Path:
    """8 members, 64 KB of zeros each, in a 1 KB .tgz: fine by default, over any small limit."""
    files = {f"w/{i}.bin": bytes(64_000) for i in range(8)}
    archive = tmp / "model.tgz"
    archive.write_bytes(tar_bytes(files, "w:gz"))
    assert archive.stat().st_size < 4096
    return archive


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ({"config": "archive_max_size: 100KiB\n"}, "STORAGE_INITIALIZER_ARCHIVE_MAX_SIZE"),
        ({"config": "archive-max-members: 5\n"}, "more than 5 members"),
        (
            {
                "env": {
                    "STORAGE_INITIALIZER_ARCHIVE_MAX_RATIO": "10",
                    "STORAGE_INITIALIZER_ARCHIVE_RATIO_FLOOR": "100KiB",
                }
            },
            "refusing a possible archive bomb",
        ),
        ({"env": {"STORAGE_INITIALIZER_MAX_SIZE": "200KiB"}}, "allowed by --max-size"),
    ],
    ids=["config-max-size", "config-members", "env-ratio-and-floor", "entry-quota"],
)
def test_archive_limits_are_settings(tmp: Path, how: dict, expected: str) -> None:  # type: ignore[type-arg]
    archive = _small_tgz(tmp)
    dest = tmp / "dest"
    env = clean_env(how.get("env"))
    if "config" in how:
        config = tmp / "config.yaml"
        config.write_text(how["config"])
        env["STORAGE_INITIALIZER_CONFIG"] = str(config)
    run = helpers.run(entrypoint_argv(archive, dest), env)
    assert run.returncode == 1, run.describe()
    assert expected in run.last_line and str(archive) in run.last_line, run.last_line
    assert [p for p in dest.rglob("*") if p.is_file() and STATE not in p.parts] == []
    # The same archive with the defaults: extracted.
    fine = helpers.run(entrypoint_argv(archive, tmp / "fine"))
    assert fine.returncode == 0, fine.describe()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("STORAGE_INITIALIZER_ARCHIVE_MAX_RATIO", "inf"),
        ("STORAGE_INITIALIZER_ARCHIVE_MAX_RATIO", "lots"),
        ("STORAGE_INITIALIZER_ARCHIVE_MAX_MEMBERS", "0"),
        ("STORAGE_INITIALIZER_ARCHIVE_RATIO_FLOOR", "-1MiB"),
        ("STORAGE_INITIALIZER_ARCHIVE_MAX_SIZE", "nanG"),
    ],
)
def test_a_bad_archive_limit_is_a_one_line_usage_error(
    tmp: Path, variable: str, value: str
) -> None:
    archive = _small_tgz(tmp)
    run = helpers.run(entrypoint_argv(archive, tmp / "dest"), clean_env({variable: value}))
    assert run.returncode == 1, run.describe()
    assert "Traceback" not in run.stderr and "unexpected" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    assert "invalid configuration" in lines[0] and variable in lines[0], lines[0]
