"""The calls into the OpenSSF ``model-signing`` library (and ``cryptography``): authenticate
a bundle and read its signed manifest, hash files as its serialization says, name the signer.

Split from signing.py so that the one place touching the library (and its one internal, see
:func:`_signed_manifest`) is small and alone. The library is imported inside each function,
never at module level: a warm start imports none of it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from storage_initializer.errors import UsageError
from storage_initializer.signing_trust import SIGNATURE_NAME, SignatureError, Trust

if TYPE_CHECKING:
    from storage_initializer.store.marker import MarkerFile

log = logging.getLogger("storage_initializer.signing")  # the signature check's log, as before


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
        bundle_path = Path(scratch) / SIGNATURE_NAME
        bundle_path.write_bytes(bundle)
        try:
            sigstore = trust.kind == "sigstore"
            reader = sign_sigstore.Signature if sigstore else sign_sigstore_pb.Signature
            signature = reader.read(bundle_path)
            verifier = config._verifier  # set by the use_*_verifier call above
            if verifier is None:  # as the library's own Config.verify checks
                raise ValueError("no verifier configured")
            manifest = verifier.verify(signature)  # authenticates; see the docstring
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


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]
