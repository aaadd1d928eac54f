"""Resume after a kill loses at most a block per worker, and never trusts the journal blindly.

A holder pulls one file from a real S3 server (moto) through the counting proxy. The proxy
sends the first bytes of each range and then holds the rest (``Fault(kind="hold")``), so the
test knows without any timing that the holder is mid-file with exactly those bytes served;
it waits (polled, with a deadline) until the holder's journal claims them as durable, then
SIGKILLs it. The next run's origin bytes are counted at the proxy: at most what was missing
plus one block per worker. Both a CRC-announced file (chunk CRCs combined, the prefix's CRC
re-read from disk) and a SHA-256 file (hashed in order, the prefix re-read) are covered, as
one range and as concurrent chunks. A journal that claims more than the staged file holds
(past its end, or over a hole) is not trusted: those bytes are fetched again.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.concurrency_helpers import object_gets, s3_env
from tests.helpers import (
    STATE_DIR,
    cli,
    digests,
    entrypoint_argv,
    pattern,
    run,
    start,
    tree_digest,
)
from tests.servers.proxy import CountingProxy, Fault
from tests.servers.s3 import S3Server, proxy, s3_server

__all__ = ["proxy", "s3_server"]

MiB = 1 << 20
#: What the engine writes and journals at a time (providers read 1 MiB blocks).
BLOCK = MiB
SIZE = 12 * MiB + 12_345
#: layout -> (chunk size, workers, bytes of each range served before the proxy holds it).
LAYOUTS = {"one-range": ("32MiB", 1, 7 * MiB), "chunked": ("4MiB", 2, 3 * MiB)}


@pytest.fixture(autouse=True)
def journal_small_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-process engine tests below resume files of a few KiB, which the engine does not
    journal in production (engine_plan.CHECKPOINT_MIN): journal every file here."""
    from storage_initializer import engine_plan

    monkeypatch.setattr(engine_plan, "CHECKPOINT_MIN", 0)


def _claims(dest: Path, name: str) -> list[tuple[int, int]]:
    """The ranges of ``name`` that any staging journal claims, read independently of the
    store's reader (torn or foreign lines skipped)."""
    found = []
    for journal in (dest / STATE_DIR / "staging").glob("*/chunks.jsonl"):
        for line in journal.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
                if record["path"] == name:
                    found.append((int(record["start"]), int(record["end"])))
            except (ValueError, KeyError, TypeError):
                continue
    return found


def _covered(ranges: list[tuple[int, int]]) -> int:
    """Bytes in the union of ``ranges``."""
    total, reach = 0, 0
    for first, end in sorted(ranges):
        first = max(first, reach)
        if end > first:
            total += end - first
            reach = end
    return total


def _wait_for(condition: Callable[[], bool], deadline: float) -> bool:
    """Poll ``condition`` until it holds or ``deadline`` seconds pass; whether it held."""
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)  # polling interval
    return True


def _origin_bytes(proxy: CountingProxy, bucket: str) -> int:
    return sum(r.bytes for r in object_gets(proxy, bucket))


def _kill_mid_file(
    s3: S3Server, proxy: CountingProxy, tmp: Path, checksum: str, layout: str
) -> dict[str, Any]:
    """Start a holder, let each of its first ranges receive its first bytes, wait until its
    journal claims them, SIGKILL it. Returns what the rest of the test needs."""
    chunk, workers, held = LAYOUTS[layout]
    data = pattern(SIZE, 7)
    bucket = s3.new_bucket()
    s3.upload(bucket, {"m/w.bin": data}, ChecksumAlgorithm=checksum.upper())
    gate = threading.Event()
    hold = Fault(
        kind="hold",
        hold_after=held,
        gate=gate,
        gate_timeout=300,
        method="GET",
        path_contains=f"/{bucket}/m/w.bin",
    )
    proxy.set_faults(hold)
    dest = tmp / "models"
    env = s3_env(
        s3,
        proxy,
        STORAGE_INITIALIZER_CHUNK_SIZE=chunk,
        STORAGE_INITIALIZER_WORKERS=str(workers),
    )
    argv = entrypoint_argv(f"s3://{bucket}/m", dest)
    holder = start(argv, env, tmp / "logs")
    try:
        assert _wait_for(lambda: hold.held >= workers or holder.popen.poll() is not None, 60)
        assert holder.popen.poll() is None, holder.wait().describe()
        served = _origin_bytes(proxy, bucket)
        assert served == workers * held, served  # every in-flight range, held mid-body
        # Wait for the journal to claim what was served (on code that journals only whole
        # chunks, or nothing for a file of one range, this never happens: the test goes on
        # and the byte count below says what the kill cost).
        journalled = _wait_for(lambda: _covered(_claims(dest, "w.bin")) >= served, 30)
        holder.popen.send_signal(signal.SIGKILL)
        assert holder.wait(timeout=30).returncode == -signal.SIGKILL
    finally:
        holder.kill()
        gate.set()
    proxy.set_faults()
    proxy.reset()
    return {
        "data": data,
        "bucket": bucket,
        "dest": dest,
        "env": env,
        "argv": argv,
        "served": served,
        "journalled": journalled,
        "workers": workers,
    }


def _survive(proxy: CountingProxy, killed: dict[str, Any]) -> tuple[int, str]:
    """Run the same pull again; its origin bytes, after checking the result."""
    after = run(killed["argv"], killed["env"], timeout=120)
    assert after.returncode == 0, after.describe()
    assert tree_digest(killed["dest"]) == digests({"w.bin": killed["data"]})
    verify = cli("verify", killed["dest"])
    assert verify.returncode == 0, verify.describe()
    return _origin_bytes(proxy, killed["bucket"]), after.stderr


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("checksum", ["crc32", "sha256"])
def test_a_killed_holder_is_resumed_from_its_last_block(
    s3_server: S3Server, proxy: CountingProxy, tmp: Path, checksum: str, layout: str
) -> None:
    killed = _kill_mid_file(s3_server, proxy, tmp, checksum, layout)
    durable = _covered(_claims(killed["dest"], "w.bin"))
    fetched, log = _survive(proxy, killed)
    served, workers = killed["served"], killed["workers"]
    print(
        f"\nresume ({checksum}, {layout}): {SIZE} bytes, holder served {served} and "
        f"journalled {durable} when SIGKILLed; the next run fetched {fetched} "
        f"({fetched / SIZE:.0%} of the file)"
    )
    assert killed["journalled"], f"the holder never journalled the {served} bytes it wrote"
    assert "resuming" in log, log
    # At most what was missing, plus one block per worker; never less than what was missing.
    assert SIZE - served <= fetched <= SIZE - served + workers * BLOCK, (fetched, served)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_journal_claiming_more_than_the_staged_file_holds_is_refetched(
    s3_server: S3Server, proxy: CountingProxy, tmp: Path, layout: str
) -> None:
    """After the kill, lines are added to the holder's journal: a claim of the whole file
    (past the staged file's end for one range, over the unwritten holes between the chunks
    in flight), and malformed ones. The claims are not trusted: the bytes the file does not
    hold are fetched, the honest prefix is kept, the result verifies."""
    killed = _kill_mid_file(s3_server, proxy, tmp, "sha256", layout)
    dest, served, workers = killed["dest"], killed["served"], killed["workers"]
    (area,) = [p for p in (dest / STATE_DIR / "staging").iterdir() if p.is_dir()]
    journal = area / "chunks.jsonl"
    lies = [
        {"path": "w.bin", "start": 0, "end": SIZE},
        {"path": "w.bin", "start": 0, "end": 10 * SIZE},
        {"path": "w.bin", "start": -5, "end": SIZE},
        {"path": "w.bin", "start": "0", "end": SIZE},
        {"path": "../w.bin", "start": 0, "end": SIZE},
        {"path": "w.bin", "start": 0, "end": True},
    ]
    with journal.open("a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(line) + "\n" for line in lies) + '{"torn": ')
    fetched, _log = _survive(proxy, killed)
    print(
        f"\nforged journal ({layout}): {SIZE} bytes, {served} staged, the journal claims all "
        f"of it; the next run fetched {fetched}"
    )
    assert killed["journalled"], f"the holder never journalled the {served} bytes it wrote"
    assert SIZE - served <= fetched <= SIZE - served + workers * BLOCK, (fetched, served)


# -- the planning and the checksum of a kept prefix, in process ------------------------------


def test_kept_prefixes_merge_claims_and_discard_what_the_file_does_not_back() -> None:
    from storage_initializer.resume import kept_prefixes

    spans: list[tuple[int, int | None]] = [(0, 100), (100, 200), (200, 250)]

    def written(start: int, end: int) -> bool:  # bytes 0-150 and 200-220 are on disk
        return (end <= 150) or (start >= 200 and end <= 220)

    claims = [(0, 40), (40, 100), (100, 130), (100, 180), (200, 220), (0, 250), (-1, 5)]
    kept = kept_prefixes(claims, spans, 250, written)
    # (100, 180) and (0, 250) claim bytes the file does not hold; (-1, 5) is out of range.
    assert kept == {0: 100, 100: 130, 200: 220}
    # Claims past the size are discarded even when the disk check would accept them.
    assert kept_prefixes([(0, 300)], [(0, None)], 250, lambda s, e: True) == {}
    # A dead owner with another chunk size: its ranges still count.
    assert kept_prefixes([(0, 64), (64, 128)], [(0, 100), (100, 200)], 200, written) == {
        0: 100,
        100: 128,
    }


def test_disk_extent_sees_holes_and_the_end(tmp: Path) -> None:
    import os

    from storage_initializer.resume import disk_extent

    path = tmp / "f.bin"
    with path.open("wb") as handle:
        handle.truncate(8 * MiB)
        handle.write(b"x" * MiB)
        handle.seek(4 * MiB)
        handle.write(b"y" * MiB)
    on_disk = disk_extent(path)
    assert on_disk is not None
    assert on_disk(0, MiB) and on_disk(4 * MiB, 5 * MiB)
    assert not on_disk(0, 2 * MiB)  # over the hole after the first MiB
    assert not on_disk(7 * MiB, 9 * MiB)  # past the end
    os.symlink(path, tmp / "link.bin")
    assert disk_extent(tmp / "link.bin") is None  # never through a link


class _Source:
    """One file in memory, read in ranges of uneven blocks; fails for good at ``fail_at``."""

    supports_ranges = True
    extract_single_archive = False

    def __init__(self, data: bytes, algorithm: str, fail_at: int | None = None) -> None:
        from storage_initializer import checksums

        hasher = checksums.new_hasher(algorithm)
        hasher.update(data)
        self.data, self.fail_at = data, fail_at
        self.sums = {algorithm: hasher.hexdigest()}
        self.reads: list[tuple[int, int | None]] = []

    def workers(self) -> int:
        return 2

    def files(self) -> list[Any]:
        from storage_initializer.providers.base import RemoteFile

        return [RemoteFile("w.bin", len(self.data), self.sums, "v1")]

    def read(self, file: Any, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        from storage_initializer.errors import SourceError

        self.reads.append((start, end))
        stop = len(self.data) if end is None else end
        for offset in range(start, stop, 1000):
            if self.fail_at is not None and offset >= self.fail_at:
                raise SourceError("gone")
            yield self.data[offset : min(offset + 1000, stop)]


def _engine_run(
    source: _Source, root: Path, chunk: int, workers: int = 1
) -> tuple[dict[str, Any], Any]:
    from storage_initializer.engine import Engine
    from storage_initializer.progress import Progress
    from storage_initializer.settings import Settings
    from storage_initializer.store import layout
    from storage_initializer.store.staging import Staging

    entry = layout.direct(root, "k" * 16)
    layout.ensure_state_dir(entry)
    staging = Staging.prepare(entry, "owner", entry.key, "fp")
    settings = Settings(chunk_size=chunk, retries=0, workers=workers)
    engine = Engine(source, settings, Progress(), threading.Event())  # type: ignore[arg-type]
    return engine.run(source.files(), staging), staging


@pytest.mark.parametrize("chunk", [1 << 20, 4096], ids=["one-range", "chunked"])
@pytest.mark.parametrize("algorithm", ["crc32", "md5", "sha256"])
@pytest.mark.parametrize("tamper", [False, True], ids=["intact", "prefix-changed"])
def test_a_resumed_prefix_is_verified_from_disk(
    tmp: Path, algorithm: str, chunk: int, tamper: bool
) -> None:
    """The second run continues where the first stopped; a byte of the kept prefix changed on
    disk makes the file fail verification and be fetched again whole, never published."""
    from storage_initializer.errors import SourceError

    data = pattern(6 * 4096 + 777, 3)
    first = _Source(data, algorithm, fail_at=3 * 4096 + 2000)
    with pytest.raises(SourceError):
        _engine_run(first, tmp / "dest", chunk)
    staged = next((tmp / "dest").rglob("w.bin"))
    if tamper:
        with open(staged, "r+b") as handle:
            handle.seek(1234)
            handle.write(b"\x00" if data[1234] else b"\x01")
    second = _Source(data, algorithm)
    results, staging = _engine_run(second, tmp / "dest", chunk)
    assert (staging.data / "w.bin").read_bytes() == data
    assert results["w.bin"] == second.sums
    starts = [start for start, _end in second.reads]
    # It continued mid-range (the first run's ranges all start at multiples of 4096) ...
    assert any(start % 4096 for start in starts), second.reads
    if tamper:  # ... and, the prefix on disk not matching, fetched the file again
        assert 0 in starts, second.reads
    else:  # ... within one block of where the first run stopped
        assert 0 not in starts and min(starts) >= first.fail_at - 1000, second.reads  # type: ignore[operator]


def test_a_small_file_of_one_range_is_not_journalled(
    tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Below CHECKPOINT_MIN a file of one range costs no fdatasync and no journal line: a new
    owner fetches it again whole (with the threshold at 0, the test above shows the
    opposite)."""
    from storage_initializer import engine_plan
    from storage_initializer.errors import SourceError

    monkeypatch.setattr(engine_plan, "CHECKPOINT_MIN", 1 << 20)
    data = pattern(6 * 4096 + 777, 5)
    first = _Source(data, "crc32", fail_at=3 * 4096 + 2000)
    with pytest.raises(SourceError):
        _engine_run(first, tmp / "dest", 1 << 20)
    journals = list((tmp / "dest").rglob("chunks.jsonl"))
    assert all("w.bin" not in j.read_text() for j in journals), [j.read_text() for j in journals]
    second = _Source(data, "crc32")
    _results, staging = _engine_run(second, tmp / "dest", 1 << 20)
    assert (staging.data / "w.bin").read_bytes() == data
    assert [start for start, _end in second.reads] == [0]


def test_a_file_of_one_range_resumes_in_chunks_when_the_chunk_size_changed(tmp: Path) -> None:
    """The dead owner fetched the file as one range (a larger chunk size); the new owner
    splits it into chunks: the bytes on disk are kept all the same."""
    data = pattern(6 * 4096 + 777, 5)
    first = _Source(data, "crc32", fail_at=3 * 4096 + 2000)
    with pytest.raises(Exception, match="gone"):
        _engine_run(first, tmp / "dest", 1 << 20)
    second = _Source(data, "crc32")
    results, staging = _engine_run(second, tmp / "dest", 4096, workers=2)
    assert (staging.data / "w.bin").read_bytes() == data
    assert results["w.bin"] == second.sums
    assert min(start for start, _end in second.reads) == 15_000, second.reads


def test_with_rounds_an_hour_apart_a_finished_chunk_and_close_are_journalled_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Journal rounds are spaced (resume.ROUND_INTERVAL; what that saves is measured in
    docs/performance.md, not asserted here), but never at a worker's expense: a worker
    settling its finished chunk gets its round now, and closing journals what is pending.
    With rounds an hour apart, a settle or a close that waited for the interval would hang
    this test until its timeout."""
    from storage_initializer import resume
    from storage_initializer.store import layout
    from storage_initializer.store.staging import Staging

    monkeypatch.setattr(resume, "ROUND_INTERVAL", 3600.0)
    staging = Staging(layout.direct(tmp_path / "dest", "k"), "0123456789ab")
    staging.data.mkdir(parents=True)
    staged = staging.data / "w.bin"
    staged.write_bytes(b"x" * 4096)
    checkpoints = resume.Checkpointer(staging)
    try:
        checkpoints.note(staged, "w.bin", 0, 1024)
        checkpoints.settle("w.bin", 0)  # right after the first round: within the interval
        assert staging.chunks() == {"w.bin": {(0, 1024)}}
        checkpoints.note(staged, "w.bin", 1024, 1536)
        checkpoints.settle("w.bin", 1024)  # a second settle, still within the interval
        assert staging.chunks() == {"w.bin": {(0, 1024), (1024, 1536)}}
        checkpoints.note(staged, "w.bin", 1024, 2048)
    finally:
        checkpoints.close()
    assert staging.chunks() == {"w.bin": {(0, 1024), (1024, 1536), (1024, 2048)}}
