"""Signed models (``--require-signature``): who published these bytes, checked before any
replica may serve them.

The format is the OpenSSF ``model-signing`` library's (PyPI ``model-signing`` 1.x, the
``model_signing`` CLI): ``model.sig`` is a Sigstore bundle whose DSSE payload is an in-toto
statement listing every file of the model with its digest (by default SHA-256 per file, paths
relative to the model root, ``model.sig`` and the git files ignored). Checking a pull is two
steps:

1. *Who signed*: the library authenticates the bundle against the trust the operator gave
   (a public key, a CA chain, or a Sigstore identity and issuer) and hands back the signed
   manifest. Nothing here re-implements that cryptography.
2. *What was signed*: the manifest is compared with the files this pull staged. SHA-256 digests
   the engine already computed while the bytes streamed (a source that announces SHA-256, an
   extracted archive) are used as they are; every other file is hashed once from the staging
   area with the library's own hashing configuration (the one the signature declares), in its
   thread pool. The comparison is ours so that the last log line can name the file and the
   reason (the library's own ``verify`` reports a list, and can only hash a directory).

Filters: files the include/exclude patterns leave out are not required (the marker says how
many were left out); a pulled file the manifest does not cover is refused. Our state directory
is never part of the model (it is not in the staged listing, and ``verify`` checks only the
marker's files).

The trust and its warm-start check live in signing_trust.py, the calls into the library in
signing_library.py; neither imports ``model_signing`` (or ``cryptography``) at module level: the
fast path of a warm start only compares the marker's record with a digest of the trust files
(:func:`accepts`).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from storage_initializer.signing_library import _digests, _signed_manifest, _signer
from storage_initializer.signing_trust import (  # noqa: F401  (imported from here elsewhere)
    GIT_PATHS,
    MAX_SIGNATURE_BYTES,
    SIGNATURE_NAME,
    SignatureError,
    Trust,
    accepts,
    always_selected,
    parse_trust,
    trust_of,
    validate_setting,
)

if TYPE_CHECKING:
    from storage_initializer.settings import Settings
    from storage_initializer.store.marker import Marker, MarkerFile

log = logging.getLogger(__name__)


def check_staged(
    source: str, root: Path, files: list[MarkerFile], settings: Settings
) -> dict[str, Any] | None:
    """The pull's hook, called before the marker is written: verify the staged model under
    ``root`` and return the marker's record, or raise :class:`SignatureError`. ``None`` when no
    signature is required."""
    trust = trust_of(settings)
    if trust is None:
        return None
    started = time.monotonic()
    if settings.signature_uri:
        bundle = _fetch_signature(settings.signature_uri, settings)
        where = _redact(settings.signature_uri)
    else:
        if SIGNATURE_NAME not in {f.path for f in files}:
            raise SignatureError(
                f"{SIGNATURE_NAME}: missing: {source} is not signed (no {SIGNATURE_NAME} at "
                "the model's root)"
            )
        bundle = _read_bounded(root / SIGNATURE_NAME)
        where = SIGNATURE_NAME
    record = verify_tree(
        trust, bundle, root, files, settings.include, settings.exclude, where, streamed=True
    )
    if settings.signature_uri:
        # `verify` re-checks offline: keep the bundle itself (it authenticates itself).
        record["bundle"] = base64.b64encode(bundle).decode("ascii")
    log.info(
        "signature verified: %s signed by %s (%d files, %.1fs)",
        source,
        record["signer"],
        record["files_verified"],
        time.monotonic() - started,
    )
    return record


def recheck(root: Path, marker: Marker, trust_spec: str = "", trust_root: str = "") -> list[str]:
    """``verify``: the signature recorded in ``marker`` against the files on disk now (hashed
    again). The trust is the one given now, else the one the marker recorded. Problems as
    lines; empty when it holds."""
    record = getattr(marker, "signature", None)
    if not isinstance(record, Mapping):
        return [f"{root}: not verified against a signature"] if trust_spec else []
    try:
        trust = parse_trust(
            trust_spec or str(record.get("trust", "")),
            trust_root or str(record.get("trust_root", "")),
        )
    except ValueError as exc:
        return [f"signature: {exc}"]
    try:
        embedded = record.get("bundle")
        if embedded:
            bundle = base64.b64decode(str(embedded), validate=True)
        else:
            bundle = _read_bounded(root / SIGNATURE_NAME)
        recorded = record.get("signature_sha256")
        if recorded and "sha256:" + hashlib.sha256(bundle).hexdigest() != recorded:
            return [f"{SIGNATURE_NAME}: not the signature verified at download ({recorded})"]
        verify_tree(
            trust,
            bundle,
            root,
            list(marker.files),
            tuple(marker.include),
            tuple(marker.exclude),
            str(record.get("signature", SIGNATURE_NAME)),
            streamed=False,
        )
    except SignatureError as exc:
        return [str(exc)]
    except (OSError, ValueError) as exc:
        return [f"signature: {exc}"]
    return []


def verify_tree(
    trust: Trust,
    bundle: bytes,
    root: Path,
    files: list[MarkerFile],
    include: Iterable[str],
    exclude: Iterable[str],
    where: str,
    streamed: bool,
) -> dict[str, Any]:
    """Authenticate ``bundle`` under ``trust`` and compare its manifest with ``files`` (paths
    under ``root``). ``streamed``: reuse the SHA-256 digests the download computed."""
    from storage_initializer.paths import selected

    expected, serialization = _signed_manifest(trust, bundle, where)
    ignored = [*serialization.get("ignore_paths", []), *GIT_PATHS]
    if where == SIGNATURE_NAME:
        ignored.append(SIGNATURE_NAME)  # a signature never covers itself
    shards = serialization.get("method") == "shards"
    signed_files = {_file_of(name, shards) for name in expected}
    present = {f.path: f for f in files if not _ignored(f.path, ignored)}
    problems: list[str] = []
    for path in sorted(set(present) - signed_files):
        problems.append(f"{path}: not covered by the signature (a file nobody signed)")
    filtered = 0
    for path in sorted(signed_files - set(present)):
        if not selected(path, tuple(include), tuple(exclude)):
            filtered += 1  # left out by --include/--exclude: not needed
        else:
            problems.append(f"{path}: signed but missing from the model")
    if not problems:
        actual = _digests(root, sorted(present), serialization, present if streamed else None)
        for name in sorted(expected):
            if _file_of(name, shards) not in present:
                continue
            got = actual.get(name)
            if got is None:
                problems.append(f"{name}: differs from the signed manifest (not hashed)")
            elif got != expected[name]:
                problems.append(
                    f"{_file_of(name, shards)}: differs from the signed manifest "
                    f"({serialization.get('hash_type', 'sha256')} {got[:16]}…, "
                    f"signed {expected[name][:16]}…)"
                )
        for name in sorted(set(actual) - set(expected)):  # shards: a file grew
            problems.append(f"{_file_of(name, shards)}: differs from the signed manifest (size)")
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        for line in problems[1:20]:
            log.error("signature check: %s", line)
        raise SignatureError(f"signature check failed: {problems[0]}{more}")
    return {
        "verified": True,
        "kind": trust.kind,
        "trust": trust.spec,
        "trust_root": trust.paths[0] if trust.kind == "sigstore" and trust.paths else "",
        "trust_digest": trust.digest(),
        "signer": _signer(trust, bundle),
        "signature": where,
        "signature_sha256": "sha256:" + hashlib.sha256(bundle).hexdigest(),
        "serialization": f"{serialization.get('method')}/{serialization.get('hash_type')}",
        "files_signed": len(signed_files),
        "files_verified": len(present),
        "files_filtered_out": filtered,
        "verified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _file_of(name: str, shards: bool) -> str:
    """A manifest identifier's file: ``path`` or, for shards, ``path:start:end``."""
    return name.rsplit(":", 2)[0] if shards else name


def _ignored(path: str, ignored: Iterable[str]) -> bool:
    """The library's rule: a path equal to, or under, an ignored path (relative to the root)."""
    pure = PurePosixPath(path)
    return any(pure.is_relative_to(PurePosixPath(str(p))) for p in ignored if str(p))


def _read_bounded(path: Path) -> bytes:
    """The signature file, never through a symlink, never unbounded."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise SignatureError(f"{SIGNATURE_NAME}: missing: the model is not signed") from None
    except OSError as exc:
        raise SignatureError(f"{SIGNATURE_NAME}: cannot be read: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(MAX_SIGNATURE_BYTES + 1)
    if len(data) > MAX_SIGNATURE_BYTES:
        raise SignatureError(f"{SIGNATURE_NAME}: larger than {MAX_SIGNATURE_BYTES} bytes")
    return data


def _fetch_signature(text: str, settings: Settings) -> bytes:
    """The signature kept apart from the model (``--signature-uri``): any URI we can pull,
    naming one file."""
    from storage_initializer import stall
    from storage_initializer.providers import open_source
    from storage_initializer.uri import parse

    uri = parse(text)
    source = open_source(uri, settings)

    def fetch() -> bytes:
        files = source.list().files
        if len(files) != 1:
            raise SignatureError(
                f"the signature URI {uri.redacted} names {len(files)} files, not one",
                "Point --signature-uri at the model.sig file itself",
            )
        chunks, size = [], 0
        for block in source.read(files[0], 0, None):
            size += len(block)
            if size > MAX_SIGNATURE_BYTES:
                raise SignatureError(f"{uri.redacted}: larger than {MAX_SIGNATURE_BYTES} bytes")
            chunks.append(block)
        return b"".join(chunks)

    try:
        # Outside the engine: its own stall guard, as a listing has.
        what = f"the signature URI {uri.redacted}"
        return stall.listing(settings.stall_timeout, settings.min_rate, what, fetch)
    finally:
        source.close()


def _redact(text: str) -> str:
    from storage_initializer.redact import redact_url

    return redact_url(text)
