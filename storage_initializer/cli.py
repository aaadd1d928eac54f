"""The ``storage-initializer`` command: pull and prefetch here; status, verify, gc in cli_cache.py.

Every option of ``pull`` also has an environment variable and a config-file key (see
settings.py); a flag wins over both.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

from storage_initializer import __version__
from storage_initializer.cli_cache import _flags, gc, status, verify


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="storage-initializer")
def main() -> None:
    """Download models once for many replicas sharing a volume (KServe storage initializer)."""


for _command in (status, verify, gc):
    main.add_command(_command)


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
    help="Seconds without a heartbeat before a download is taken over. [30]",
)
@click.option(
    "--lock-timeout",
    help="Give up waiting for another replica after this many seconds; "
    "0 waits as long as it makes progress. [0]",
)
@click.option("--workers", help="Parallel requests. [backend default]")
@click.option("--chunk-size", help="Size of ranged chunks of large files, e.g. 32MiB. [32MiB]")
@click.option("--retries", help="Retries of a failing request. [5]")
@click.option("--write-size", help="Size of each write into the page cache, e.g. 32KiB. [32KiB]")
@click.option("--read-size", help="Size of the blocks read from the network, e.g. 256KiB. [256KiB]")
@click.option(
    "--direct-io/--no-direct-io",
    default=None,
    help="Write files of 8 MiB or more with O_DIRECT, bypassing the page cache. [no]",
)
@click.option(
    "--splice/--no-splice",
    default=None,
    help="Move plain-http bodies from the socket into files in the kernel (Linux). [yes]",
)
@click.option(
    "--stall-timeout",
    help="Cut and retry a transfer slower than --min-rate over this many seconds; 0: never. [30]",
)
@click.option("--min-rate", help="Slowest acceptable transfer, bytes/s, e.g. 1KiB. [1KiB]")
@click.option("--timeout", help="Fail the run after this many seconds; 0: no deadline. [0]")
@click.option("--progress-interval", help="Seconds between progress lines. [10]")
@click.option("--log-format", type=click.Choice(["text", "json"]), help="Log line format. [text]")
@click.option(
    "--replace/--no-replace", default=None, help="Replace a different model found in DEST. [no]"
)
@click.option("--max-size", help="Refuse a model larger than this, e.g. 200GiB. [no limit]")
@click.option("--metrics-file", help="Write Prometheus metrics of the run to this file.")
@click.option(
    "--termination-log",
    help="Write the JSON result here for the pod status; '' turns it off. "
    "[/dev/termination-log when the kubelet created it]",
)
@click.option(
    "--revalidate/--no-revalidate",
    default=None,
    help="Check the source for changes even when DEST is complete. [no]",
)
@click.option(
    "--require-signature",
    metavar="TRUST",
    help="Refuse a model not signed (model_signing, model.sig) under TRUST: key:PEM, "
    "certificate:CA[,CA...] or sigstore:IDENTITY,ISSUER. "
    "[env STORAGE_INITIALIZER_REQUIRE_SIGNATURE]",
)
@click.option("--signature-uri", help="The signature's URI when it is not model.sig in SOURCE.")
@click.option("--signature-trust-root", help="sigstore: the trust root file (offline clusters).")
def pull(source: str, dest: Path, **options: Any) -> None:
    """Download SOURCE into DEST once, however many replicas ask at the same time."""
    from storage_initializer.entrypoint import run_pairs

    if options.pop("direct"):
        options["cache_dirs"] = [""]  # explicitly none: beats env and config
    sys.exit(run_pairs([(source, str(dest))], _flags(**options)))


@main.command()
@click.option(
    "--from-file", "from_file", type=click.Path(exists=True, path_type=Path), required=True
)
@click.option("--parallel", type=int, default=None, help="Models pulled at once. [file, or 2]")
@click.option("--cache-dir", "cache_dirs", multiple=True, help="Cache directory for every model.")
@click.option("--log-format", type=click.Choice(["text", "json"]), help="Log line format.")
@click.option(
    "--watch",
    is_flag=True,
    help="Keep running (a DaemonSet): preload the models whose nodeSelector matches this "
    "node, remove those that stop matching, re-read both files every --poll-interval.",
)
@click.option(
    "--labels-file",
    type=click.Path(path_type=Path),
    help='With --watch: this node\'s labels, key="value" lines or a JSON object.',
)
@click.option(
    "--ready-file",
    type=click.Path(path_type=Path),
    help="With --watch: JSON list of the models ready on this node (rewritten atomically). "
    "[<cache-dir>/.preload-ready.json]",
)
@click.option(
    "--poll-interval",
    type=float,
    default=10.0,
    show_default=True,
    help="With --watch: seconds between two reads of the models and labels files.",
)
@click.option(
    "--min-idle",
    type=float,
    default=300.0,
    show_default=True,
    help="With --watch: a model no longer selected is removed once unused this long.",
)
def prefetch(
    from_file: Path,
    parallel: int | None,
    watch: bool,
    labels_file: Path | None,
    ready_file: Path | None,
    poll_interval: float,
    min_idle: float,
    **options: Any,
) -> None:
    """Pull every model listed in a YAML file, several at a time; one table at the end, exit 1
    if any failed. The Job that seeds an air-gapped cluster. With --watch, a node's preloader
    (docs/kubernetes.md)."""
    from storage_initializer import prefetch as prefetch_mod
    from storage_initializer import settings as settings_mod
    from storage_initializer.errors import InitializerError
    from storage_initializer.report import setup_logging

    flags = _flags(**options)
    try:
        base = settings_mod.load(flags)
        setup_logging(base.log_format)
        items, file_parallel, defaults = prefetch_mod.load_file(from_file)
        if watch:
            sys.exit(
                _watch(
                    from_file,
                    labels_file,
                    ready_file,
                    poll_interval,
                    min_idle,
                    flags,
                    parallel or file_parallel,
                    base,
                    defaults,
                )
            )
    except InitializerError as exc:
        setup_logging("text")
        click.echo(f"prefetch: {exc.describe()}", err=True)
        sys.exit(1)
    from storage_initializer import signals

    signals.install()
    try:
        outcomes = prefetch_mod.run(items, parallel or file_parallel, flags, defaults)
    except signals.Terminated as exc:  # one last line, exit 143 (130 for SIGINT)
        logging.getLogger("storage_initializer").error("%s %s", exc, exc.detail)
        signals.leave(exc.code)
    click.echo(prefetch_mod.table(outcomes))
    sys.exit(0 if all(o.ok for o in outcomes) else 1)


def _watch(
    models_file: Path,
    labels_file: Path | None,
    ready_file: Path | None,
    poll_interval: float,
    min_idle: float,
    flags: dict[str, Any],
    parallel: int,
    base: Any,
    defaults: dict[str, Any],
) -> int:
    from storage_initializer import prefetch_watch
    from storage_initializer.errors import UsageError

    cache_dirs = base.cache_dirs or tuple(
        [defaults["cache_dirs"]]
        if isinstance(defaults.get("cache_dirs"), str)
        else defaults.get("cache_dirs") or ()
    )
    if not cache_dirs or not cache_dirs[0]:
        raise UsageError(
            "prefetch --watch needs a cache directory (the node-local tier)",
            "Give --cache-dir, STORAGE_INITIALIZER_CACHE_DIR, or cache_dir in the file's defaults",
        )
    cache_dir = Path(cache_dirs[0])
    options = prefetch_watch.Options(
        models_file=models_file,
        labels_file=labels_file,
        ready_file=ready_file or cache_dir / ".preload-ready.json",
        cache_dir=cache_dir,
        poll_interval=poll_interval,
        min_idle=min_idle,
        parallel=parallel,
        flags=flags,
    )
    return prefetch_watch.watch(options)
