"""``storage-initializer prefetch --watch``: preload models onto a node, without CRDs.

A DaemonSet runs it on every node (deploy/node-preload/). Each poll it reads

- the models file (the ``prefetch --from-file`` format; a model may carry a ``nodeSelector``),
  usually a mounted ConfigMap. The kubelet updates such a mount by swapping the ``..data``
  symlink, so the file is read by its path every poll: whatever the swap left there is read
  whole, never half of an old and half of a new version;
- the labels file of this node: ``key="value"`` lines (the downward API's format) or a JSON
  object. The downward API gives a pod its own labels, not its node's, so the DaemonSet's
  sidecar writes the node's labels there (see docs/kubernetes.md).

It pulls, into the node-local cache directory, every model whose selector this node's labels
match (an ordinary pull: lease, staging, marker, so serving pods on the node may pull the same
model at the same time), and evicts, through gc's eviction (lease claimed, use re-checked, whole
entry renamed away), models it preloaded that no longer match once they have not been used for
``--min-idle`` seconds. After every change it rewrites the readiness file atomically (temporary
file + rename): JSON with the models ready, failed and pending, for a readiness probe or a
scheduler hint. SIGTERM (or SIGINT) ends the loop, and the pulls in progress stop at once,
keeping their staged files and releasing their leases (signals.py); exit 0.

Failed pulls are retried with a backoff (doubling from the poll interval up to 10 minutes), or
at once when the models or labels file changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage_initializer import prefetch, signals
from storage_initializer import settings as settings_mod
from storage_initializer.cache import eviction
from storage_initializer.cache.survey import describe
from storage_initializer.errors import InitializerError, UsageError
from storage_initializer.redact import redact, redact_url
from storage_initializer.store import access, layout
from storage_initializer.uri import parse

log = logging.getLogger("storage_initializer.watch")

KEY_RE = re.compile(r"^[0-9a-f]{16}$")
MAX_BACKOFF = 600.0
#: A readiness file larger than this is not ours: ignore it.
MAX_STATE_BYTES = 4 << 20


@dataclass
class Options:
    models_file: Path
    labels_file: Path | None
    ready_file: Path
    cache_dir: Path
    poll_interval: float = 10.0
    min_idle: float = 300.0
    parallel: int = 2
    flags: dict[str, Any] = field(default_factory=dict)


@dataclass
class Wanted:
    item: prefetch.Item
    key: str


def read_labels(path: Path | None) -> dict[str, str]:
    """Node labels from ``key="value"`` lines (downward API format) or a JSON object. A missing
    file is no labels (the sidecar may not have written it yet); garbage lines are skipped."""
    if path is None:
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise UsageError(f"cannot read the labels file {path}: {exc.strerror}") from exc
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            data = json.loads(stripped)
        except ValueError as exc:
            raise UsageError(f"the labels file {path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise UsageError(f"the labels file {path} must hold one JSON object")
        return {str(k): str(v) for k, v in data.items()}
    labels: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.strip().partition("=")
        if not sep or not name:
            continue
        if value.startswith('"'):
            try:
                value = json.loads(value)  # Go's %q quoting, as JSON reads it
            except ValueError:
                continue
        labels[name.strip()] = str(value)
    return labels


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(name) == value for name, value in selector.items())


def _digest(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return "unreadable"


class Watcher:
    """One node's preloading loop; :meth:`step` is one poll (tests may call it directly)."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.stop = threading.Event()
        #: key -> what the readiness file says of a ready model
        self.ready: dict[str, dict[str, str]] = {}
        #: key -> (reason, failures, next attempt)
        self.failed: dict[str, tuple[str, int, float]] = {}
        #: Keys this watcher preloaded (now or in an earlier life, from the readiness file):
        #: the only entries it ever evicts.
        self.managed: set[str] = set(self._previous_keys())
        self._inputs = ""
        self._written = ""

    # ------------------------------------------------------------------ inputs

    def _previous_keys(self) -> list[str]:
        """Keys of the last readiness file: untrusted input, only 16-hex keys are kept."""
        try:
            with open(self.options.ready_file, "rb") as handle:
                data = json.loads(handle.read(MAX_STATE_BYTES))
        except (OSError, ValueError):
            return []
        keys = data.get("managed", []) if isinstance(data, dict) else []
        return [k for k in keys if isinstance(k, str) and KEY_RE.match(k)]

    def _wanted(self) -> tuple[list[Wanted], dict[str, Any]]:
        items, _parallel, defaults = prefetch.load_file(self.options.models_file)
        labels = read_labels(self.options.labels_file)
        wanted = []
        for item in items:
            if not matches(item.node_selector, labels):
                continue
            settings = settings_mod.load(
                {
                    **self.options.flags,
                    **defaults,
                    **item.options,
                    "cache_dirs": [str(self.options.cache_dir)],
                }
            )
            key = parse(item.uri).key(settings.include, settings.exclude)
            # Node preloading fills the node's cache: a per-model dest or cache makes no sense.
            options = {k: v for k, v in item.options.items() if k != "cache_dirs"}
            wanted.append(Wanted(prefetch.Item(item.uri, None, options, item.node_selector), key))
        return wanted, {k: v for k, v in defaults.items() if k != "cache_dirs"}

    # ------------------------------------------------------------------ one poll

    def step(self) -> None:
        inputs = _digest(self.options.models_file) + _digest(self.options.labels_file)
        if inputs != self._inputs:
            if self._inputs:
                log.info("models or labels changed: re-planning")
            self._inputs = inputs
            self.failed = {k: (r, n, 0.0) for k, (r, n, _t) in self.failed.items()}
        try:
            wanted, defaults = self._wanted()
        except InitializerError as exc:
            # A broken edit of the ConfigMap: keep what is ready, say why nothing changes.
            log.error("cannot use the models: %s", exc.describe())
            return
        wanted_keys = {w.key for w in wanted}
        self._pull_missing(wanted, defaults)
        self._evict_unwanted(wanted_keys)
        for key in list(self.ready):
            if key not in wanted_keys:
                del self.ready[key]
        self._write_ready(wanted)

    def _is_complete(self, key: str) -> bool:
        return layout.cached(self.options.cache_dir, key).current_version() is not None

    def _pull_missing(self, wanted: list[Wanted], defaults: dict[str, Any]) -> None:
        now = time.monotonic()
        todo = []
        for w in wanted:
            if w.key in self.ready and self._is_complete(w.key):
                continue
            failure = self.failed.get(w.key)
            if failure and failure[2] > now:
                continue
            todo.append(w)
        if not todo:
            return
        flags = {**self.options.flags, "cache_dirs": [str(self.options.cache_dir)]}
        outcomes = prefetch.run([w.item for w in todo], self.options.parallel, flags, defaults)
        for w, outcome in zip(todo, outcomes, strict=True):
            self.managed.add(w.key)
            if outcome.ok:
                self.failed.pop(w.key, None)
                self.ready[w.key] = {
                    "uri": _redacted(w.item.uri),
                    "key": w.key,
                    "path": outcome.detail,
                }
                log.info(
                    "preloaded %s (%s) into %s",
                    _redacted(w.item.uri),
                    outcome.outcome,
                    outcome.detail,
                )
            else:
                count = self.failed.get(w.key, ("", 0, 0.0))[1] + 1
                delay = min(MAX_BACKOFF, self.options.poll_interval * 2**count)
                self.failed[w.key] = (outcome.detail, count, time.monotonic() + delay)
                self.ready.pop(w.key, None)

    def _evict_unwanted(self, wanted_keys: set[str]) -> None:
        stale_after = settings_mod.load(self.options.flags).stale_after
        policy = eviction.Policy(min_idle=self.options.min_idle, stale_after=stale_after)
        for key in sorted(self.managed - wanted_keys):
            entry = layout.cached(self.options.cache_dir, key)
            if not entry.root.is_dir():
                self.managed.discard(key)
                self.failed.pop(key, None)
                continue
            info = describe(entry, stale_after)
            action = eviction.Action(
                entry, "evict", "no longer selected for this node", 0, seen=access.stamp(entry)
            )
            if info.state != "complete":
                continue  # a download in progress or a damaged entry: gc's business, not ours
            if eviction.apply(action, policy):
                log.info("removed %s (%s): no longer selected for this node", key, info.source)
                self.managed.discard(key)
                self.failed.pop(key, None)

    # ------------------------------------------------------------------ readiness

    def _write_ready(self, wanted: list[Wanted]) -> None:
        ready = [self.ready[w.key] for w in wanted if w.key in self.ready]
        failed = [
            {"uri": _redacted(w.item.uri), "key": w.key, "reason": _clean(self.failed[w.key][0])}
            for w in wanted
            if w.key in self.failed
        ]
        done = {r["key"] for r in ready} | {f["key"] for f in failed}
        pending = [
            {"uri": _redacted(w.item.uri), "key": w.key} for w in wanted if w.key not in done
        ]
        body = {
            "ready": ready,
            "failed": failed,
            "pending": pending,
            "managed": sorted(self.managed),
        }
        text = json.dumps(body, indent=1, sort_keys=True)
        if text == self._written:
            return
        _atomic_write(self.options.ready_file, text)
        self._written = text
        log.info(
            "ready: %d of %d models%s",
            len(ready),
            len(wanted),
            (" (" + ", ".join(r["uri"] for r in ready) + ")") if ready else "",
        )

    # ------------------------------------------------------------------ loop

    def run(self) -> int:
        log.info(
            "watching %s (labels %s) every %gs; cache %s; readiness %s",
            self.options.models_file,
            self.options.labels_file or "none: every node matches only models without a selector",
            self.options.poll_interval,
            self.options.cache_dir,
            self.options.ready_file,
        )
        while not self.stop.is_set():
            self.step()
            self.stop.wait(self.options.poll_interval)
        log.info("stopped: SIGTERM received")
        return 0


def _redacted(uri: str) -> str:
    return redact_url(uri)


def _clean(text: str) -> str:
    return " ".join(redact(text).split())[:2000]


def _atomic_write(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def watch(options: Options) -> int:
    """Run until SIGTERM/SIGINT; the exit code."""
    if options.poll_interval <= 0:
        raise UsageError("--poll-interval must be positive", "Use e.g. --poll-interval 10")
    watcher = Watcher(options)

    def stop(signum: int, _frame: object) -> None:
        watcher.stop.set()
        signals.stop_pulls(signum)  # pulls in progress stop now, keeping their staged files

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        return watcher.run()
    except signals.Terminated as exc:  # raised by the pulls that were stopped
        log.info("stopped: %s received; %s", exc.name, exc.detail or "pulls stopped")
        signals.leave(0)
