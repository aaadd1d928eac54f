"""Keeping a cache within bounds: evict whole entries, least recently or least frequently used.

An entry is a candidate only when it is complete, no replica holds its lease, and it has not
been used for ``min_idle`` seconds. Entries idle for longer than ``max_idle`` go first; then,
while the cache is larger than ``max_size`` or the volume has less than ``keep_free`` free,
the policy picks: ``lru`` (oldest last use) or ``lfu`` (fewest hits, then oldest). Leftovers go
on the way: staging areas nobody downloads into any more (a stale lease or none at all), whole
entries that never completed, old versions replaced more than ``min_idle`` seconds ago, and the
trash of an interrupted gc.

Eviction claims the entry's lease (so no replica can start downloading into it), checks that
nobody used it since the plan, hides ``current`` (so no replica trusts it any more), checks the
access log once more — a fast-path pull records its use *before* it links and then re-checks
``current``, so one of the two always sees the other — and only then renames the whole entry
into a trash directory and removes that. A replica that comes afterwards finds no entry and
downloads it again; one waiting for the lease meanwhile starts afresh in a new entry.

The plan is computed first, with the same lease test and the same byte counts the real run
uses, so ``--dry-run`` announces exactly what a real run frees when nothing changes in between.
Bytes are space on disk (allocated blocks, as ``du`` counts them), each inode once, and a file
only when all its links go (a hard link outside the removed trees keeps its blocks in use).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from storage_initializer.cache.survey import EntryInfo, describe, entries, lease_state, volume
from storage_initializer.store import access, layout
from storage_initializer.store.fsutil import remove_tree
from storage_initializer.store.layout import EntryMode
from storage_initializer.store.lease import LeaseState, Owner, current, try_claim

log = logging.getLogger(__name__)

#: Prefix of a gc's trash directory in the cache (never a key: keys are hex).
TRASH_PREFIX = ".gc-"
#: Where eviction parks ``current`` between hiding it and removing the entry.
HIDDEN_CURRENT = ".current.gc"


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
    #: Space on disk this action frees (what ``du`` of the cache loses).
    bytes: int
    #: "entry" (the whole entry goes), "leftovers" (``paths`` inside it go) or "trash".
    scope: str = "entry"
    #: For "leftovers": the names below the entry root to remove (versions, the staging root).
    paths: list[str] = field(default_factory=list)
    #: Bytes of models this removes, in the units of ``--max-size`` (sizes from the markers).
    model_bytes: int = 0
    #: The access log as the plan saw it (access.stamp): a use recorded since keeps the entry.
    seen: tuple[int, int] = (0, 0)


def disk_usage(paths: Iterable[Path]) -> int:
    """Bytes on disk that removing these trees frees: allocated blocks of every file, directory
    and link in them, each inode once, and a regular file only when all its links are among the
    removed (a hard link elsewhere keeps the blocks in use)."""
    usage: dict[tuple[int, int], tuple[int, int, bool]] = {}  # inode -> blocks, nlink, file
    seen: dict[tuple[int, int], int] = {}
    for top in paths:
        try:
            st = os.lstat(top)
        except OSError:
            continue
        stack = [(str(top), st)]
        while stack:
            path, st = stack.pop()
            key = (st.st_dev, st.st_ino)
            seen[key] = seen.get(key, 0) + 1
            usage[key] = (st.st_blocks * 512, st.st_nlink, _is_file(st.st_mode))
            if _is_dir(st.st_mode):
                with contextlib.suppress(OSError), os.scandir(path) as listing:
                    for child in listing:
                        with contextlib.suppress(OSError):
                            stack.append((child.path, child.stat(follow_symlinks=False)))
    return sum(
        blocks
        for key, (blocks, nlink, is_file) in usage.items()
        if not is_file or seen[key] >= nlink
    )


def _action_paths(action: Action) -> list[Path]:
    if action.scope == "leftovers":
        return [action.entry.root / name for name in action.paths]
    return [action.entry.root]


def _account_shared(actions: list[Action]) -> None:
    """Give each action the space it frees *after* the ones before it: a file hard-linked from
    several entries or versions (content reuse, store.reuse) frees its blocks only with the
    last of its links, so it counts for the action that removes that last link, once, and the
    sum over the plan is exactly what ``du`` of the cache loses when the plan runs."""
    seen: dict[tuple[int, int], int] = {}
    for action in actions:
        freed = 0
        for top in _action_paths(action):
            try:
                stack = [(str(top), os.lstat(top))]
            except OSError:
                continue
            while stack:
                path, st = stack.pop()
                key = (st.st_dev, st.st_ino)
                count = seen[key] = seen.get(key, 0) + 1
                if _is_file(st.st_mode):
                    freed += st.st_blocks * 512 if count == st.st_nlink else 0
                elif count == 1:
                    freed += st.st_blocks * 512
                if _is_dir(st.st_mode):
                    with contextlib.suppress(OSError), os.scandir(path) as listing:
                        for child in listing:
                            with contextlib.suppress(OSError):
                                stack.append((child.path, child.stat(follow_symlinks=False)))
        action.bytes = freed


def _is_dir(mode: int) -> bool:
    return stat.S_ISDIR(mode)


def _is_file(mode: int) -> bool:
    return stat.S_ISREG(mode)


def _switch_time(entry: layout.Entry) -> float | None:
    """When the cache entry last switched versions (the ``current`` link's mtime)."""
    try:
        return entry.current_link.lstat().st_mtime
    except OSError:
        return None


def _last_use(info: EntryInfo) -> float:
    return info.last_used or info.created or 0.0


def _last_sign_of_life(entry: layout.Entry, info: EntryInfo) -> float:
    """When anybody last did something with an entry that never completed: its lease's
    heartbeat, its last recorded use, or its state directory's change time."""
    times = [info.heartbeat or 0.0, info.last_used or 0.0]
    with contextlib.suppress(OSError):
        times.append(entry.state.stat().st_mtime)
    return max(times)


def _leftovers(entry: layout.Entry, info: EntryInfo, policy: Policy, now: float) -> Action | None:
    """Old versions replaced ``min_idle`` ago and a staging area nobody downloads into, of a
    complete entry that stays."""
    names: list[str] = []
    reasons: list[str] = []
    model_bytes = 0
    switched = _switch_time(entry)
    if info.old_versions and switched is not None and now - switched >= policy.min_idle:
        names += info.old_versions
        model_bytes += info.old_versions_bytes
        old = len(info.old_versions)
        reasons.append(f"{old} old version(s), replaced {now - switched:.0f}s ago")
    quiet = now - (info.heartbeat or 0.0) >= policy.min_idle
    if info.staging_bytes and info.lease != LeaseState.HELD and quiet:
        names.append(str(entry.staging_root.relative_to(entry.root)))
        reasons.append(f"an abandoned staging area (lease {info.lease})")
    if not names:
        return None
    return Action(
        entry,
        "clean",
        "; ".join(reasons),
        disk_usage(entry.root / n for n in names),
        scope="leftovers",
        paths=names,
        model_bytes=model_bytes,
    )


def _trash(cache_dir: Path) -> list[Action]:
    """Trash directories an interrupted gc left behind."""
    found = []
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir(cache_dir)):
            if name.startswith(TRASH_PREFIX):
                path = cache_dir / name
                entry = layout.Entry(path, name, EntryMode.CACHE)
                found.append(
                    Action(entry, "clean", "left by an interrupted gc", disk_usage([path]), "trash")
                )
    return found


def plan(cache_dir: Path, policy: Policy, now: float | None = None) -> list[Action]:
    now = time.time() if now is None else now
    actions = _trash(cache_dir)
    candidates: list[tuple[layout.Entry, EntryInfo]] = []
    total_models = 0
    for entry in entries(cache_dir):
        info = describe(entry, policy.stale_after)
        total_models += info.size + info.old_versions_bytes
        if info.lease == LeaseState.HELD:
            what = "downloading" if info.state == "downloading" else f"{info.state}, lease held"
            phase = info.progress.get("phase", "?")
            log.info("keeping %s: %s by %s (phase %s)", entry.key, what, info.holder, phase)
            continue
        if info.state in ("stale lease", "orphaned staging", "incomplete"):
            idle = now - _last_sign_of_life(entry, info)
            if idle < policy.min_idle:
                log.info(
                    "keeping %s: %s, last activity %.0fs ago (within --min-idle: a restarted "
                    "replica resumes it)",
                    entry.key,
                    info.state,
                    idle,
                )
                continue
            reason = f"{info.state}, nothing complete, last activity {idle:.0f}s ago"
            actions.append(
                Action(entry, "clean", reason, disk_usage([entry.root]), seen=access.stamp(entry))
            )
            continue
        if info.state != "complete":
            continue  # damaged: `verify --repair` decides, not gc
        leftover = _leftovers(entry, info, policy, now)
        if leftover is not None:
            actions.append(leftover)
        if now - _last_use(info) >= policy.min_idle:
            candidates.append((entry, info))
        elif policy.max_size or policy.keep_free or policy.max_idle:
            log.info(
                "keeping %s: used %.0fs ago (within --min-idle %.0fs)",
                entry.key,
                now - _last_use(info),
                policy.min_idle,
            )
    freed_models = sum(a.model_bytes for a in actions)
    freed_disk = sum(a.bytes for a in actions)
    chosen: set[str] = set()

    def evict(entry: layout.Entry, info: EntryInfo, reason: str) -> None:
        nonlocal freed_models, freed_disk
        # The whole entry goes: its leftovers are not a separate action any more.
        for other in [a for a in actions if a.entry.key == entry.key]:
            actions.remove(other)
            freed_models -= other.model_bytes
            freed_disk -= other.bytes
        action = Action(
            entry,
            "evict",
            reason,
            disk_usage([entry.root]),
            model_bytes=info.size + info.old_versions_bytes,
            seen=access.stamp(entry),
        )
        actions.append(action)
        chosen.add(entry.key)
        freed_models += action.model_bytes
        freed_disk += action.bytes

    if policy.max_idle:
        for entry, info in candidates:
            idle = now - _last_use(info)
            if idle > policy.max_idle:
                evict(entry, info, f"idle {idle:.0f}s")
    if policy.policy == "lfu":
        candidates.sort(key=lambda pair: (pair[1].hits, _last_use(pair[1])))
    else:
        candidates.sort(key=lambda pair: _last_use(pair[1]))
    free = volume(cache_dir)["free"]
    for entry, info in candidates:
        too_big = policy.max_size and total_models - freed_models > policy.max_size
        too_full = policy.keep_free and free + freed_disk < policy.keep_free
        if not (too_big or too_full):
            break
        if entry.key in chosen:
            continue
        evict(
            entry,
            info,
            f"{policy.policy}: hits {info.hits}, last used {now - _last_use(info):.0f}s ago",
        )
    _account_shared(actions)
    return actions


def _used_since(action: Action, policy: Policy) -> str:
    """Why the entry must stay after all, or "" (a use since the plan, or within min_idle)."""
    if access.stamp(action.entry) != action.seen:
        return "used since gc planned"
    usage = access.usage(action.entry)
    if usage.last_used and time.time() - usage.last_used < policy.min_idle:
        return f"used {time.time() - usage.last_used:.0f}s ago"
    return ""


def hide_current(entry: layout.Entry) -> bool:
    try:
        os.rename(entry.current_link, entry.root / HIDDEN_CURRENT)
        return True
    except FileNotFoundError:
        return False


def unhide_current(entry: layout.Entry) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.rename(entry.root / HIDDEN_CURRENT, entry.current_link)


def remove_entry(entry: layout.Entry) -> None:
    """The whole entry at once: one rename out of the way (a replica sees the entry or no
    entry, never half of one), then the removal, which may take long, of the trash."""
    trash = entry.root.parent / f"{TRASH_PREFIX}{entry.key}-{uuid.uuid4().hex[:8]}"
    os.rename(entry.root, trash)
    remove_tree(trash)


def apply(action: Action, policy: Policy) -> bool:
    """Carry out one planned action under the entry's lease; False when it must not (any more)."""
    entry = action.entry
    if action.scope == "trash":
        remove_tree(entry.root)
        return True
    state, data = lease_state(entry, policy.stale_after)
    if state == LeaseState.HELD:
        holder = (data or {}).get("pod") or (data or {}).get("host")
        log.info("skipping %s: %s holds its lease", entry.key, holder)
        return False
    generation, _data = current(entry)
    lease = try_claim(entry, Owner.this_process(), generation, {"phase": "gc"})
    if lease is None:
        log.info("skipping %s: a replica claimed its lease meanwhile", entry.key)
        return False
    if action.scope == "leftovers":
        current_name = entry.current_version()
        for name in action.paths:
            if name != current_name:
                remove_tree(entry.root / name)
        lease.release("cleaned")
        return True
    if action.kind == "clean" and entry.current_version() is not None:
        log.info("skipping %s: it completed meanwhile", entry.key)
        lease.release("kept")
        return False
    if action.kind == "evict":
        why = _used_since(action, policy)
        if why:
            log.info("skipping %s: %s", entry.key, why)
            lease.release("kept")
            return False
        hidden = hide_current(entry)
        # A pull that read ``current`` before we hid it has recorded its use by now.
        why = _used_since(action, policy)
        if why:
            if hidden:
                unhide_current(entry)
            log.info("skipping %s: %s", entry.key, why)
            lease.release("kept")
            return False
    # The lease file goes with the entry: nothing to release.
    remove_entry(entry)
    return True


def run(cache_dir: Path, policy: Policy, dry_run: bool) -> tuple[list[Action], list[Action]]:
    """(planned, done)."""
    actions = plan(cache_dir, policy)
    if dry_run:
        return actions, []
    done = [a for a in actions if apply(a, policy)]
    for entry in entries(cache_dir):
        access.compact(entry)
    return actions, done
