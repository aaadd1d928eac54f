"""The trust a signed model must verify against (``--require-signature``): its syntax, the
setting's converter, and the warm-start check of a marker's record.

Split from signing.py (which verifies a pull and re-checks with ``verify``). Cheap on purpose:
the fast path of a warm start only compares the marker's record with a digest of the trust
files (:func:`accepts`), so nothing here imports ``model_signing`` or ``cryptography``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from storage_initializer.errors import InitializerError, UsageError

if TYPE_CHECKING:
    from storage_initializer.settings import Settings
    from storage_initializer.store.marker import Marker

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
