"""The container's termination message: a short JSON result that Kubernetes keeps in the pod
status (``state.terminated.message``) and KServe shows, on success as well as on failure.

Why: the kubelet reads at most 4096 bytes from ``terminationMessagePath`` (default
``/dev/termination-log``). Without a message, a successful init container says nothing, and a
failed one says only what ``FallbackToLogsOnError`` copies from the log tail. With it, ``kubectl
get pod -o jsonpath='{..initContainerStatuses[0].state.terminated.message}'`` tells what each
pod fetched from the origin and what it reused, and why it failed.

Format (one JSON object, always valid, always within :data:`LIMIT` bytes)::

    {"outcome": "ok", "models": 2, "bytes_from_origin": 123, "bytes_reused": 0, "seconds": 4.2,
     "pulls": [{"source": "s3://bucket/llama", "dest": "/mnt/models", "outcome": "downloaded",
                "fingerprint": "...", "bytes_from_origin": 123, "bytes_reused": 0,
                "seconds": 4.1}, ...]}
    {"outcome": "failed", "reason": "<the last log line>", "source": "hf://org/model",
     "pulls": [... the pairs that succeeded before ...]}

Long strings are cut (ending in "..."), and pulls that do not fit are dropped and counted in
``"omitted"``; the totals always cover every pull. Every string goes through the redaction
used for logs, so no secret reaches the pod status.

The message is written only where it can be: the default path only when the kubelet created
it (outside Kubernetes there is no /dev/termination-log, and we never create files in /dev);
a path given explicitly (``STORAGE_INITIALIZER_TERMINATION_LOG``, ``termination_log``) is
created; an empty value turns it off. Failing to write it never fails the pull.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from storage_initializer.redact import MASK, escape_controls, redact, redact_url

log = logging.getLogger(__name__)

DEFAULT_PATH = "/dev/termination-log"
ENV = "STORAGE_INITIALIZER_TERMINATION_LOG"
#: The kubelet truncates a termination message at 4096 bytes.
LIMIT = 4096
#: Fields of a pull's result carried into the message, in this order.
PULL_FIELDS = ("source", "dest", "outcome", "fingerprint", "bytes_from_origin", "bytes_reused")


def target(configured: str | None = None) -> str | None:
    """The file to write, or None. ``configured`` is the setting (None: not loaded)."""
    path = configured if configured is not None else os.environ.get(ENV, DEFAULT_PATH)
    path = path.strip()
    if not path:
        return None
    if path == DEFAULT_PATH:
        return path if os.path.isfile(path) and os.access(path, os.W_OK) else None
    return path


def _clean(text: str, url: bool = False) -> str:
    """One line, secrets masked (``url``: the whole text is a URI, its query masked too)."""
    text = str(text)
    return escape_controls(" ".join(redact(redact_url(text) if url else text).split()))


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(0, limit - 3)] + "..."


def _pull(run: dict[str, Any], limit: int) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    for name in PULL_FIELDS:
        value = run.get(name)
        if value is None or value == "":
            continue
        if isinstance(value, str):
            value = _cut(_clean(value, url=name == "source"), limit)
        entry[name] = value
    if "seconds" in run:
        entry["seconds"] = round(float(run["seconds"]), 2)
    return entry


def _encode(message: dict[str, Any]) -> str:
    return json.dumps(message, ensure_ascii=False, separators=(",", ":"))


def _fit(head: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    """The message with as much detail as 4096 bytes hold: strings shortened first, then
    pulls dropped from the end (counted in ``omitted``)."""
    for limit in (1024, 256, 96, 48):
        pulls = [_pull(run, limit) for run in runs]
        for keep in range(len(pulls), -1, -1):
            message = dict(head)
            if pulls:
                message["pulls"] = pulls[:keep]
            if keep < len(pulls):
                message["omitted"] = len(pulls) - keep
            text = _encode(message)
            if len(text.encode()) <= LIMIT:
                return text
    return _encode({"outcome": head.get("outcome", "failed"), "omitted": len(runs)})


def success_message(runs: list[dict[str, Any]]) -> str:
    head = {
        "outcome": "ok",
        "models": len(runs),
        "bytes_from_origin": sum(int(r.get("bytes_from_origin") or 0) for r in runs),
        "bytes_reused": sum(int(r.get("bytes_reused") or 0) for r in runs),
        "seconds": round(sum(float(r.get("seconds") or 0.0) for r in runs), 2),
    }
    return _fit(head, runs)


def _credentials_of(uri: str) -> list[str]:
    """The password and query values of a URI: a library's error text may quote the URL in a
    form the generic redaction does not recognise (``user:pass@host:port``)."""
    try:
        parts = urlsplit(uri)
        found = [parts.password or ""]
        found += [value for _key, value in parse_qsl(parts.query, keep_blank_values=False)]
    except ValueError:
        return []
    return [value for value in found if len(value) >= 4]


def failure_message(reason: str, source: str | None, runs: list[dict[str, Any]]) -> str:
    head: dict[str, Any] = {"outcome": "failed"}
    for secret in sorted(_credentials_of(source or ""), key=len, reverse=True):
        reason = reason.replace(secret, MASK)
    # The reason is what matters most: shorten it only as far as the limit forces.
    clean_reason = _clean(reason)
    clean_source = _cut(_clean(source, url=True), 512) if source else None
    for room in (3000, 2000, 1000, 400):
        head = {"outcome": "failed", "reason": _cut(clean_reason, room)}
        if clean_source:
            head["source"] = clean_source
        if len(_encode(head).encode()) <= LIMIT - 200:
            break
    return _fit(head, runs)


def write(path: str | None, text: str) -> None:
    """Overwrite the message (the kubelet reads the file once the container ended)."""
    if not path:
        return
    try:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as exc:
        log.warning("cannot write the termination message to %s: %s", path, exc.strerror or exc)


def record_success(configured: str | None, runs: list[dict[str, Any]]) -> None:
    write(target(configured), success_message(runs))


def record_failure(
    configured: str | None, reason: str, source: str | None, runs: list[dict[str, Any]]
) -> None:
    write(target(configured), failure_message(reason, source, runs))
