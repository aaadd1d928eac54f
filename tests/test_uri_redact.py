"""URI parsing, cache keys, path sanitising and redaction, with property-based checks."""

from __future__ import annotations

import posixpath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage_initializer import uri as uri_mod
from storage_initializer.errors import UsageError
from storage_initializer.paths import UnsafePathError, safe_relpath, selected
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
