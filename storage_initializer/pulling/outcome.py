"""What a pull reports: its :class:`Result`, and for a failed one the counters it got to and
the last log line (:func:`describe_failure`)."""

from __future__ import annotations

import contextlib
import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from storage_initializer import signals
from storage_initializer.errors import InitializerError
from storage_initializer.redact import redact, redact_url
from storage_initializer.report import describe_progress

if TYPE_CHECKING:
    from storage_initializer.progress import Progress
    from storage_initializer.uri import SourceUri


@dataclass
class Result:
    source: str
    dest: str
    outcome: str
    bytes_from_origin: int = 0
    bytes_reused: int = 0
    files: int = 0
    seconds: float = 0.0
    key: str = ""
    fingerprint: str = ""
    #: Seconds by phase (metrics): wait, list, transfer, verify, extract, commit.
    phases: dict[str, float] | None = None
    retries: int = 0
    takeovers: int = 0
    verify_failures: int = 0
    #: Of ``bytes_from_origin``, those moved from socket to file by splice (splice.py).
    bytes_spliced: int = 0
    #: Files fetched from the origin, and files reused from the volume or a staging area.
    files_fetched: int = 0
    files_reused: int = 0

    def fields(self) -> dict[str, Any]:
        return dict(self.__dict__)


def terminated(
    exc: BaseException, uri: SourceUri, where: dict[str, Any], stats: dict[str, Any]
) -> BaseException | None:
    """``exc`` as a termination (signals.Terminated) that says how far the download got, or
    None when the process was not terminated. The engine's Cancelled in a thread other than
    the main one becomes the Terminated behind it."""
    ended = signals.terminated_by(exc)
    if ended is None:
        return None
    attach_stats(ended, stats)
    ended.detail = (
        f"while downloading {uri.redacted} (phase {where.get('phase')}, "
        f"{describe_progress(where)}); the staged files are kept for the next owner and "
        "the lease is released"
    )
    return ended


def phase_seconds(wait: float, progress: Progress) -> dict[str, float]:
    """Seconds by phase under the names docs/cache.md documents (the progress calls the
    listing phase "listing", as leases and ``status`` show it; metrics say "list")."""
    phases = {"wait": wait}
    for name, seconds in dict(progress.phases).items():
        key = "list" if name == "listing" else name
        phases[key] = phases.get(key, 0.0) + seconds
    return phases


def holder_failure_stats(progress: Any, wait: float, took_over: bool) -> dict[str, Any]:
    """What a failing holder got done, for the metrics file of a failed run: the origin's bytes
    were spent and the retries made even though the pull failed."""
    progress.set_phase("failed")  # books the time of the phase that failed
    snap = progress.snapshot()
    return {
        "bytes_from_origin": snap["bytes_from_origin"],
        "bytes_reused": snap["bytes_reused"],
        "files": snap["files_done"],
        "retries": snap["retries"],
        "verify_failures": progress.verify_failures,
        "bytes_spliced": progress.bytes_spliced,
        "takeovers": int(took_over),
        "phases": phase_seconds(wait, progress),
    }


def attach_stats(exc: BaseException, stats: dict[str, Any]) -> None:
    with contextlib.suppress(AttributeError, TypeError):  # some built-in exceptions refuse
        exc.pull_stats = stats  # type: ignore[attr-defined]


def failure_stats(exc: BaseException) -> dict[str, Any]:
    """Counters of a pull that raised ``exc`` (empty when it failed before downloading)."""
    stats = getattr(exc, "pull_stats", None)
    return dict(stats) if isinstance(stats, dict) else {}


def describe_failure(uri_text: str, exc: BaseException) -> str:
    """The last log line of a failed pull: which URI, what went wrong, what to do."""
    shown = redact_url(uri_text)
    if isinstance(exc, InitializerError):
        detail = exc.describe()
    elif isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        detail = (
            f"the volume is full ({exc.filename or 'destination'}): "
            "free space or use a larger volume"
        )
    elif isinstance(exc, OSError):
        detail = f"{exc.strerror or exc} ({exc.filename})" if exc.filename else str(exc)
    else:
        detail = f"unexpected {type(exc).__name__}: {exc}"
    return redact(f"failed to download {shown}: {detail}")
