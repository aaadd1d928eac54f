"""Settings: one typed object built from flags, environment and the global config file.

Precedence, highest first: command-line flag, environment variable, config file (a mounted
ConfigMap holding the cluster-wide defaults), built-in default. The KServe entrypoint has no
flags, so there the environment and the config file decide.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from storage_initializer.errors import UsageError

CONFIG_ENV = "STORAGE_INITIALIZER_CONFIG"
DEFAULT_CONFIG_PATH = "/etc/storage-initializer/config.yaml"
LINK_MODES = ("symlink", "hardlink", "copy")
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class Settings:
    cache_dirs: tuple[str, ...] = ()
    link_mode: str = "symlink"
    read_only: bool = True
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    stale_after: float = 30.0
    lock_timeout: float = 0.0
    workers: int = 0
    chunk_size: int = 32 * 1024 * 1024
    #: Size of each write into the page cache (writer.py; the benchmark's sweep chose it).
    write_size: int = 32 * 1024
    #: Size of the blocks read from the network: a provider's GET body arrives in blocks of
    #: this size, each checksummed and counted once, then written in ``write_size`` pieces.
    read_size: int = 256 * 1024
    #: Write large files with O_DIRECT (writer.py): for models much larger than free memory.
    direct_io: bool = False
    #: Move plain-http bodies from the socket into the file with splice (splice.py).
    splice: bool = True
    retries: int = 5
    #: A transfer receiving less than ``min_rate`` bytes/s over this many seconds is cut and
    #: retried from its last byte (stall.py); 0 turns the guard off.
    stall_timeout: float = 30.0
    min_rate: int = 1024
    #: Deadline of the whole run in seconds (0: none): then it fails, naming the URI.
    timeout: float = 0.0
    progress_interval: float = 10.0
    log_format: str = "text"
    replace: bool = False
    revalidate: bool = False
    #: Largest model an entry may hold, in bytes (0: no limit).
    max_size: int = 0
    #: Prometheus text file written at the end of every run.
    metrics_file: str = ""
    #: Where the JSON result goes for the pod status (termination.py); "" turns it off.
    termination_log: str = "/dev/termination-log"
    #: git sources: keep a valid ``.git`` (shallow, the pulled commit checked out) in the model.
    git_keep_metadata: bool = False
    #: When set, a pull in cache mode ends with a gc of the cache down to this size.
    cache_max_size: int = 0
    #: Tiered caches: one limit per cache directory (the last one repeats); 0 is no limit.
    cache_max_sizes: tuple[int, ...] = ()
    #: gc policy for that automatic gc: lru or lfu.
    cache_policy: str = "lru"
    #: Archive-bomb limits (archive.py). A model delivered as one archive holds at most this
    #: many members,
    archive_max_members: int = 200_000
    #: expands to at most this many bytes per byte of archive,
    archive_max_ratio: float = 1000.0
    #: though a small archive may always expand this far (configs compress very well),
    archive_ratio_floor: int = 64 << 20
    #: and never beyond this many bytes in all (0: no cap but the ratio and --max-size).
    archive_max_size: int = 0
    #: Signed models (signing.py): ``key:PATH``, ``certificate:PATH[,PATH...]`` or
    #: ``sigstore:IDENTITY,ISSUER``; empty: no signature required.
    require_signature: str = ""
    #: Where the signature is when it is not ``model.sig`` at the model's root.
    signature_uri: str = ""
    #: sigstore: the trust root (trusted_root.json / trust config) for offline clusters.
    signature_trust_root: str = ""
    #: Where each value came from (for `storage-initializer config` and debugging).
    origins: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def heartbeat_interval(self) -> float:
        return max(0.2, min(5.0, self.stale_after / 4))

    @property
    def poll_interval(self) -> float:
        return max(0.05, min(1.0, self.stale_after / 10))


class BadValue(ValueError):
    """A value an option cannot take, said in the user's terms ("is not a size; use e.g.
    32MiB"): :func:`load` prefixes the flag, variable or config key it came from and the value.
    A converter's own exception text (``invalid literal for int()``) never reaches the user."""


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on", "y"):
        return True
    if text in ("0", "false", "no", "off", "n", ""):
        return False
    raise BadValue("is not true or false; use e.g. true")


def _whole(value: Any) -> int:
    """A whole number: ``8``, not ``8.5``, ``eight`` or a YAML ``true``."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise BadValue("is not a whole number; use e.g. 8")
    try:
        return int(value) if isinstance(value, int | float) else int(str(value).strip())
    except (ValueError, TypeError, OverflowError):
        raise BadValue("is not a whole number; use e.g. 8") from None


def _number(value: Any) -> float:
    """A finite number (seconds, ratios): ``30``, ``0.5``; not ``soon``, ``nan`` or ``inf``."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = float(value) if isinstance(value, int | float) else float(str(value).strip())
    except (ValueError, TypeError, OverflowError):
        raise BadValue("is not a number; use e.g. 30") from None
    if not math.isfinite(number):
        raise BadValue("is not a finite number; use e.g. 30")
    return number


def _patterns(value: Any) -> tuple[str, ...]:
    if isinstance(value, list | tuple):
        return tuple(str(v).strip() for v in value if str(v).strip())
    text = str(value).strip()
    if not text:
        return ()
    if text.startswith("["):
        try:
            loaded = json.loads(text)
        except ValueError:
            raise BadValue(
                'is not a JSON list of patterns; use e.g. ["*.bin", "*.json"] or *.bin,*.json'
            ) from None
        if not isinstance(loaded, list):
            raise BadValue('is not a JSON list of patterns; use e.g. ["*.bin", "*.json"]')
        return _patterns(loaded)
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _paths(value: Any) -> tuple[str, ...]:
    if isinstance(value, list | tuple):
        return tuple(str(v) for v in value if str(v))
    return tuple(p for p in str(value).replace(",", os.pathsep).split(os.pathsep) if p)


def _sizes(value: Any) -> tuple[int, ...]:
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    sizes = tuple(_size(v) for v in items if str(v).strip())
    if any(s < 0 for s in sizes):
        raise BadValue("holds a negative size; use sizes ≥ 0, e.g. 500GiB,2TiB")
    return sizes


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in options:
            raise BadValue(f"is not one of {', '.join(options)}")
        return text

    return convert


def _positive(convert: Callable[[Any], Any], allow_zero: bool = True) -> Callable[[Any], Any]:
    # The built-in int() and float() speak Python ("invalid literal for int()"): use ours.
    convert = {int: _whole, float: _number}.get(convert, convert)  # type: ignore[call-overload]

    def checked(value: Any) -> Any:
        number = convert(value)
        if number < 0 or (number == 0 and not allow_zero):
            bound = "≥ 0" if allow_zero else "> 0"
            raise BadValue(f"is {'negative' if number < 0 else 'zero'}; use a value {bound}")
        return number

    return checked


def _finite(value: Any) -> float:
    """A float that can be multiplied by a size: "nan" and "inf" parse, but mean nothing here."""
    return _number(value)


def parse_size(value: Any) -> int:
    """'500GiB', '2G', '1048576' → bytes."""
    return _size(value)


def _size(value: Any) -> int:
    if isinstance(value, bool):
        raise BadValue("is not a size; use e.g. 32MiB")
    text = str(value).strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if text and text[-1] in units:
            return int(_number(text[:-1]) * units[text[-1]])
        return int(text)
    except (ValueError, OverflowError):
        raise BadValue("is not a size; use e.g. 32MiB") from None


def _signature_trust(value: Any) -> str:
    from storage_initializer.signing import validate_setting  # only when signing is set

    return validate_setting(value)


#: name -> (converter, environment variables in priority order)
SPEC: dict[str, tuple[Callable[[Any], Any], tuple[str, ...]]] = {
    "cache_dirs": (_paths, ("STORAGE_INITIALIZER_CACHE_DIR",)),
    "link_mode": (_choice(LINK_MODES), ("STORAGE_INITIALIZER_LINK_MODE",)),
    "read_only": (_bool, ("STORAGE_READONLY", "STORAGE_INITIALIZER_READ_ONLY")),
    "include": (_patterns, ("STORAGE_INITIALIZER_INCLUDE", "STORAGE_ALLOW_PATTERNS")),
    "exclude": (_patterns, ("STORAGE_INITIALIZER_EXCLUDE", "STORAGE_IGNORE_PATTERNS")),
    "stale_after": (_positive(float, allow_zero=False), ("STORAGE_INITIALIZER_STALE_AFTER",)),
    "lock_timeout": (_positive(float), ("STORAGE_INITIALIZER_LOCK_TIMEOUT",)),
    "workers": (_positive(int), ("STORAGE_INITIALIZER_WORKERS",)),
    "chunk_size": (_positive(_size, allow_zero=False), ("STORAGE_INITIALIZER_CHUNK_SIZE",)),
    "write_size": (_positive(_size, allow_zero=False), ("STORAGE_INITIALIZER_WRITE_SIZE",)),
    "read_size": (_positive(_size, allow_zero=False), ("STORAGE_INITIALIZER_READ_SIZE",)),
    "direct_io": (_bool, ("STORAGE_INITIALIZER_DIRECT_IO",)),
    "splice": (_bool, ("STORAGE_INITIALIZER_SPLICE",)),
    "retries": (_positive(int), ("STORAGE_INITIALIZER_RETRIES",)),
    "stall_timeout": (_positive(float), ("STORAGE_INITIALIZER_STALL_TIMEOUT",)),
    "min_rate": (_positive(_size), ("STORAGE_INITIALIZER_MIN_RATE",)),
    "timeout": (_positive(float), ("STORAGE_INITIALIZER_TIMEOUT",)),
    "progress_interval": (
        _positive(float, allow_zero=False),
        ("STORAGE_INITIALIZER_PROGRESS_INTERVAL",),
    ),
    "log_format": (_choice(LOG_FORMATS), ("STORAGE_INITIALIZER_LOG_FORMAT",)),
    "replace": (_bool, ("STORAGE_INITIALIZER_REPLACE",)),
    "revalidate": (_bool, ("STORAGE_INITIALIZER_REVALIDATE",)),
    "max_size": (_positive(_size), ("STORAGE_INITIALIZER_MAX_SIZE",)),
    "metrics_file": (str, ("STORAGE_INITIALIZER_METRICS_FILE",)),
    "termination_log": (str, ("STORAGE_INITIALIZER_TERMINATION_LOG",)),
    "git_keep_metadata": (_bool, ("STORAGE_INITIALIZER_GIT_KEEP_METADATA",)),
    "cache_max_size": (_positive(_size), ()),
    "cache_max_sizes": (_sizes, ("STORAGE_INITIALIZER_CACHE_MAX_SIZE",)),
    "cache_policy": (_choice(("lru", "lfu")), ("STORAGE_INITIALIZER_CACHE_POLICY",)),
    "archive_max_members": (
        _positive(int, allow_zero=False),
        ("STORAGE_INITIALIZER_ARCHIVE_MAX_MEMBERS",),
    ),
    "archive_max_ratio": (
        _positive(_finite, allow_zero=False),
        ("STORAGE_INITIALIZER_ARCHIVE_MAX_RATIO",),
    ),
    "archive_ratio_floor": (_positive(_size), ("STORAGE_INITIALIZER_ARCHIVE_RATIO_FLOOR",)),
    "archive_max_size": (_positive(_size), ("STORAGE_INITIALIZER_ARCHIVE_MAX_SIZE",)),
    "require_signature": (_signature_trust, ("STORAGE_INITIALIZER_REQUIRE_SIGNATURE",)),
    "signature_uri": (str, ("STORAGE_INITIALIZER_SIGNATURE_URI",)),
    "signature_trust_root": (str, ("STORAGE_INITIALIZER_SIGNATURE_TRUST_ROOT",)),
}
#: Config-file aliases for readability ("cache_dir: /cache" as well as "cache_dirs: [...]").
ALIASES = {
    "cache_dir": "cache_dirs",
    "readonly": "read_only",
    "writable": "!read_only",
    "cache_max_size": "cache_max_sizes",
}


def _read_config_file(environ: Mapping[str, str]) -> tuple[dict[str, Any], str]:
    path = environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH
    explicit = CONFIG_ENV in environ and bool(environ[CONFIG_ENV])
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        if explicit:
            raise UsageError(
                f"config file {path} (from {CONFIG_ENV}) does not exist",
                "Mount the ConfigMap there or unset the variable",
            ) from None
        return {}, path
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        if path.endswith(".json"):
            data = json.loads(text) if text.strip() else {}
        else:
            import yaml  # YAML is a superset of JSON: one parser for both

            data = yaml.safe_load(text) or {}
    # The parsers' messages span lines (a caret under the bad column): fold them into one, as
    # KServe shows only the last log line of a failed init container.
    except ValueError as exc:  # yaml.YAMLError derives from Exception; caught below
        detail = " ".join(str(exc).split())
        raise UsageError(f"config file {path} is not valid JSON: {detail}") from exc
    except Exception as exc:
        detail = " ".join(str(exc).split())
        raise UsageError(f"config file {path} is not valid YAML: {detail}") from exc
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping of option: value")
    return data, path


def normalise_keys(data: Mapping[str, Any], path: str) -> dict[str, Any]:
    """Option names as a config file may write them (``stale-after``, ``cache_dir``,
    ``writable``) → the canonical names; unknown names are an error naming ``path``."""
    return _normalise_config(data, path)


def _normalise_config(data: Mapping[str, Any], path: str) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).strip().replace("-", "_").lower()
        key = ALIASES.get(key, key)
        negate = key.startswith("!")
        key = key.lstrip("!")
        if key not in SPEC:
            raise UsageError(
                f"config file {path}: unknown option {raw_key!r}",
                f"Known options: {', '.join(sorted(SPEC))}",
            )
        if negate:
            try:
                value = not _bool(value)
            except BadValue as exc:
                raise UsageError(
                    f"config file {path}, key {raw_key}: {value!r} {exc}",
                    "Fix the value or remove it to use the default",
                ) from None
        result[key] = value
    return result


def _keys_as_written(data: Mapping[str, Any]) -> dict[str, str]:
    """Option name → the key as the config file wrote it (``chunk-size``), for messages."""
    written = {}
    for raw_key in data:
        key = str(raw_key).strip().replace("-", "_").lower()
        written[ALIASES.get(key, key).lstrip("!")] = str(raw_key)
    return written


def load(
    flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Build the settings; ``flags`` holds only the options given on the command line."""
    environ = os.environ if environ is None else environ
    flags = {k: v for k, v in (flags or {}).items() if v is not None and v != ()}
    config, config_path = _read_config_file(environ)
    written = _keys_as_written(config)
    config = _normalise_config(config, config_path)
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for name, (convert, env_names) in SPEC.items():
        candidates: list[tuple[str, Any]] = []
        if name in flags:
            candidates.append(("flag", flags[name]))
        # An empty variable is unset: the downward API gives "" for a missing annotation.
        candidates.extend(
            (f"env {env}", environ[env]) for env in env_names if environ.get(env, "").strip()
        )
        if name in config:
            candidates.append((f"config {config_path}", config[name]))
        if not candidates:
            continue
        origin, raw = candidates[0]
        try:
            values[name] = convert(raw)
        except (ValueError, TypeError, OverflowError) as exc:
            raise _bad_value(name, origin, raw, exc, written) from None
        origins[name] = origin
    if values.get("cache_max_sizes"):
        values["cache_max_size"] = values["cache_max_sizes"][0]
    settings = Settings(**values)
    return replace(settings, origins=origins)


def _bad_value(
    name: str, origin: str, raw: Any, exc: Exception, written: Mapping[str, str]
) -> UsageError:
    """``--chunk-size: 'lots' is not a size; use e.g. 32MiB``: where the value came from, as the
    user wrote it (the flag, the variable, the config file and its key), the value, and what
    would be right; never a converter's Python text."""
    if origin == "flag":
        where = f"--{name.replace('_', '-')}"
    elif origin.startswith("env "):
        where = origin.removeprefix("env ")
    else:
        key = written.get(name, name)
        where = f"{origin.replace('config ', 'config file ', 1)}, key {key}"
    detail = str(exc) if isinstance(exc, BadValue) else "is not a valid value for this option"
    shown = raw if isinstance(raw, str) else json.dumps(raw, default=str)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    hint = "Fix the value or remove it to use the default"
    return UsageError(f"{where}: {shown!r} {detail}", hint)


def names() -> list[str]:
    return [f.name for f in fields(Settings) if f.name != "origins"]
