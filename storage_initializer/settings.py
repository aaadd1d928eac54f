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
    retries: int = 5
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


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on", "y"):
        return True
    if text in ("0", "false", "no", "off", "n", ""):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _patterns(value: Any) -> tuple[str, ...]:
    if isinstance(value, list | tuple):
        return tuple(str(v).strip() for v in value if str(v).strip())
    text = str(value).strip()
    if not text:
        return ()
    if text.startswith("["):
        loaded = json.loads(text)
        if not isinstance(loaded, list):
            raise ValueError("expected a JSON list of patterns")
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
        raise ValueError(f"sizes must be ≥ 0, got {value!r}")
    return sizes


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {value!r}")
        return text

    return convert


def _positive(convert: Callable[[Any], Any], allow_zero: bool = True) -> Callable[[Any], Any]:
    def checked(value: Any) -> Any:
        number = convert(value)
        if number < 0 or (number == 0 and not allow_zero):
            raise ValueError(f"must be {'≥' if allow_zero else '>'} 0, got {value!r}")
        return number

    return checked


def _finite(value: Any) -> float:
    """A float that can be multiplied by a size: "nan" and "inf" parse, but mean nothing here."""
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {value!r}")
    return number


def parse_size(value: Any) -> int:
    """'500GiB', '2G', '1048576' → bytes."""
    return _size(value)


def _size(value: Any) -> int:
    text = str(value).strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if text and text[-1] in units:
        return int(_finite(text[:-1]) * units[text[-1]])
    return int(text)


def _signature_trust(value: Any) -> str:
    from storage_initializer.signing import validate_setting

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
    "retries": (_positive(int), ("STORAGE_INITIALIZER_RETRIES",)),
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
        result[key] = (not _bool(value)) if negate else value
    return result


def load(
    flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Build the settings; ``flags`` holds only the options given on the command line."""
    environ = os.environ if environ is None else environ
    flags = {k: v for k, v in (flags or {}).items() if v is not None and v != ()}
    config, config_path = _read_config_file(environ)
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
        except (ValueError, TypeError) as exc:
            raise UsageError(f"invalid value for {name} ({origin}): {exc}") from None
        origins[name] = origin
    if values.get("cache_max_sizes"):
        values["cache_max_size"] = values["cache_max_sizes"][0]
    settings = Settings(**values)
    return replace(settings, origins=origins)


def names() -> list[str]:
    return [f.name for f in fields(Settings) if f.name != "origins"]
