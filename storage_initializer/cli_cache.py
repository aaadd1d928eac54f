"""The cache commands of ``storage-initializer``: status, verify (and repair), gc.

They read and tend what pulls left on disk (markers, leases, cache entries) and never download
a model, except ``verify --repair``. Split from cli.py, which holds the group and the commands
that download (pull, prefetch) and registers these.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click


def _flags(**given: Any) -> dict[str, Any]:
    """Only what the user typed: click gives None (or ()) for options not on the command line."""
    return {k: v for k, v in given.items() if v is not None and v != ()}


@click.command()
@click.argument("dest", type=click.Path(path_type=Path), required=False)
@click.option(
    "--cache-dir", type=click.Path(path_type=Path), help="Show every entry of this cache instead."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--stale-after", type=float, default=None, help="Staleness threshold to report with.")
@click.option(
    "--max-size",
    help="Quota to check the usage against, e.g. 200GiB. [env STORAGE_INITIALIZER_MAX_SIZE]",
)
def status(
    dest: Path | None,
    cache_dir: Path | None,
    as_json: bool,
    stale_after: float | None,
    max_size: str | None,
) -> None:
    """Show whether DEST is complete, being downloaded (by whom, how far) or stale, and what it
    holds on disk now against the quota; with --cache-dir, a table of every entry of the cache
    and the volume's space."""
    from storage_initializer import settings as settings_mod
    from storage_initializer.cache.status_verify import status as read_status
    from storage_initializer.errors import InitializerError
    from storage_initializer.report import human_bytes

    try:
        settings = settings_mod.load(_flags(stale_after=stale_after, max_size=max_size))
    except InitializerError as exc:  # a bad --max-size or env value: one line, no traceback
        click.echo(f"status: {exc.describe()}", err=True)
        sys.exit(2)
    if cache_dir is not None:
        _cache_status(cache_dir, settings.stale_after, as_json)
        return
    if dest is None:
        raise click.UsageError("give DEST or --cache-dir")
    info = _redacted(read_status(dest, settings.stale_after, settings.max_size))
    if as_json:
        click.echo(json.dumps(info, indent=1, sort_keys=True))
        # Same exit status as the text form, so scripts can test for a model either way.
        sys.exit(1 if info["state"] == "absent" else 0)
    click.echo(f"{info['path']}: {info['state']}")
    for key in ("entry", "source", "fingerprint", "files", "completed_at", "downloaded_by"):
        if key in info:
            click.echo(f"  {key}: {info[key]}")
    signed = info.get("signature")
    if signed:
        click.echo(
            f"  signature: verified {signed.get('verified_at')} against {signed.get('trust')}, "
            f"signed by {signed.get('signer')} ({signed.get('signature')} "
            f"{signed.get('signature_sha256')})"
        )
    if "size" in info:
        click.echo(f"  size: {human_bytes(info['size'])} when downloaded (marker)")
    used = info.get("usage")
    if used is not None:
        line = (
            f"  usage: {human_bytes(used['bytes'])} in {used['files']} files on disk now "
            f"({human_bytes(used['allocated'])} allocated)"
        )
        grown = used["bytes"] - info.get("size", used["bytes"])
        if grown:
            line += f", {'+' if grown > 0 else '-'}{human_bytes(abs(grown))} since the download"
        click.echo(line)
    if info.get("max_size"):
        origin = settings.origins.get("max_size", "")
        click.echo(f"  quota: {human_bytes(info['max_size'])} per entry ({origin})")
    if info.get("over_quota"):
        click.echo(
            f"  WARNING: {human_bytes(used['bytes'])} on disk exceeds the quota of "
            f"{human_bytes(info['max_size'])}: something wrote into the model directory; remove "
            "what is not needed, or raise --max-size (STORAGE_INITIALIZER_MAX_SIZE)"
        )
    for problem in info.get("problems", []):
        click.echo(f"  problem: {problem}")
    lease = info.get("lease")
    if lease:
        click.echo(
            f"  lease: {lease['holder']} pid {lease['pid']} phase {lease['phase']}, "
            f"{human_bytes(lease['bytes_done'])}/{human_bytes(lease['bytes_total'])}, "
            f"heartbeat {lease['heartbeat_age']}s ago{' (STALE)' if lease['stale'] else ''}"
        )
    if info.get("staging_areas"):
        click.echo(f"  staging areas: {', '.join(info['staging_areas'])}")
    if info["state"] == "absent":
        sys.exit(1)


@click.command()
@click.argument("dest", type=click.Path(path_type=Path), required=False)
@click.option(
    "--cache-dir", type=click.Path(path_type=Path), help="Verify the entries of this cache."
)
@click.option("--entry", "entry_ref", help="Only this cache entry: its key or its URI.")
@click.option("--repair", is_flag=True, help="Re-download only the bad files, under the lock.")
@click.option(
    "--source",
    help="With --repair: the URI to download from (with credentials), "
    "when the marker's redacted one will not do.",
)
@click.option(
    "--require-signature",
    metavar="TRUST",
    help="Also require a signature verified under TRUST (as for pull). Without it, a model "
    "verified at download is re-checked under the trust its marker recorded.",
)
def verify(
    dest: Path | None,
    cache_dir: Path | None,
    entry_ref: str | None,
    repair: bool,
    source: str | None,
    require_signature: str | None,
) -> None:
    """Re-hash every file of DEST (or of every cache entry) against its marker; exit 1 listing
    the bad ones. With --repair, fetch the bad files again (exit 0 once repaired)."""
    from storage_initializer import settings as settings_mod
    from storage_initializer.cache import survey as cache
    from storage_initializer.cache.status_verify import verify as run_verify
    from storage_initializer.redact import redact

    if cache_dir is not None:
        settings = settings_mod.load({})
        if entry_ref:
            found = cache.find(cache_dir, entry_ref, settings)
            if found is None:
                click.echo(f"no entry for {redact(entry_ref)} in {cache_dir}", err=True)
                sys.exit(1)
            targets = [found.root]
        else:
            targets = [e.root for e in cache.entries(cache_dir)]
    elif dest is not None:
        targets = [dest]
    else:
        raise click.UsageError("give DEST or --cache-dir")
    from storage_initializer.errors import InitializerError

    try:
        trust = settings_mod.load(_flags(require_signature=require_signature))
    except InitializerError as exc:  # a malformed TRUST: one line, no traceback
        click.echo(f"verify: {exc.describe()}", err=True)
        sys.exit(2)
    failed = 0
    for target in targets:
        entry, bad, checked = run_verify(
            target, trust.require_signature, trust.signature_trust_root
        )
        if bad and repair and entry is not None and _repair(entry, source):
            continue
        if bad:
            failed += 1
            for line in bad:
                click.echo(redact(f"BAD {line}"))
            click.echo(f"{len(bad)} problem(s) in {entry.root if entry else target}", err=True)
        else:
            assert entry is not None
            click.echo(f"OK {checked} files in {entry.root} match the marker")
            _echo_signature(entry)
    sys.exit(1 if failed else 0)


def _echo_signature(entry: Any) -> None:
    from storage_initializer.store import marker as marker_io

    found = marker_io.read(entry)
    signed = found.signature if found is not None else None
    if signed:
        click.echo(
            f"OK signature {signed.get('signature')} by {signed.get('signer')} "
            f"({signed.get('trust')}) matches the files"
        )


def _repair(entry: Any, source: str | None) -> bool:
    """Repair one entry; True when it verifies afterwards."""
    from storage_initializer import settings as settings_mod
    from storage_initializer.cache.repair import repair
    from storage_initializer.cache.status_verify import verify as run_verify
    from storage_initializer.errors import InitializerError
    from storage_initializer.redact import MASK, redact
    from storage_initializer.report import setup_logging
    from storage_initializer.store import marker as marker_io
    from storage_initializer.store.layout import EntryMode

    setup_logging("text")
    marker = marker_io.read(entry)
    uri = source or (marker.source if marker else "")
    if not uri or MASK in uri:
        click.echo(f"{entry.root}: give --source (the marker's URI is redacted)", err=True)
        return False
    try:
        bad, _result = repair(uri, entry, settings_mod.load({}))
    except InitializerError as exc:
        click.echo(redact(f"cannot repair {entry.root}: {exc.describe()}"), err=True)
        return False
    fixed_entry, still_bad, checked = run_verify(
        entry.root if entry.mode == EntryMode.DIRECT else entry.root.parent
    )
    if still_bad:
        return False
    click.echo(f"REPAIRED {len(bad)} file(s): {', '.join(sorted(bad))}")
    assert fixed_entry is not None
    click.echo(f"OK {checked} files in {fixed_entry.root} match the marker")
    return True


def _redacted(value: Any) -> Any:
    """``status`` output through the one redaction function: every string it prints (a marker
    or lease written by another version or by hand may hold a credential)."""
    from storage_initializer.redact import redact

    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: _redacted(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_redacted(item) for item in value]
    return value


def _when(stamp: float | None) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp)) if stamp else "-"


def _cache_status(cache_dir: Path, stale_after: float, as_json: bool) -> None:
    from storage_initializer.cache import survey as cache
    from storage_initializer.report import human_bytes

    survey = _redacted(cache.survey(cache_dir, stale_after))
    if as_json:
        click.echo(json.dumps(survey, indent=1, sort_keys=True))
        return
    header = ("KEY", "STATE", "SIZE", "SHARED", "FILES", "CREATED", "LAST USED", "HITS", "SOURCE")
    rows = [header]
    for e in survey["entries"]:
        state = e["state"]
        if e["holder"]:
            done, total = e["progress"].get("bytes_done", 0), e["progress"].get("bytes_total", 0)
            state += f" ({e['holder']}, {human_bytes(done)}/{human_bytes(total)})"
        rows.append(
            (
                e["key"],
                state,
                human_bytes(e["size"]),
                human_bytes(e.get("shared_bytes", 0)),
                str(e["files"]),
                _when(e["created"]),
                _when(e["last_used"]),
                str(e["hits"]),
                e["source"],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    for row in rows:
        click.echo("  ".join(c.ljust(widths[i]) for i, c in enumerate(row[:-1])) + "  " + row[-1])
    volume = survey["volume"]
    click.echo(
        f"{len(survey['entries'])} entries, {human_bytes(survey['entries_size'])} of models; "
        f"volume {human_bytes(volume['used'])} used, {human_bytes(volume['free'])} free "
        f"of {human_bytes(volume['total'])}"
    )


@click.command()
@click.option("--cache-dir", type=click.Path(path_type=Path), required=True)
@click.option("--max-size", help="Evict until the cache's models take at most this, e.g. 500GiB.")
@click.option("--keep-free", help="Evict until the volume has at least this free.")
@click.option("--max-idle", type=float, help="Evict entries unused for this many seconds.")
@click.option(
    "--min-idle",
    type=float,
    default=300.0,
    show_default=True,
    help="Never evict an entry used within this many seconds.",
)
@click.option("--policy", type=click.Choice(["lru", "lfu"]), default="lru", show_default=True)
@click.option("--stale-after", type=float, default=None, help="When a lease counts as stale.")
@click.option("--dry-run", is_flag=True, help="Only print what would be freed.")
def gc(
    cache_dir: Path,
    max_size: str | None,
    keep_free: str | None,
    max_idle: float | None,
    min_idle: float,
    policy: str,
    stale_after: float | None,
    dry_run: bool,
) -> None:
    """Keep a cache within bounds: evict whole entries (LRU or LFU), never one in use, and
    remove orphaned staging areas."""
    from storage_initializer import settings as settings_mod
    from storage_initializer.cache import eviction as gc_mod
    from storage_initializer.report import human_bytes, setup_logging

    setup_logging("text")
    settings = settings_mod.load(_flags(stale_after=stale_after))
    size = settings_mod.parse_size
    rules = gc_mod.Policy(
        max_size=size(max_size) if max_size else 0,
        keep_free=size(keep_free) if keep_free else 0,
        max_idle=max_idle or 0.0,
        min_idle=min_idle,
        policy=policy,
        stale_after=settings.stale_after,
    )
    planned, done = gc_mod.run(cache_dir, rules, dry_run)
    shown = planned if dry_run else done
    for action in shown:
        verb = ("would " if dry_run else "") + ("evict" if action.kind == "evict" else "clean")
        click.echo(f"{verb} {action.entry.key} ({human_bytes(action.bytes)}): {action.reason}")
    total = sum(a.bytes for a in shown)
    click.echo(
        f"{'would free' if dry_run else 'freed'} {human_bytes(total)} in {len(shown)} actions"
    )
