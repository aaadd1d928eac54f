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

Nothing here imports ``model_signing`` (or ``cryptography``) at module level: the fast path of
a warm start only compares the marker's record with a digest of the trust files
(:func:`accepts`).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from storage_initializer.errors import InitializerError, UsageError

if TYPE_CHECKING:
    from storage_initializer.settings import Settings
    from storage_initializer.store.marker import Marker, MarkerFile

log = logging.getLogger(__name__)

#: Where the ``model_signing`` CLI writes the signature by default, at the model's root.
SIGNATURE_NAME = "model.sig"
#: A bundle is a few hundred bytes per file of the model: far below this.
MAX_SIGNATURE_BYTES = 64 << 20
#: Paths the library always ignores when it hashes a model (``ignore_git_paths=True``).
GIT_PATHS = (".git", ".gitattributes", ".github", ".gitignore")
KINDS = ("key", "certificate", "sigstore")


class SignatureError(InitializerError):
    """The model is unsigned, signed by someone else, or differs from what was signed."""

    hint = (
        "Nothing was published. Sign the model as it is at the source (model_signing sign ...), "
        "or check --require-signature (STORAGE_INITIALIZER_REQUIRE_SIGNATURE)"
    )


@dataclass(frozen=True)
class Trust:
    """What a signature must verify against, as ``--require-signature`` gave it."""

    kind: str
    #: key: the PEM public key; certificate: CA / chain files; sigstore: the trust root, if any.
    paths: tuple[str, ...]
    identity: str = ""
    issuer: str = ""

    @property
    def spec(self) -> str:
        if self.kind == "sigstore":
            return f"sigstore:{self.identity},{self.issuer}"
        return f"{self.kind}:{','.join(self.paths)}"

    def digest(self) -> str:
        """A digest of the trust itself (kind, identity, and the bytes of every trust file): a
        marker verified under another key or CA does not satisfy this one. Cheap (hashlib over
        small files), so the warm-start fast path can afford it."""
        hasher = hashlib.sha256(f"{self.kind}\0{self.identity}\0{self.issuer}\0".encode())
        for path in self.paths:
            with open(path, "rb") as handle:
                hasher.update(handle.read(MAX_SIGNATURE_BYTES))
            hasher.update(b"\0")
        return "sha256:" + hasher.hexdigest()


def parse_trust(text: str, trust_root: str = "") -> Trust:
    """``key:PATH``, ``certificate:PATH[,PATH...]`` or ``sigstore:IDENTITY,ISSUER``."""
    kind, sep, rest = str(text).strip().partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in KINDS or not rest.strip():
        raise ValueError(
            "expected key:PATH, certificate:PATH[,PATH...] or sigstore:IDENTITY,ISSUER, "
            f"got {text!r}"
        )
    parts = [p.strip() for p in rest.split(",") if p.strip()]
    if kind == "key":
        if len(parts) != 1:
            raise ValueError(f"key: takes one PEM public key file, got {rest!r}")
        return Trust("key", (parts[0],))
    if kind == "certificate":
        return Trust("certificate", tuple(parts))
    # An identity is an email or a URI (https://github.com/org/repo/.github/...): it holds
    # no comma, and the issuer is an https URL, so the last comma separates them.
    identity, comma, issuer = rest.strip().rpartition(",")
    if not comma or not identity.strip() or not issuer.strip():
        raise ValueError(f"sigstore: takes IDENTITY,ISSUER, got {rest!r}")
    paths = (trust_root,) if trust_root else ()
    return Trust("sigstore", paths, identity.strip(), issuer.strip())


def validate_setting(value: Any) -> str:
    """Settings converter: the syntax is checked when the settings load (one line naming the
    option); the files are read when a pull needs them."""
    from storage_initializer.settings import BadValue

    text = str(value).strip()
    if text:
        try:
            parse_trust(text)
        except ValueError:
            raise BadValue(
                "is not a trust; use key:PATH, certificate:PATH[,PATH...] "
                "or sigstore:IDENTITY,ISSUER"
            ) from None
    return text


def trust_of(settings: Settings) -> Trust | None:
    if not settings.require_signature:
        return None
    try:
        return parse_trust(settings.require_signature, settings.signature_trust_root)
    except ValueError as exc:
        raise UsageError(f"invalid value for require_signature: {exc}") from None


def accepts(marker: Marker | None, settings: Settings) -> bool:
    """Whether ``marker`` may be served to a pull under ``settings``: always without
    ``--require-signature``; with it, only when the model was verified under this very trust
    (same kind and identity, same key / CA bytes). Anything else sends the pull to the holder,
    which fetches and verifies again: an entry pulled unsigned is never served as signed."""
    trust = trust_of(settings)
    if trust is None:
        return True
    record = getattr(marker, "signature", None)
    if not isinstance(record, Mapping) or record.get("verified") is not True:
        return False
    try:
        return record.get("trust_digest") == trust.digest()
    except OSError:
        return False  # the holder reports the unreadable trust file


def always_selected(path: str, settings: Settings) -> bool:
    """The signature at the model's root is downloaded whatever the filters say: without it
    nothing can be verified."""
    return (
        bool(settings.require_signature) and not settings.signature_uri and (path == SIGNATURE_NAME)
    )


# -- verification ---------------------------------------------------------------------------


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


def _signed_manifest(trust: Trust, bundle: bytes, where: str) -> tuple[dict[str, str], dict]:
    """Authenticate the bundle with the library; its manifest as identifier -> hex digest,
    and its serialization parameters.

    The public ``model_signing.verifying.Config.verify`` authenticates *and* hashes a directory
    in one call; the step that only authenticates and returns the signed manifest is the
    verifier the Config builds (``model_signing._signing``). That is the one internal this module
    touches, pinned by ``model-signing>=1.1,<2``."""
    try:
        from model_signing import verifying
        from model_signing._signing import sign_sigstore, sign_sigstore_pb
    except ImportError as exc:
        raise UsageError(
            "--require-signature needs the model-signing library",
            "pip install 'storage-initializer[signing]'",
        ) from exc
    config = verifying.Config()
    try:
        for path in trust.paths:
            if not os.path.isfile(path):
                raise SignatureError(
                    f"the trust file {path} ({trust.kind}) does not exist",
                    "Mount the public key / CA certificates and point --require-signature at them",
                )
        if trust.kind == "key":
            config.use_elliptic_key_verifier(public_key=trust.paths[0])
        elif trust.kind == "certificate":
            config.use_certificate_verifier(certificate_chain=list(trust.paths))
        else:
            if not trust.paths:
                raise SignatureError(
                    "sigstore: verification needs Sigstore's trust root, which this pull would "
                    "fetch from the internet (TUF)",
                    "Give the trust root file with --signature-trust-root "
                    "(STORAGE_INITIALIZER_SIGNATURE_TRUST_ROOT) in offline clusters",
                )
            config.use_sigstore_verifier(
                identity=trust.identity,
                oidc_issuer=trust.issuer,
                trust_config=Path(trust.paths[0]),
            )
    except SignatureError:
        raise
    except Exception as exc:  # the library raises ValueError, OSError, crypto errors...
        root = f" (trust root {trust.paths[0]})" if trust.kind == "sigstore" else ""
        raise SignatureError(
            f"cannot load the {trust.kind} trust {trust.spec}{root}: {_one_line(exc)}"
        ) from None
    with tempfile.TemporaryDirectory(prefix="si-signature-") as scratch:
        path = Path(scratch) / SIGNATURE_NAME
        path.write_bytes(bundle)
        try:
            sigstore = trust.kind == "sigstore"
            reader = sign_sigstore.Signature if sigstore else sign_sigstore_pb.Signature
            signature = reader.read(path)
            manifest = config._verifier.verify(signature)  # authenticates; see the docstring
        except Exception as exc:
            raise SignatureError(
                f"{where}: the signature does not verify against {trust.spec}: {_one_line(exc)}"
            ) from None
    expected = {rd.identifier: rd.digest.digest_hex for rd in manifest.resource_descriptors()}
    return expected, dict(manifest.serialization_type)


def _digests(
    root: Path,
    paths: list[str],
    serialization: Mapping[str, Any],
    streamed: Mapping[str, MarkerFile] | None,
) -> dict[str, str]:
    """identifier -> hex digest of the files ``paths`` under ``root``, as the signature's
    serialization defines it. Streamed SHA-256 digests are reused; the rest are hashed with
    the library."""
    from model_signing import hashing

    method = serialization.get("method")
    algorithm = serialization.get("hash_type", "sha256")
    found: dict[str, str] = {}
    todo = []
    for path in paths:
        known = None
        if streamed is not None and method == "files" and algorithm == "sha256":
            known = streamed[path].checksums.get("sha256")
        if known:
            found[path] = known.lower()
        else:
            todo.append(path)
    if not todo:
        return found
    if streamed is not None:  # the download computed no SHA-256 for these: read them back
        log.info("signature check: hashing %d file(s) again from staging", len(todo))
    config = hashing.Config().set_ignored_paths(paths=[], ignore_git_paths=False)
    if method == "shards":
        config.use_shard_serialization(
            hashing_algorithm=algorithm, shard_size=int(serialization["shard_size"])
        )
    elif method == "files":
        config.use_file_serialization(hashing_algorithm=algorithm)
    else:
        raise SignatureError(f"the signature uses an unknown serialization {method!r}")
    for path in todo:
        full = root / path
        if full.is_symlink() or not full.is_file():
            raise SignatureError(f"{path}: not a regular file")
    try:
        manifest = config.hash(root, files_to_hash=[root / p for p in todo])
    except (OSError, ValueError) as exc:
        raise SignatureError(f"cannot hash the model for the signature check: {exc}") from exc
    found.update({rd.identifier: rd.digest.digest_hex for rd in manifest.resource_descriptors()})
    return found


def _signer(trust: Trust, bundle: bytes) -> str:
    """Who signed, for the marker and ``status``: the key's fingerprint (the SHA-256 of its
    PEM, as the bundle's key hint), the signing certificate's subject and fingerprint, or the
    Sigstore identity."""
    if trust.kind == "sigstore":
        return f"{trust.identity} ({trust.issuer})"
    with contextlib.suppress(Exception):
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        if trust.kind == "key":
            with open(trust.paths[0], "rb") as handle:
                key = serialization.load_pem_public_key(handle.read())
            pem = key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            return f"key sha256:{hashlib.sha256(pem).hexdigest()}"
        material = json.loads(bundle)["verificationMaterial"]

        chain = material["x509CertificateChain"]["certificates"]
        cert = x509.load_der_x509_certificate(base64.b64decode(chain[0]["rawBytes"]))
        fingerprint = cert.fingerprint(_sha256()).hex()
        return f"certificate {cert.subject.rfc4514_string()} sha256:{fingerprint}"
    return trust.kind


def _sha256() -> Any:
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA256()


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
    from storage_initializer.providers import open_source
    from storage_initializer.uri import parse

    uri = parse(text)
    source = open_source(uri, settings)
    try:
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
    finally:
        source.close()


def _redact(text: str) -> str:
    from storage_initializer.redact import redact_url

    return redact_url(text)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]
