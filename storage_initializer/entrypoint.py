"""The KServe entrypoint: ``initializer-entrypoint src_uri_0 dest_path_0 [src_uri_1 dest_path_1]``.

Bit for bit KServe's contract: the usage line on stdout and exit 1 for a wrong argument count,
every destination created, pairs processed in order, exit 0 on success and 1 on any failure, and
a last log line that says which URI failed and why (KServe copies the log tail into the
InferenceService status). It has no flags: settings come from the environment and the config
file. This module imports nothing heavy, so that a replica finding its model complete starts
at once.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING, NoReturn

from storage_initializer import settings as settings_mod
from storage_initializer import signals, stall, termination
from storage_initializer.errors import InitializerError
from storage_initializer.pull import describe_failure, failure_stats, pull
from storage_initializer.redact import redact, redact_url
from storage_initializer.report import setup_logging, summary

if TYPE_CHECKING:
    from storage_initializer.settings import Settings

USAGE = "Usage: initializer-entrypoint src_uri_0 dest_path_0 ... src_uri_n dest_path_n"

log = logging.getLogger("storage_initializer")


def run_pairs(pairs: list[tuple[str, str]], flags: dict | None = None) -> int:
    try:
        settings = settings_mod.load(flags)
    except InitializerError as exc:
        setup_logging("text")
        log.error("invalid configuration: %s", exc.describe())
        _termination_message(None, f"invalid configuration: {exc.describe()}", None, [])
        return 1
    setup_logging(settings.log_format)
    signals.install()  # SIGTERM/SIGINT: stop now, keep the work, exit 143/130 (signals.py)
    runs: list[dict] = []
    current = {"source": ""}
    _arm_deadline(settings, runs, current)
    for source, dest in pairs:
        current["source"] = source
        log.info("Initializing, args: src_uri [%s] dest_path [%s]", source, dest)
        began = time.monotonic()
        try:
            result = pull(source, dest, settings)
        except signals.Terminated as exc:
            _terminated(exc, settings, source, len(pairs), runs, time.monotonic() - began)
        except Exception as failure:  # every failure ends in one explanatory line
            error = stall.as_deadline(failure)  # a cut socket's error, when it was the deadline
            log.debug("failure details", exc_info=True)
            if settings.metrics_file:
                # What the failed pull spent still counts: origin bytes, retries, failures.
                runs.append(
                    {
                        **failure_stats(error),
                        "source": _redacted(source),
                        "outcome": "failed",
                        "seconds": time.monotonic() - began,
                    }
                )
                _write_metrics(settings.metrics_file, runs)
            # The last line KServe shows: one line, even when a library's message spans several.
            reason = " ".join(describe_failure(source, error).split())
            log.error("%s", reason)
            _termination_message(settings, reason, source, runs)
            stall.finish_deadline()
            return 1
        runs.append(result.fields())
        summary(result.fields(), settings.log_format)
    if settings.metrics_file:
        _write_metrics(settings.metrics_file, runs)
    _termination_message(settings, None, None, runs)
    stall.finish_deadline()
    return 0


def _arm_deadline(settings: Settings, runs: list[dict], current: dict[str, str]) -> None:
    """--timeout: the run's deadline (stall.py). Should the run still not have ended a grace
    period after it, this reports the failure, then the process exits."""

    def hung(error: Exception) -> None:
        reason = " ".join(describe_failure(current["source"], error).split())
        log.error("%s", reason)
        _termination_message(settings, reason, current["source"], runs)

    stall.start_deadline(settings.timeout, hung)


def _terminated(
    exc: BaseException,
    settings: Settings,
    source: str,
    count: int,
    runs: list[dict],
    seconds: float,
) -> NoReturn:
    """The end of a run terminated during a pull: one last line saying what was interrupted
    and how far it got, the termination message and metrics, and exit 128 + signal without
    waiting for threads stuck in a request."""
    assert isinstance(exc, signals.Terminated)
    shown = _redacted(source)
    where = f" (model {len(runs) + 1} of {count})" if count > 1 else ""
    reason = redact(f"{exc}{where} {exc.detail or f'while pulling {shown}'}")
    if settings.metrics_file:
        stats = {**failure_stats(exc), "source": shown, "outcome": "terminated"}
        _write_metrics(settings.metrics_file, [*runs, {**stats, "seconds": seconds}])
    log.error("%s", reason)
    _termination_message(settings, reason, source, runs)
    signals.leave(exc.code)


def _termination_message(
    settings: object | None, reason: str | None, source: str | None, runs: list[dict]
) -> None:
    """The pod status's record of this run (termination.py): a summary of every pair on
    success, the one-line reason (and the pairs done before) on failure."""
    configured = getattr(settings, "termination_log", None)
    done = [run for run in runs if run.get("outcome") != "failed"]
    if reason is None:
        termination.record_success(configured, done)
    else:
        termination.record_failure(configured, reason, source, done)


def _redacted(uri: str) -> str:
    return redact_url(uri)


def _write_metrics(path: str, runs: list[dict]) -> None:
    """Metrics are a side channel: failing to write them must not fail the pull, nor hide the
    last log line, which explains the pull."""
    from storage_initializer import metrics  # prometheus_client: only with a metrics file

    try:
        metrics.write(path, runs)
    except OSError as exc:
        log.warning("cannot write the metrics file %s: %s", path, exc.strerror or exc)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or len(args) % 2:
        print(USAGE)
        sys.exit(1)
    pairs = [(args[i], args[i + 1]) for i in range(0, len(args), 2)]
    sys.exit(run_pairs(pairs))


if __name__ == "__main__":
    main()
