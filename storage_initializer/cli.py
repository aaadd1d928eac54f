"""The ``storage-initializer`` command: pull, status, verify.

Every option of ``pull`` also has an environment variable and a config-file key (see
settings.py); a flag wins over both.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from storage_initializer import __version__


def _flags(**given: Any) -> dict[str, Any]:
    """Only what the user typed: click gives None (or ()) for options not on the command line."""
    return {k: v for k, v in given.items() if v is not None and v != ()}


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="storage-initializer")
def main() -> None:
    """Download models once for many replicas sharing a volume (KServe storage initializer)."""


@main.command()
@click.argument("source")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--cache-dir",
    "cache_dirs",
    multiple=True,
    help="Keep entries in this cache directory and link DEST to them. "
    "[env STORAGE_INITIALIZER_CACHE_DIR]",
)
@click.option(
    "--direct",
    is_flag=True,
    default=None,
    help="Download straight into DEST, ignoring a cache directory set by the config or env.",
)
@click.option(
    "--link-mode",
    type=click.Choice(["symlink", "hardlink", "copy"]),
    help="How DEST is populated from the cache. [symlink]",
)
@click.option(
    "--read-only/--writable",
    "read_only",
    default=None,
    help="File permissions of the model. [read-only; env STORAGE_READONLY]",
)
@click.option(
    "--include",
    multiple=True,
    help="Only files matching this pattern (repeatable). [env STORAGE_ALLOW_PATTERNS]",
)
@click.option(
    "--exclude",
    multiple=True,
    help="Skip files matching this pattern (repeatable). [env STORAGE_IGNORE_PATTERNS]",
)
@click.option(
    "--stale-after",
    type=float,
    help="Seconds without a heartbeat before a download is taken over. [30]",
)
@click.option(
    "--lock-timeout",
    type=float,
    help="Give up waiting for another replica after this many seconds; "
    "0 waits as long as it makes progress. [0]",
)
@click.option("--workers", type=int, help="Parallel requests. [backend default]")
@click.option("--chunk-size", help="Size of ranged chunks of large files, e.g. 32MiB. [32MiB]")
@click.option("--retries", type=int, help="Retries of a failing request. [5]")
@click.option("--progress-interval", type=float, help="Seconds between progress lines. [10]")
@click.option("--log-format", type=click.Choice(["text", "json"]), help="Log line format. [text]")
@click.option(
    "--replace/--no-replace", default=None, help="Replace a different model found in DEST. [no]"
)
@click.option("--max-size", help="Refuse a model larger than this, e.g. 200GiB. [no limit]")
@click.option(
    "--revalidate/--no-revalidate",
    default=None,
    help="Check the source for changes even when DEST is complete. [no]",
)
def pull(source: str, dest: Path, **options: Any) -> None:
    """Download SOURCE into DEST once, however many replicas ask at the same time."""
    from storage_initializer.entrypoint import run_pairs

    if options.pop("direct"):
        options["cache_dirs"] = [""]  # explicitly none: beats env and config
    sys.exit(run_pairs([(source, str(dest))], _flags(**options)))


@main.command()
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--stale-after", type=float, default=None, help="Staleness threshold to report with.")
def status(dest: Path, as_json: bool, stale_after: float | None) -> None:
    """Show whether DEST is complete, being downloaded (by whom, how far) or stale."""
    from storage_initializer import settings as settings_mod
    from storage_initializer.inspect import status as read_status
    from storage_initializer.report import human_bytes

    settings = settings_mod.load(_flags(stale_after=stale_after))
    info = read_status(dest, settings.stale_after)
    if as_json:
        click.echo(json.dumps(info, indent=1, sort_keys=True))
        return
    click.echo(f"{info['path']}: {info['state']}")
    for key in ("entry", "source", "fingerprint", "files", "completed_at", "downloaded_by"):
        if key in info:
            click.echo(f"  {key}: {info[key]}")
    if "size" in info:
        click.echo(f"  size: {human_bytes(info['size'])}")
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


@main.command()
@click.argument("dest", type=click.Path(path_type=Path))
def verify(dest: Path) -> None:
    """Re-hash every file of DEST against its marker; exit 1 listing the bad ones."""
    from storage_initializer.inspect import verify as run_verify
    from storage_initializer.redact import redact

    entry, bad, checked = run_verify(dest)
    if bad:
        for line in bad:
            click.echo(redact(f"BAD {line}"))
        click.echo(f"{len(bad)} problem(s) in {entry.root if entry else dest}", err=True)
        sys.exit(1)
    assert entry is not None
    click.echo(f"OK {checked} files in {entry.root} match the marker")
