"""Safe extraction of a model delivered as one archive (.zip, .tar, .tar.gz, .tgz, …).

An archive is hostile input. Member names go through :func:`safe_relpath`; links may only point
inside the tree; devices, FIFOs and other special members are refused; modes are ours, never the
archive's (no setuid). Bytes are counted while they are written, so an archive bomb stops at the
limit whatever its headers claim. Every extracted file is hashed on the way (sha256) for the
marker.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import posixpath
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from storage_initializer.errors import SourceError
from storage_initializer.paths import UnsafePathError, safe_relpath

SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar", ".zip")
BLOCK = 1 << 20


class ArchiveError(SourceError):
    hint = "Check that the archive is complete and was built with a standard tool"


@dataclass(frozen=True)
class Limits:
    max_members: int = 200_000
    #: Uncompressed bytes allowed per compressed byte, over the whole archive.
    max_ratio: float = 1000.0
    #: Small archives may expand this much regardless of the ratio (tiny configs compress well).
    ratio_floor: int = 64 << 20

    @classmethod
    def from_env(cls) -> Limits:
        def number(name: str, default: float) -> float:
            value = os.environ.get(name)
            return float(value) if value else default

        return cls(
            max_members=int(number("STORAGE_INITIALIZER_ARCHIVE_MAX_MEMBERS", cls.max_members)),
            max_ratio=number("STORAGE_INITIALIZER_ARCHIVE_MAX_RATIO", cls.max_ratio),
        )


@dataclass
class Extracted:
    path: str
    size: int
    sha256: str


def is_archive(name: str) -> bool:
    return name.lower().endswith(SUFFIXES)


class _Budget:
    def __init__(self, archive_size: int, limits: Limits, label: str) -> None:
        self.allowed = max(int(archive_size * limits.max_ratio), limits.ratio_floor)
        self.used = 0
        self.members = 0
        self.limits = limits
        self.label = label

    def member(self) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise ArchiveError(
                f"{self.label} has more than {self.limits.max_members} members",
                "Raise STORAGE_INITIALIZER_ARCHIVE_MAX_MEMBERS if this archive is legitimate",
            )

    def spend(self, count: int) -> None:
        self.used += count
        if self.used > self.allowed:
            raise ArchiveError(
                f"{self.label} expands beyond {self.allowed} bytes "
                f"({self.limits.max_ratio:g}× its size): refusing a possible archive bomb",
                "Raise STORAGE_INITIALIZER_ARCHIVE_MAX_RATIO if this archive is legitimate",
            )


def _write_stream(stream: IO[bytes], target: Path, budget: _Budget) -> Extracted:
    digest = hashlib.sha256()
    size = 0
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "xb") as out:
        while block := stream.read(BLOCK):
            budget.spend(len(block))
            digest.update(block)
            out.write(block)
            size += len(block)
        out.flush()
        os.fsync(out.fileno())
    return Extracted("", size, digest.hexdigest())


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
    limits = limits or Limits.from_env()
    label = f"archive {archive.name}"
    budget = _Budget(archive.stat().st_size, limits, label)
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


def _extract_tar(archive: Path, out_dir: Path, budget: _Budget) -> list[Extracted]:
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
            _check_parents(out_dir, rel)
            target = out_dir / rel
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif member.isreg():
                stream = tar.extractfile(member)
                if stream is None:
                    raise ArchiveError(f"archive member {rel!r} cannot be read")
                with stream:
                    done = _write_stream(stream, target, budget)
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
    results.extend(_materialise_links(out_dir, links, results))
    return results


def _extract_zip(archive: Path, out_dir: Path, budget: _Budget) -> list[Extracted]:
    results: list[Extracted] = []
    links: list[tuple[str, str, bool]] = []
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            budget.member()
            rel = safe_relpath(info.filename, "archive member")
            _check_parents(out_dir, rel)
            target = out_dir / rel
            mode = info.external_attr >> 16
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            elif stat.S_ISLNK(mode):
                link_target = zf.read(info).decode("utf-8", "replace")
                links.append((rel, _inside(out_dir, rel, link_target), False))
            elif stat.S_IFMT(mode) and not stat.S_ISREG(mode):  # many zips set no type bits
                raise UnsafePathError(f"archive member {rel!r} is a special file")
            else:
                with zf.open(info) as stream:
                    done = _write_stream(stream, target, budget)
                results.append(Extracted(rel, done.size, done.sha256))
    results.extend(_materialise_links(out_dir, links, results))
    return results


def _materialise_links(
    out_dir: Path, links: list[tuple[str, str, bool]], files: list[Extracted]
) -> list[Extracted]:
    """Links become copies of the file they name: a model needs the bytes, and a copy cannot be
    turned into a path out of the tree later."""
    by_path = {f.path: f for f in files}
    made: list[Extracted] = []
    for rel, target_rel, _hard in links:
        source = by_path.get(target_rel)
        if source is None:
            raise UnsafePathError(
                f"archive link {rel!r} points to {target_rel!r}, which is not a file of the archive"
            )
        _check_parents(out_dir, rel)
        destination = out_dir / rel
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out_dir / target_rel, destination)
        made.append(Extracted(rel, source.size, source.sha256))
    return made
