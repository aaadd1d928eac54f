"""URI parsing, cache keys, path sanitising and redaction, with property-based checks."""

from __future__ import annotations

import importlib
import os
import posixpath
import string
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage_initializer import schemes
from storage_initializer import uri as uri_mod
from storage_initializer.errors import UsageError
from storage_initializer.paths import UnsafePathError, safe_relpath, selected
from storage_initializer.providers.base import Source
from storage_initializer.redact import MASK, redact, redact_url, register_secret


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("s3://bucket/model", "s3"),
        ("gs://bucket/model", "gs"),
        ("hf://owner/model:main", "hf"),
        ("https://acct.blob.core.windows.net/c/p", "azure-blob"),
        ("https://acct.z12.blob.storage.azure.net/c/p", "azure-blob"),
        ("https://acct.file.core.windows.net/share/p", "azure-file"),
        ("https://example.com/model.tar.gz", "http"),
        ("https://github.com/org/repo.git", "git"),
        ("https://github.com/org/repo.git@feature/x", "git"),
        ("file:///models/x", "local"),
        ("/models/x", "local"),
        ("/mnt/pvc/claim/model", "pvc"),
        ("/mnt/models", "model-mount"),
        ("hdfs://nn/path", "hdfs"),
        ("oci://registry/repo:tag", "oci"),
    ],
)
def test_kinds(text: str, kind: str) -> None:
    assert uri_mod.parse(text).kind == kind


@pytest.mark.parametrize("text", ["ftp://x/y", "model", "", "s3://", "s3:///key"])
def test_rejected_uris(text: str) -> None:
    with pytest.raises(UsageError):
        uri_mod.parse(text)


def test_every_row_of_the_scheme_table_names_a_provider_that_exists() -> None:
    """A row whose module or class is misspelt would only fail on a download of that kind."""
    for backend in schemes.BACKENDS:
        if backend.module is None:
            continue
        module = importlib.import_module(f"storage_initializer.providers.{backend.module}")
        assert issubclass(getattr(module, backend.source_class), Source), backend.kind
    assert len(schemes.BY_KIND) == len(schemes.BACKENDS)


def test_an_unknown_scheme_is_told_every_scheme_of_the_table() -> None:
    with pytest.raises(UsageError) as caught:
        uri_mod.parse("ftp://host/model")
    hint = caught.value.describe()
    for backend in schemes.BACKENDS:
        for scheme in backend.schemes:
            if scheme not in ("http", "https", "git", "ssh"):
                assert f"{scheme}://" in hint, scheme
    assert "http(s)://" in hint and "….git" in hint and "Azure Blob" in hint


def test_sas_is_not_part_of_identity_and_is_masked() -> None:
    a = uri_mod.parse("https://acct.blob.core.windows.net/c/m?sv=2024&sig=SECRETSIG1")
    b = uri_mod.parse("https://acct.blob.core.windows.net/c/m?sv=2024&sig=OTHERSIG22")
    assert a.key() == b.key()
    assert "SECRETSIG1" not in a.redacted and "SECRETSIG1" not in a.canonical


def test_password_in_url_is_masked() -> None:
    parsed = uri_mod.parse("https://user:hunter2pass@example.com/m.bin")
    assert "hunter2pass" not in parsed.redacted
    assert parsed.redacted.startswith(f"https://user:{MASK}@")


def test_filters_change_the_key() -> None:
    parsed = uri_mod.parse("s3://b/m")
    assert parsed.key() != parsed.key(include=("*.json",))
    assert len(parsed.key()) == 16


def test_registered_and_env_secrets_are_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG")
    monkeypatch.setenv("example.com-headers", '{"Authorization": "Bearer tok-abcdef123456"}')
    register_secret("registered-secret-value")
    text = redact(
        "key wJalrXUtnFEMI/K7MDENG header Bearer tok-abcdef123456 and registered-secret-value"
    )
    assert "wJalrXUtnFEMI" not in text
    assert "tok-abcdef123456" not in text
    assert "registered-secret-value" not in text


secret_text = st.text(
    alphabet=st.characters(whitelist_categories=("Lu", "Ll", "Nd"), max_codepoint=127),
    min_size=6,
    max_size=30,
)


@given(password=secret_text, query=secret_text)
def test_redact_url_never_leaks(password: str, query: str) -> None:
    url = f"https://user:{password}@host.example/path/file.bin?sig={query}"
    shown = redact_url(url)
    assert password not in shown.replace("user", "").replace("host.example", "")
    assert f"sig={query}" not in shown


@given(st.text(max_size=60))
def test_safe_relpath_never_escapes(name: str) -> None:
    try:
        clean = safe_relpath(name)
    except UnsafePathError:
        return
    assert not clean.startswith("/")
    assert ".." not in clean.split("/")
    assert "\\" not in clean and "\0" not in clean
    assert posixpath.normpath(clean) == clean


#: Segments a hostile listing would combine: climbing, empty and dot parts, a backslash, NUL,
#: an absolute piece, and harmless names with a space or non-ASCII letters.
SEGMENTS = ["..", ".", "", "a", "b c", "\\", "\x00", "/x", "ü"]
_ROOT = Path(tempfile.mkdtemp(prefix="si-relpath-root-")).resolve()


@given(st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=8))
def test_safe_relpath_of_hostile_segments_stays_inside(segments: list[str]) -> None:
    name = "/".join(segments)
    try:
        clean = safe_relpath(name)
    except UnsafePathError:
        return
    parts = clean.split("/")
    assert ".." not in parts and "" not in parts and "." not in parts
    assert "\0" not in clean and "\\" not in clean
    assert not clean.startswith("/") and not name.startswith("/")
    # Resolved below a real root, the path stays below it (lexically: nothing there is a link).
    target = (_ROOT / clean).resolve()
    assert target != _ROOT and target.is_relative_to(_ROOT), (name, clean)
    assert os.path.commonpath([target, _ROOT]) == str(_ROOT)
    # Nothing but the empty and "." parts was dropped: the name is not silently rewritten.
    assert parts == [p for p in name.split("/") if p not in ("", ".")]


# -- parse() over generated URIs of every scheme -----------------------------------------------

#: Planted secrets start with "ZZ"; nothing else in a generated URI has an upper-case letter.
planted = st.text(alphabet=string.ascii_letters + string.digits, min_size=6, max_size=24).map(
    lambda s: "ZZ" + s
)
word = st.text(alphabet=string.ascii_lowercase + string.digits + "-_", min_size=1, max_size=10)
path = st.lists(word, min_size=0, max_size=4).map("/".join)

#: One template per kind of source; {auth} (userinfo), {host} and {path} are filled in.
TEMPLATES = {
    "s3": "s3://{auth}{host}/{path}",
    "gs": "gs://{auth}{host}/{path}",
    "hf": "hf://{auth}{host}/{path}",
    "hdfs": "hdfs://{auth}{host}/{path}",
    "webhdfs": "webhdfs://{auth}{host}/{path}",
    "oci": "oci://{auth}{host}/{path}",
    "modelscope": "modelscope://{auth}{host}/{path}",
    "http": "http://{auth}{host}/{path}",
    "https": "https://{auth}{host}/{path}",
    "azure-blob": "https://{auth}{host}.blob.core.windows.net/{path}",
    "azure-file": "https://{auth}{host}.file.core.windows.net/{path}",
    "git": "https://{auth}{host}/org/{path}.git",
    "ssh-git": "ssh://{auth}{host}/{path}.git",
    "file": "file://{auth}{host}/{path}",
    "ftp": "ftp://{auth}{host}/{path}",
    "local": "/{path}",
    "pvc": "/mnt/pvc/{path}",
    "model-mount": "/mnt/models/{path}",
    "bare": "{auth}{host}/{path}",
}


@st.composite
def uris(draw: st.DrawFn) -> tuple[str, str, str, str]:
    """(uri, the same uri without credentials, the planted secret or "", where it went)."""
    template = TEMPLATES[draw(st.sampled_from(sorted(TEMPLATES)))]
    host, rest = draw(word), draw(path)
    where = draw(st.sampled_from(["none", "password", "user", "query"]))
    if template.startswith("/"):
        where = "none"  # a path: no authority to hide a credential in, "?" is a file name's
    secret = draw(planted)
    auth = {"password": f"user:{secret}@", "user": f"{secret}@"}.get(where, "")
    bare = template.format(auth="", host=host, path=rest)
    uri = template.format(auth=auth, host=host, path=rest)
    if where == "query":
        uri += f"?sv=2024-01-01&se=2030&sig={secret}"
    return uri, bare, (secret if where != "none" else ""), where


@given(uris())
def test_parse_is_stable_and_never_keeps_a_secret(case: tuple[str, str, str, str]) -> None:
    uri, bare, secret, where = case
    try:
        parsed = uri_mod.parse(uri)
    except UsageError as exc:
        if secret:
            assert secret not in str(exc), exc
        return
    again = uri_mod.parse(uri)
    assert parsed.key() == again.key() and parsed == again
    assert len(parsed.key()) == 16
    if not secret:
        return
    assert secret not in parsed.redacted, parsed
    if where == "query" and parsed.kind not in ("azure-blob", "azure-file"):
        # A query is part of the identity of other sources (?file=a vs ?file=b are different
        # models): it stays in the canonical form, which is only ever hashed, never shown.
        return
    if parsed.kind == "local":
        # For the local provider a file:// authority is part of the path (its identity), and
        # the canonical form is only ever hashed; the redacted form (checked above) masks it.
        return
    assert secret not in parsed.canonical, parsed
    # Credentials are not identity: a rotated password or SAS keeps the cache entry.
    assert parsed.key() == uri_mod.parse(bare).key(), (uri, bare)


@pytest.mark.parametrize(
    "name",
    [
        "../../etc/x",
        "/abs",
        "a/../../b",
        "a/..",
        "..",
        "a\\b",
        "a\0b",
        "",
        ".storage-initializer/x",
    ],
)
def test_hostile_names_rejected(name: str) -> None:
    with pytest.raises(UnsafePathError):
        safe_relpath(name)


def test_harmless_names_cleaned() -> None:
    assert safe_relpath("./a//b/./c.bin") == "a/b/c.bin"
    assert safe_relpath("ünï cödé/x y.json") == "ünï cödé/x y.json"


def test_filters_match_relative_path_and_basename() -> None:
    assert selected("shards/a.bin", ("*.bin",), ())
    assert not selected("shards/a.bin", (), ("*.bin",))
    assert selected("config.json", ("*.json",), ("shards/*",))
    assert not selected("shards/x.json", ("*.json",), ("shards/*",))
