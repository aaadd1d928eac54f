"""Safe extraction of a model delivered as one archive (.zip, .tar, .tar.gz, .tgz, …).

An archive is hostile input. Member names go through :func:`safe_relpath`; links may only point
inside the tree; devices, FIFOs and other special members are refused; modes are ours, never the
archive's (no setuid). Against archive bombs, every member's announced size is checked against
the budget before a byte of it is written (a 9 KB zip announcing 10 GiB is refused at once), and
bytes are counted again while they are written, copies made for links included. Every extracted
file is hashed on the way (sha256) for the marker. Tar members also pass the standard library's
``data`` extraction filter (PEP 706) as a second opinion on names and links.

The same policy serves every tar a source hands us: the layers of an ``oci://`` image
(providers/oci_layers.py) go through :class:`Budget`, :func:`check_tar_member` and
:func:`write_member` exactly as a downloaded ``.tar.gz`` does.
"""

from __future__ import annotations

import bz2
import hashlib
import lzma
import os
import posixpath
import shutil
import stat
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from storage_initializer import settings as settings_mod
from storage_initializer.blocks import BLOCK
from storage_initializer.errors import SourceError
from storage_initializer.paths import UnsafePathError, safe_relpath
from storage_initializer.report import human_bytes
from storage_initializer.settings import Settings

SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar", ".zip")
#: Longest link target read from a zip (the target is the member's content).
LINK_MAX = 4096


class ArchiveError(SourceError):
    hint = "Check that the archive is complete and was built with a standard tool"


@dataclass(frozen=True)
class Limits:
    """What one archive may expand to; the defaults are the settings' (settings.py)."""

    max_members: int = Settings.archive_max_members
    #: Uncompressed bytes allowed per compressed byte, over the whole archive.
    max_ratio: float = Settings.archive_max_ratio
    #: Small archives may expand this much regardless of the ratio (tiny configs compress well).
    ratio_floor: int = Settings.archive_ratio_floor
    #: Uncompressed bytes in all, whatever the ratio (0: no such cap).
    max_size: int = 0
    #: The option that sets ``max_size``, for the error's remedy.
    max_size_option: str = "STORAGE_INITIALIZER_ARCHIVE_MAX_SIZE"

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        """The archive limits of a pull. The per-entry quota (--max-size) caps the expansion
        too: extraction stops when it is reached rather than after filling the volume."""
        cap, option = settings.archive_max_size, "STORAGE_INITIALIZER_ARCHIVE_MAX_SIZE"
        if settings.max_size and (not cap or settings.max_size < cap):
            cap, option = settings.max_size, "--max-size (STORAGE_INITIALIZER_MAX_SIZE)"
        return cls(
            max_members=settings.archive_max_members,
            max_ratio=settings.archive_max_ratio,
            ratio_floor=settings.archive_ratio_floor,
            max_size=cap,
            max_size_option=option,
        )


@dataclass
class Extracted:
    path: str
    size: int
    sha256: str


def is_archive(name: str) -> bool:
    return name.lower().endswith(SUFFIXES)


class Budget:
    """Members and bytes an archive may still produce. ``claim`` checks a member's announced
    size before it is written (so a bomb is refused without writing a byte); ``spend`` counts
    what is really written (so announced sizes need not be trusted)."""

    def __init__(self, archive_size: int, limits: Limits, label: str) -> None:
        self.archive_size = archive_size
        by_ratio = max(int(archive_size * limits.max_ratio), limits.ratio_floor)
        self.capped = bool(limits.max_size) and limits.max_size < by_ratio
        self.allowed = limits.max_size if self.capped else by_ratio
        self.used = 0
        self.members = 0
        self.limits = limits
        self.label = label

    def member(self, count: int = 1) -> None:
        self.members += count
        if self.members > self.limits.max_members:
            raise ArchiveError(
                f"{self.label} has more than {self.limits.max_members} members",
                "Raise STORAGE_INITIALIZER_ARCHIVE_MAX_MEMBERS if this archive is legitimate",
            )

    def claim(self, count: int) -> None:
        if self.used + count > self.allowed:
            self._refuse(self.used + count)

    def spend(self, count: int) -> None:
        self.used += count
        if self.used > self.allowed:
            self._refuse(self.used)

    def _refuse(self, total: int) -> None:
        if self.capped:
            raise ArchiveError(
                f"{self.label} expands to at least {human_bytes(total)}, more than the "
                f"{human_bytes(self.allowed)} allowed by {self.limits.max_size_option}",
                f"Raise {self.limits.max_size_option} if this archive is legitimate",
            )
        raise ArchiveError(
            f"{self.label} expands to at least {human_bytes(total)}, more than the "
            f"{human_bytes(self.allowed)} allowed for {human_bytes(self.archive_size)} of archive "
            f"({self.limits.max_ratio:g}× its size, at least {human_bytes(self.limits.ratio_floor)}"
            "): refusing a possible archive bomb",
            "Raise STORAGE_INITIALIZER_ARCHIVE_MAX_RATIO or STORAGE_INITIALIZER_ARCHIVE_RATIO_FLOOR"
            " if this archive is legitimate",
        )


def write_member(
    stream: IO[bytes] | _Bzip2Member, target: Path, budget: Budget | None, sync: bool = True
) -> Extracted:
    """Write one member to a new file ``target``, hashing it and counting its bytes against
    ``budget`` (None: already counted, as a tar member's exact size can be). ``sync=False`` for
    scratch copies that are verified and copied again before anything is committed."""
    digest = hashlib.sha256()
    size = 0
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "xb") as out:
        while block := stream.read(BLOCK):
            if budget is not None:
                budget.spend(len(block))
            digest.update(block)
            out.write(block)
            size += len(block)
        if sync:
            out.flush()
            os.fsync(out.fileno())
    return Extracted("", size, digest.hexdigest())


#: What the ``data`` filter's refusals mean, in the words of our other messages.
_FILTER_REASONS = {
    "AbsolutePathError": "is an absolute path",
    "OutsideDestinationError": "would be written outside the model directory",
    "SpecialFileError": "is a device, FIFO or other special file",
    "AbsoluteLinkError": "is a link to an absolute path",
    "LinkOutsideDestinationError": "is a link that leaves the model directory",
}


def check_tar_member(member: tarfile.TarInfo, dest: Path, label: str) -> None:
    """Refuse ``member`` if the standard library's ``data`` filter would (PEP 706; Python
    3.11.4+): absolute or escaping names and links, special files. Our own checks run too; the
    filter is a second, independently maintained opinion. ``dest`` is the directory the member
    name is relative to."""
    data_filter = getattr(tarfile, "data_filter", None)
    if data_filter is None:  # an older 3.11: our own checks stand alone
        return
    try:
        data_filter(member, str(dest))
    except tarfile.FilterError as exc:
        reason = _FILTER_REASONS.get(type(exc).__name__, "is refused by the tar data filter")
        link = f" ({member.linkname!r})" if member.issym() or member.islnk() else ""
        raise UnsafePathError(f"{label}: member {member.name!r} {reason}{link}") from None


class _Bzip2Member:
    """A bzip2 member of a zip, inflated at most ``size`` bytes per read.

    zipfile feeds its bzip2 decompressor 4 KiB of input at a time with no bound on the output
    (its deflate members are bounded): one read of a bomb is gigabytes in memory before any
    count can stop it, an OOM kill with no explanation in a 1 GiB init container. So bzip2
    members are read raw from the archive and inflated here, with zipfile's checks: no more
    than the announced size, and the CRC at the end."""

    def __init__(self, archive: Path, info: zipfile.ZipInfo) -> None:
        self._name = info.filename
        self._info = info
        if info.flag_bits & 0x1:
            raise ArchiveError(f"archive member {self._name!r} is encrypted")
        self._file = open(archive, "rb")  # noqa: SIM115 - closed by close()
        self._file.seek(info.header_offset)
        header = self._file.read(30)
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            self.close()
            raise ArchiveError(f"archive member {self._name!r} has no local header")
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        self._file.seek(info.header_offset + 30 + name_length + extra_length)
        self._compressed_left = info.compress_size
        self._left = info.file_size
        self._crc = 0
        self._decompressor = bz2.BZ2Decompressor()

    def read(self, size: int) -> bytes:
        data = b""
        while not data and not self._decompressor.eof:
            chunk = b""
            if self._decompressor.needs_input:
                chunk = self._file.read(min(BLOCK, self._compressed_left))
                if not chunk:
                    raise ArchiveError(f"archive member {self._name!r} is truncated")
                self._compressed_left -= len(chunk)
            data = self._decompressor.decompress(chunk, size)
        if len(data) > self._left:
            raise ArchiveError(
                f"archive member {self._name!r} expands beyond the "
                f"{human_bytes(self._info.file_size)} it announces: refusing a possible "
                "archive bomb"
            )
        self._left -= len(data)
        self._crc = zlib.crc32(data, self._crc)
        if not data and (self._left or self._crc != self._info.CRC):
            raise ArchiveError(f"archive member {self._name!r} is corrupt (size or CRC)")
        return data

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> _Bzip2Member:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _inside(root: Path, link_rel: str, target: str) -> str:
    """Resolve a link target relative to the link's directory; it must stay in the tree."""
    if target.startswith("/") or "\0" in target:
        raise UnsafePathError(f"archive link {link_rel!r} points to an absolute path")
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(link_rel), target))
    if joined == ".." or joined.startswith("../") or joined == ".":
        raise UnsafePathError(f"archive link {link_rel!r} -> {target!r} leaves the model directory")
    return joined


def _check_parents(root: Path, rel: str) -> None:
    """No member may be written through a link (a link to /etc followed by etc/passwd)."""
    current = root
    for part in rel.split("/")[:-1]:
        current = current / part
        if current.is_symlink():
            raise UnsafePathError(f"archive member {rel!r} would be written through a link")


def extract(archive: Path, out_dir: Path, limits: Limits | None = None) -> list[Extracted]:
    if limits is None:
        limits = Limits.from_settings(settings_mod.load())
    label = f"archive {archive.name}"
    budget = Budget(archive.stat().st_size, limits, label)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        if archive.name.lower().endswith(".zip"):
            files = _extract_zip(archive, out_dir, budget)
        else:
            files = _extract_tar(archive, out_dir, budget)
    except OSError as exc:
        if exc.errno is not None:
            raise  # the disk or the permissions, not the archive (ENOSPC, EACCES…)
        raise ArchiveError(f"{label} is corrupt or truncated: {exc}") from exc
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise ArchiveError(f"{label} is corrupt or truncated: {exc}") from exc
    if not files:
        raise ArchiveError(f"{label} holds no files")
    return files


def _extract_tar(archive: Path, out_dir: Path, budget: Budget) -> list[Extracted]:
    results: list[Extracted] = []
    links: list[tuple[str, str, bool]] = []
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            budget.member()
            rel = (
                safe_relpath(member.name, "archive member")
                if member.name not in (".", "./")
                else ""
            )
            if not rel:
                continue
            check_tar_member(member, out_dir, f"archive {archive.name}")
            _check_parents(out_dir, rel)
            target = out_dir / rel
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif member.isreg():
                budget.claim(member.size)
                stream = tar.extractfile(member)
                if stream is None:
                    raise ArchiveError(f"archive member {rel!r} cannot be read")
                with stream:
                    done = write_member(stream, target, budget)
                results.append(Extracted(rel, done.size, done.sha256))
            elif member.issym() or member.islnk():
                resolved = (
                    _inside(out_dir, rel, member.linkname)
                    if member.issym()
                    else (safe_relpath(member.linkname, "archive link target"))
                )
                links.append((rel, resolved, member.islnk()))
            else:
                raise UnsafePathError(
                    f"archive member {rel!r} is a device, FIFO or other special file"
                )
    results.extend(_materialise_links(out_dir, links, results, budget))
    return results


def _extract_zip(archive: Path, out_dir: Path, budget: Budget) -> list[Extracted]:
    results: list[Extracted] = []
    links: list[tuple[str, str, bool]] = []
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        # The central directory announces every member and its size: a bomb is refused before
        # the first byte is written (zipfile never yields more than a member announces).
        budget.member(len(members))
        budget.claim(sum(i.file_size for i in members if not i.is_dir()))
        for info in members:
            rel = safe_relpath(info.filename, "archive member")
            _check_parents(out_dir, rel)
            target = out_dir / rel
            mode = info.external_attr >> 16
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            elif stat.S_ISLNK(mode):
                if info.file_size > LINK_MAX:  # zf.read holds it in memory
                    raise UnsafePathError(
                        f"archive link {rel!r} has a {info.file_size}-byte target"
                    )
                link_target = zf.read(info).decode("utf-8", "replace")
                links.append((rel, _inside(out_dir, rel, link_target), False))
            elif stat.S_IFMT(mode) and not stat.S_ISREG(mode):  # many zips set no type bits
                raise UnsafePathError(f"archive member {rel!r} is a special file")
            else:
                bounded = info.compress_type == zipfile.ZIP_BZIP2
                with _Bzip2Member(archive, info) if bounded else zf.open(info) as stream:
                    done = write_member(stream, target, budget)
                results.append(Extracted(rel, done.size, done.sha256))
    results.extend(_materialise_links(out_dir, links, results, budget))
    return results


def _materialise_links(
    out_dir: Path, links: list[tuple[str, str, bool]], files: list[Extracted], budget: Budget
) -> list[Extracted]:
    """Links become copies of the file they name: a model needs the bytes, and a copy cannot be
    turned into a path out of the tree later. Copies count against the budget: one large file
    and thousands of links to it would be a bomb without a single compressed byte."""
    by_path = {f.path: f for f in files}
    made: list[Extracted] = []
    for rel, target_rel, _hard in links:
        source = by_path.get(target_rel)
        if source is None:
            raise UnsafePathError(
                f"archive link {rel!r} points to {target_rel!r}, which is not a file of the archive"
            )
        _check_parents(out_dir, rel)
        budget.claim(source.size)
        destination = out_dir / rel
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out_dir / target_rel, destination)
        budget.spend(source.size)
        made.append(Extracted(rel, source.size, source.sha256))
    return made
