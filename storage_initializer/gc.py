"""Keeping a cache within bounds: evict whole entries, least recently or least frequently used.

An entry is a candidate only when it is complete, no replica holds its lease, and it has not
been used for ``min_idle`` seconds. Entries idle for longer than ``max_idle`` go first; then,
while the cache is larger than ``max_size`` or the volume has less than ``keep_free`` free,
the policy picks: ``lru`` (oldest last use) or ``lfu`` (fewest hits, then oldest). Eviction
claims the entry's lease, checks again that nobody used it meanwhile, removes the marker (so no
replica trusts the entry any more) and then the directory. Orphaned staging areas and stale
leases are cleaned on the way. The plan is computed first, so ``--dry-run`` announces exactly
what a real run frees when nothing changes in between.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from storage_initializer.cache import EntryInfo, describe, entries, model_entry, volume
from storage_initializer.store import access, layout
from storage_initializer.store import marker as marker_io
from storage_initializer.store.fsutil import remove_path, remove_tree
from storage_initializer.store.lease import Observer, Owner, current, try_claim

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Policy:
    max_size: int = 0
    keep_free: int = 0
    max_idle: float = 0.0
    min_idle: float = 300.0
    policy: str = "lru"
    stale_after: float = 30.0


@dataclass
class Action:
    entry: layout.Entry
    kind: str  # "evict" or "clean"
    reason: str
    bytes: int


def _switch_time(entry: layout.Entry) -> float | None:
    """When the cache entry last switched versions (the ``current`` link's mtime)."""
    try:
        return entry.current_link.lstat().st_mtime
    except OSError:
        return None


def _last_use(info: EntryInfo) -> float:
    return info.last_used or info.created or 0.0


def plan(cache_dir: Path, policy: Policy, now: float | None = None) -> list[Action]:
    now = time.time() if now is None else now
    infos = [(e, describe(e, policy.stale_after)) for e in entries(cache_dir)]
    actions: list[Action] = []
    for entry, info in infos:
        if info.state in ("orphaned staging", "stale lease") and info.staging_bytes:
            actions.append(Action(entry, "clean", info.state, info.staging_bytes))
        switched = _switch_time(entry)
        if info.old_versions and switched is not None and now - switched >= policy.min_idle:
            reason = f"{len(info.old_versions)} old version(s), replaced {now - switched:.0f}s ago"
            actions.append(Action(entry, "clean", reason, info.old_versions_bytes))
    candidates = [
        (entry, info)
        for entry, info in infos
        if info.state == "complete" and now - _last_use(info) >= policy.min_idle
    ]
    chosen: set[str] = set()
    if policy.max_idle:
        for entry, info in candidates:
            idle = now - _last_use(info)
            if idle > policy.max_idle:
                actions.append(Action(entry, "evict", f"idle {idle:.0f}s", info.size))
                chosen.add(entry.key)
    if policy.policy == "lfu":
        candidates.sort(key=lambda pair: (pair[1].hits, _last_use(pair[1])))
    else:
        candidates.sort(key=lambda pair: _last_use(pair[1]))
    size = sum(info.size for _, info in infos)
    free = volume(cache_dir)["free"]
    freed = sum(a.bytes for a in actions)
    for entry, info in candidates:
        too_big = policy.max_size and size - freed > policy.max_size
        too_full = policy.keep_free and free + freed < policy.keep_free
        if not (too_big or too_full):
            break
        if entry.key in chosen:
            continue
        reason = f"{policy.policy}: hits {info.hits}, last used {now - _last_use(info):.0f}s ago"
        actions.append(Action(entry, "evict", reason, info.size + info.old_versions_bytes))
        chosen.add(entry.key)
        freed += info.size + info.old_versions_bytes
    return actions


def _evict(action: Action, policy: Policy) -> bool:
    entry = action.entry
    generation, data = current(entry)
    state = Observer(policy.stale_after).classify(generation, data)
    if state == "fresh":
        log.info("skipping %s: a replica is using its lease", entry.key)
        return False
    lease = try_claim(entry, Owner.this_process(), generation, {"phase": "gc"})
    if lease is None:
        return False
    if action.kind == "clean":
        remove_tree(entry.staging_root)
        current_name = entry.current_version()
        for name in entry.versions():
            if name != current_name:
                remove_tree(entry.root / name)
        lease.release("cleaned")
        return True
    usage = access.usage(entry)
    if usage.last_used and time.time() - usage.last_used < policy.min_idle:
        log.info("skipping %s: used while we planned", entry.key)
        lease.release("kept")
        return False
    # No replica may trust the entry any more, before anything of it goes.
    marker_io.remove(model_entry(entry))
    for name in entry.model_items():
        remove_path(entry.root / name)
    lease.release("evicted")
    remove_tree(entry.root)
    return True


def run(cache_dir: Path, policy: Policy, dry_run: bool) -> tuple[list[Action], list[Action]]:
    """(planned, done)."""
    actions = plan(cache_dir, policy)
    if dry_run:
        return actions, []
    done = [a for a in actions if _evict(a, policy)]
    for entry in entries(cache_dir):
        access.compact(entry)
    return actions, done
