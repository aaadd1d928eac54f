"""Bulk pre-seeding: pull a list of models, several at a time, and report them in one table.

The Job that seeds an air-gapped cluster's volume runs ``storage-initializer prefetch
--from-file models.yaml``. The file::

    parallel: 2                # optional, models pulled at once
    defaults:                  # optional, any config-file option, for every model
      cache_dir: /mnt/model-cache
    models:
      - hf://Qwen/Qwen2.5-0.5B-Instruct          # a bare URI (cache mode)
      - uri: s3://models/llama
        dest: /mnt/store/llama                   # optional: a plain directory (direct mode)
        include: ["*.safetensors", "*.json"]     # optional, per-model options
        nodeSelector:                            # optional, only for `prefetch --watch`:
          gpu: h100                              # the nodes that preload it (all must match)

Each model is an ordinary pull (lease, staging, marker), so a prefetch and serving replicas
can run at the same time. A model that fails does not stop the others; the exit code is 1 if
any failed.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from storage_initializer import settings as settings_mod
from storage_initializer import signals
from storage_initializer.errors import UsageError
from storage_initializer.pull import describe_failure, pull
from storage_initializer.redact import redact, redact_url
from storage_initializer.report import human_bytes

log = logging.getLogger(__name__)


@dataclass
class Item:
    uri: str
    dest: str | None
    options: dict[str, Any]
    #: Node labels a node must carry to preload this model (``prefetch --watch``); {} = all.
    node_selector: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    item: Item
    ok: bool
    outcome: str
    size: int
    seconds: float
    detail: str


def load_file(path: Path) -> tuple[list[Item], int, dict[str, Any]]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise UsageError(f"{path} is not valid YAML: {exc}") from exc
    if isinstance(data, list):
        data = {"models": data}
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise UsageError(f"{path} must hold a list of models (or a mapping with 'models:')")
    defaults = settings_mod.normalise_keys(data.get("defaults") or {}, str(path))
    items = []
    for number, raw in enumerate(data["models"], 1):
        if isinstance(raw, str):
            raw = {"uri": raw}
        if not isinstance(raw, dict) or not raw.get("uri"):
            raise UsageError(f"{path}: model {number} has no uri")
        raw = dict(raw)
        uri = str(raw.pop("uri"))
        dest = raw.pop("dest", None)
        selector = _node_selector(raw.pop("nodeSelector", raw.pop("node_selector", None)), path)
        options = settings_mod.normalise_keys(raw, str(path))
        items.append(Item(uri, str(dest) if dest else None, options, selector))
    parallel = int(data.get("parallel", 2))
    return items, max(1, parallel), defaults


def _node_selector(raw: Any, path: Path) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise UsageError(f"{path}: nodeSelector must map label names to values")
    return {key: "" if value is None else str(value) for key, value in raw.items()}


def run(
    items: list[Item], parallel: int, flags: dict[str, Any], defaults: dict[str, Any]
) -> list[Outcome]:
    def one(item: Item) -> Outcome:
        try:
            signals.check()  # terminated before this model's turn: do not start it
            settings = settings_mod.load({**flags, **defaults, **item.options})
            if item.dest is None and not settings.cache_dirs:
                raise UsageError(
                    f"{item.uri} has no dest and no cache_dir is set",
                    "Give the model a dest, or set cache_dir in defaults",
                )
            result = pull(item.uri, item.dest, settings)
        except Exception as exc:  # one failure must not stop the others
            detail = describe_failure(item.uri, exc)
            log.error("%s", detail)
            return Outcome(item, False, "failed", 0, 0.0, detail)
        size = result.bytes_from_origin + result.bytes_reused
        return Outcome(item, True, result.outcome, size, result.seconds, result.dest)

    pool = ThreadPoolExecutor(parallel, thread_name_prefix="prefetch")
    futures = [pool.submit(one, item) for item in items]
    try:
        outcomes = [future.result() for future in futures]
    except signals.Terminated as exc:
        # The pulls stop at their next block or poll (signals.py); one stuck in a request is
        # left to die with the process, its lease released by signals.leave.
        wait(futures, timeout=signals.STOP_GRACE)
        pool.shutdown(wait=False, cancel_futures=True)
        ready = sum(1 for f in futures if f.done() and not f.cancelled() and _ok(f))
        exc.detail = (
            f"while prefetching {len(items)} model(s): {ready} ready, the others stopped "
            "with their staged files kept and their leases released"
        )
        raise
    pool.shutdown(wait=True)
    return outcomes


def _ok(future: Future[Outcome]) -> bool:
    return future.exception() is None and future.result().ok


def table(outcomes: list[Outcome]) -> str:
    rows = [("URI", "RESULT", "SIZE", "SECONDS", "WHERE / WHY")]
    for o in outcomes:
        rows.append(
            (
                redact_url(o.item.uri),
                o.outcome,
                human_bytes(o.size),
                f"{o.seconds:.1f}",
                redact(o.detail),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:4])) + "  " + row[4]
        for row in rows
    ]
    failed = sum(not o.ok for o in outcomes)
    lines.append(f"{len(outcomes) - failed} of {len(outcomes)} models ready, {failed} failed")
    return "\n".join(lines)
