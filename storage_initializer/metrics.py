"""A Prometheus text file at the end of every run (``--metrics-file``), for node-exporter's
textfile collector or a sidecar: what came from the origin, what was reused, where time went.

Every series is labelled ``source`` (the redacted URI) and ``outcome`` (the pull's outcome:
``downloaded``, ``complete``, ``waited``, ``copied-up``, ``linked``, ``no-op``, or ``failed``).
The names below are documented in docs/cache.md and checked by a test; keep the three in step.

* ``storage_initializer_bytes_from_origin_total`` — bytes downloaded by this process (a failed
  run counts what it fetched before failing)
* ``storage_initializer_bytes_reused_total`` — bytes found complete, waited for, or resumed
* ``storage_initializer_files`` — files of the model
* ``storage_initializer_phase_seconds{phase}`` — one series per phase of :data:`PHASES`, 0 when
  a run had no such phase: ``wait`` (for the lease), ``list`` (the source's listing),
  ``transfer`` (moving bytes), ``verify`` (finishing checksums, size checks and fsync of each
  file, summed over files — it overlaps ``transfer``, as files verify while others still
  arrive; on the fast path, the marker check), ``extract`` (a single archive), ``commit``, and
  ``total`` (the whole pull)
* ``storage_initializer_bytes_spliced_total`` — of the bytes from the origin, those moved from
  the socket into the file by the kernel (plain-http bodies, ``splice.py``)
* ``storage_initializer_retries_total`` — retried requests
* ``storage_initializer_takeovers_total`` — stale leases this process took over
* ``storage_initializer_verify_failures_total`` — files that failed verification (fetched again)
* ``storage_initializer_success`` — 1 when the pull succeeded, 0 when it failed
* ``storage_initializer_last_run_timestamp_seconds``
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, write_to_textfile

PREFIX = "storage_initializer"
#: The ``phase`` label's values, every one written for every run (dashboards need no gaps).
PHASES = ("wait", "list", "transfer", "verify", "extract", "commit", "total")


def write(path: str | Path, runs: Iterable[dict[str, Any]]) -> None:
    """``runs``: one dict per pull with ``source``, ``outcome``, byte counts, ``phases``…"""
    registry = CollectorRegistry()
    labels = ["source", "outcome"]

    def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
        return Counter(f"{PREFIX}_{name}", doc, [*labels, *extra], registry=registry)

    def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
        return Gauge(f"{PREFIX}_{name}", doc, [*labels, *extra], registry=registry)

    origin = counter("bytes_from_origin", "Bytes downloaded from the origin by this run")
    reused = counter("bytes_reused", "Bytes found in place, waited for, or resumed")
    files = gauge("files", "Files of the model")
    phases = gauge("phase_seconds", "Seconds spent in each phase", ("phase",))
    spliced = counter("bytes_spliced", "Bytes from the origin moved into files by splice")
    retries = counter("retries", "Retried requests")
    takeovers = counter("takeovers", "Stale leases taken over")
    verify_failures = counter("verify_failures", "Files that failed verification")
    success = gauge("success", "1 if the pull succeeded, 0 if it failed")
    stamp = gauge("last_run_timestamp_seconds", "When this run ended (Unix time)")
    for run in runs:
        key = (run.get("source", ""), run.get("outcome", ""))
        origin.labels(*key).inc(run.get("bytes_from_origin", 0))
        reused.labels(*key).inc(run.get("bytes_reused", 0))
        files.labels(*key).set(run.get("files", 0))
        seconds = {**dict.fromkeys(PHASES, 0.0), **(run.get("phases") or {})}
        seconds["total"] = run.get("seconds", 0.0)
        for phase, value in seconds.items():
            phases.labels(*key, phase).set(value)
        spliced.labels(*key).inc(run.get("bytes_spliced", 0))
        retries.labels(*key).inc(run.get("retries", 0))
        takeovers.labels(*key).inc(run.get("takeovers", 0))
        verify_failures.labels(*key).inc(run.get("verify_failures", 0))
        success.labels(*key).set(0 if run.get("outcome") == "failed" else 1)
        stamp.labels(*key).set(time.time())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), registry)  # temp file + rename: readers never see half
