"""Signed models (issue 19): ``--require-signature`` against real local servers.

Models are signed as users sign them, with the OpenSSF ``model_signing`` library (its CLI in
one test, its Python API elsewhere, with the CLI's ignore rules), by a local EC key and by a
local CA chain (root → intermediate → leaf, made here with ``cryptography``). Sigstore keyless
signing needs Fulcio and Rekor, which cannot be reached offline: that mode is tested as far as
it goes without them (argument parsing, the missing trust root).
"""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from tests.helpers import clean_env, sha256
from tests.servers.hub import HubFile, HubServer, start_hub
from tests.servers.s3 import S3Server, s3_server

pytest.importorskip("model_signing")

__all__ = ["s3_server"]  # the fixture, imported so that pytest finds it

MiB = 1 << 20
STATE = ".storage-initializer"


# -- keys and certificates ---------------------------------------------------------------------


class Keys:
    """An EC signing key, a CA chain with a code-signing leaf, and an unrelated key and CA."""

    def __init__(self, root: Path) -> None:
        from cryptography.hazmat.primitives.asymmetric import ec

        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.private = self._key("signer.key", ec.generate_private_key(ec.SECP256R1()))
        self.public = self._public("signer.pub", self.private)
        self.other_public = self._public(
            "other.pub", self._key("other.key", ec.generate_private_key(ec.SECP256R1()))
        )
        ca_key = ec.generate_private_key(ec.SECP384R1())
        ca = self._cert("root-ca.pem", "Test Root CA", ca_key, ca_key, None, ca=True)
        mid_key = ec.generate_private_key(ec.SECP256R1())
        mid = self._cert("intermediate.pem", "Test Intermediate", mid_key, ca_key, ca, ca=True)
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        self.leaf_key = self._key("leaf.key", leaf_key)
        self._cert("leaf.pem", "model-publisher", leaf_key, mid_key, mid, ca=False)
        self.leaf = root / "leaf.pem"
        self.intermediate = root / "intermediate.pem"
        self.ca = root / "root-ca.pem"
        other_ca_key = ec.generate_private_key(ec.SECP256R1())
        self._cert("other-ca.pem", "Other CA", other_ca_key, other_ca_key, None, ca=True)
        self.other_ca = root / "other-ca.pem"

    def _key(self, name: str, key: object) -> Path:
        from cryptography.hazmat.primitives import serialization

        path = self.root / name
        path.write_bytes(
            key.private_bytes(  # type: ignore[attr-defined]
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return path

    def _public(self, name: str, private: Path) -> Path:
        from cryptography.hazmat.primitives import serialization

        key = serialization.load_pem_private_key(private.read_bytes(), None)
        path = self.root / name
        path.write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        return path

    def _cert(
        self, name: str, common: str, key: object, issuer_key: object, issuer: object, ca: bool
    ) -> object:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        now = datetime.datetime.now(datetime.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer.subject if issuer is not None else subject)  # type: ignore[attr-defined]
            .public_key(key.public_key())  # type: ignore[attr-defined]
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=not ca,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=ca,
                    crl_sign=ca,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
        )
        if not ca:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False
            )
        cert = builder.sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]
        (self.root / name).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert

    def fingerprint(self) -> str:
        """The key's fingerprint as the marker (and the bundle's key hint) give it."""
        return sha256(self.public.read_bytes())


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("keys"))


def sign(files: Mapping[str, bytes], keys: Keys, workdir: Path, mode: str = "key") -> bytes:
    """model.sig over ``files``, as ``model_signing sign key|certificate`` writes it (the CLI
    ignores the signature itself and the git files)."""
    from model_signing import hashing, signing

    model = workdir / f"to-sign-{mode}"
    shutil.rmtree(model, ignore_errors=True)
    for name, data in files.items():
        (model / name).parent.mkdir(parents=True, exist_ok=True)
        (model / name).write_bytes(data)
    config = signing.Config().set_hashing_config(
        hashing.Config().set_ignored_paths(paths=["model.sig"], ignore_git_paths=True)
    )
    if mode == "key":
        config.use_elliptic_key_signer(private_key=keys.private)
    else:
        config.use_certificate_signer(
            private_key=keys.leaf_key,
            signing_certificate=keys.leaf,
            certificate_chain=[keys.intermediate],
        )
    config.sign(model, model / "model.sig")
    return (model / "model.sig").read_bytes()


def model_files(seed: int = 0) -> dict[str, bytes]:
    return {
        "config.json": b'{"model_type": "test", "seed": %d}' % seed,
        "weights/model-00001.safetensors": bytes(range(256)) * (3 * MiB // 256 + seed + 1),
        "weights/model-00002.safetensors": b"\x07" * (MiB + 17),
        "tokenizer.json": b'{"vocab": []}',
    }


def flipped(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


# -- running the CLI ---------------------------------------------------------------------------


def cli(*args: str | Path, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "storage_initializer", *map(str, args)],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=180,
    )


def last_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def marker(entry: Path) -> dict:
    return json.loads((entry / STATE / "marker.json").read_text())


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and STATE not in p.relative_to(root).parts
    }


@pytest.fixture
def s3(s3_server: S3Server) -> Iterator[tuple[S3Server, dict[str, str]]]:
    yield s3_server, clean_env(s3_server.env(), STORAGE_INITIALIZER_RETRIES="0")


# -- S3 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["key", "certificate"])
def test_s3_signed_model_pulls_and_status_verify_show_the_signature(
    s3: tuple[S3Server, dict[str, str]], keys: Keys, tmp_path: Path, mode: str
) -> None:
    server, env = s3
    files = model_files()
    bucket = server.new_bucket({**files, "model.sig": sign(files, keys, tmp_path, mode)})
    trust = f"key:{keys.public}" if mode == "key" else f"certificate:{keys.ca}"
    dest = tmp_path / "dest"

    done = cli("pull", f"s3://{bucket}", dest, "--require-signature", trust, env=env)

    assert done.returncode == 0, done.stderr
    assert "hashing" not in done.stderr  # every SHA-256 was computed while the bytes streamed
    assert tree(dest) == {**files, "model.sig": tree(dest)["model.sig"]}
    record = marker(dest)["signature"]
    assert record["verified"] is True
    assert record["kind"] == mode
    assert record["files_verified"] == len(files)
    signature_digest = "sha256:" + sha256((dest / "model.sig").read_bytes())
    assert record["signature_sha256"] == signature_digest
    if mode == "key":
        assert record["signer"] == f"key sha256:{keys.fingerprint()}"
    else:
        assert "CN=model-publisher" in record["signer"]

    status = cli("status", "--json", dest, env=env)
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)["signature"]
    assert shown["signer"] == record["signer"]
    assert shown["signature_sha256"] == signature_digest
    assert "signed by" in cli("status", dest, env=env).stdout

    checked = cli("verify", dest, env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "OK signature model.sig" in checked.stdout


def test_s3_a_model_signed_by_someone_else_is_refused(
    s3: tuple[S3Server, dict[str, str]], keys: Keys, tmp_path: Path
) -> None:
    server, env = s3
    files = model_files()
    bucket = server.new_bucket({**files, "model.sig": sign(files, keys, tmp_path, "key")})
    cert_bucket = server.new_bucket(
        {**files, "model.sig": sign(files, keys, tmp_path, "certificate")}
    )
    cases = [
        (f"s3://{bucket}", f"key:{keys.other_public}"),
        (f"s3://{cert_bucket}", f"certificate:{keys.other_ca}"),
    ]
    for number, (uri, trust) in enumerate(cases):
        dest = tmp_path / f"dest-{number}"
        done = cli("pull", uri, dest, "--require-signature", trust, env=env)
        assert done.returncode == 1, done.stderr
        assert "model.sig: the signature does not verify against" in last_line(done)
        assert tree(dest) == {}
        assert not (dest / STATE / "marker.json").exists()


def test_s3_one_flipped_byte_at_the_origin_fails_the_pull_and_leaves_dest_as_it_was(
    s3: tuple[S3Server, dict[str, str]], keys: Keys, tmp_path: Path
) -> None:
    server, env = s3
    files = model_files()
    bucket = server.new_bucket({**files, "model.sig": sign(files, keys, tmp_path)})
    # Ranged 1 MiB chunks: the SHA-256 of a chunked file is computed in order as chunks land.
    trust = ("--require-signature", f"key:{keys.public}", "--chunk-size", "1MiB")
    dest = tmp_path / "dest"
    first = cli("pull", f"s3://{bucket}", dest, *trust, env=env)
    assert first.returncode == 0, first.stderr
    assert "hashing" not in first.stderr
    before, marker_before = tree(dest), marker(dest)

    name = "weights/model-00001.safetensors"
    server.upload(bucket, {name: flipped(files[name], 2 * MiB + 3)})
    done = cli("pull", f"s3://{bucket}", dest, *trust, "--revalidate", env=env)

    assert done.returncode == 1, done.stderr
    line = last_line(done)
    assert f"{name}: differs from the signed manifest" in line
    assert "Nothing was published" in line
    assert tree(dest) == before
    assert marker(dest) == marker_before
    fresh = tmp_path / "fresh"
    again = cli("pull", f"s3://{bucket}", fresh, *trust, env=env)
    assert again.returncode == 1
    assert name in last_line(again)
    assert tree(fresh) == {}


def test_s3_unsigned_model_missing_file_and_unsigned_extra_file_are_refused(
    s3: tuple[S3Server, dict[str, str]], keys: Keys, tmp_path: Path
) -> None:
    server, env = s3
    files = model_files()
    trust = ("--require-signature", f"key:{keys.public}")
    unsigned = server.new_bucket(files)
    done = cli("pull", f"s3://{unsigned}", tmp_path / "a", *trust, env=env)
    assert done.returncode == 1
    assert "model.sig: missing" in last_line(done)
    assert tree(tmp_path / "a") == {}

    missing = server.new_bucket(
        {
            **{k: v for k, v in files.items() if k != "tokenizer.json"},
            "model.sig": sign(files, keys, tmp_path),
        }
    )
    done = cli("pull", f"s3://{missing}", tmp_path / "m", *trust, env=env)
    assert done.returncode == 1
    assert "tokenizer.json: signed but missing from the model" in last_line(done)
    assert tree(tmp_path / "m") == {}

    extra = server.new_bucket(
        {**files, "model.sig": sign(files, keys, tmp_path), "extra/run.py": b"import os"}
    )
    done = cli("pull", f"s3://{extra}", tmp_path / "b", *trust, env=env)
    assert done.returncode == 1
    assert "extra/run.py: not covered by the signature" in last_line(done)
    assert tree(tmp_path / "b") == {}

    # The filters explain a file left out: the extra file excluded, a signed file excluded.
    done = cli(
        "pull", f"s3://{extra}", tmp_path / "c", *trust, "--exclude", "extra/*",
        "--exclude", "tokenizer.json", env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "extra/run.py" not in tree(tmp_path / "c")
    assert marker(tmp_path / "c")["signature"]["files_filtered_out"] == 1
    # ...and the signature comes along even when --include would leave it out.
    done = cli("pull", f"s3://{extra}", tmp_path / "d", *trust, "--include", "weights/*", env=env)
    assert done.returncode == 0, done.stderr
    assert sorted(tree(tmp_path / "d")) == [
        "model.sig",
        "weights/model-00001.safetensors",
        "weights/model-00002.safetensors",
    ]


def test_s3_signature_at_a_separate_uri(
    s3: tuple[S3Server, dict[str, str]], keys: Keys, tmp_path: Path
) -> None:
    server, env = s3
    files = model_files()
    model = server.new_bucket(files)
    signatures = server.new_bucket({"sigs/model-v1.sig": sign(files, keys, tmp_path)})
    dest = tmp_path / "dest"
    done = cli(
        "pull", f"s3://{model}", dest, "--require-signature", f"key:{keys.public}",
        "--signature-uri", f"s3://{signatures}/sigs/model-v1.sig", env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "model.sig" not in tree(dest)
    assert marker(dest)["signature"]["signature"] == f"s3://{signatures}/sigs/model-v1.sig"
    checked = cli("verify", dest, env=env)  # offline: the marker keeps the bundle
    assert checked.returncode == 0, checked.stderr
    assert "OK signature" in checked.stdout


@pytest.mark.parametrize("cached", [False, True], ids=["direct", "cache"])
def test_a_model_pulled_unsigned_is_never_served_to_a_pull_that_requires_a_signature(
    s3: tuple[S3Server, dict[str, str]], keys: Keys, tmp_path: Path, cached: bool
) -> None:
    """Pulled first without --require-signature while the origin held a tampered file: the
    complete entry (fast path, valid marker) must not satisfy a pull that requires one."""
    server, env = s3
    files = model_files()
    name = "config.json"
    tampered = {**files, name: files[name].replace(b"test", b"evil")}
    bucket = server.new_bucket({**tampered, "model.sig": sign(files, keys, tmp_path)})
    where = ("--cache-dir", tmp_path / "cache") if cached else ()
    trust = ("--require-signature", f"key:{keys.public}")
    dest = tmp_path / "dest"
    assert cli("pull", f"s3://{bucket}", dest, *where, env=env).returncode == 0

    refused = cli("pull", f"s3://{bucket}", tmp_path / "dest2", *where, *trust, env=env)
    again = cli("pull", f"s3://{bucket}", dest, *where, *trust, env=env)

    for done in (refused, again):
        assert done.returncode == 1, done.stderr
        assert f"{name}: differs from the signed manifest" in last_line(done)
    assert not (tmp_path / "dest2").exists() or tree(tmp_path / "dest2") == {}

    # The origin fixed: the same cached entry is then verified (fetched again) and served.
    server.upload(bucket, {name: files[name]})
    fixed = cli("pull", f"s3://{bucket}", dest, *where, *trust, env=env)
    assert fixed.returncode == 0, fixed.stderr
    assert "signature verified" in fixed.stderr
    assert tree(dest)[name] == files[name]
    # Now verified: the next pull takes the fast path, without loading model_signing.
    fast = subprocess.run(
        [
            sys.executable, "-c",
            "import atexit, sys\n"
            "atexit.register(lambda: print('model_signing loaded:',"
            " 'model_signing' in sys.modules, file=sys.stderr))\n"
            "from storage_initializer.cli import main\nmain()",
            "pull", f"s3://{bucket}", str(dest), *map(str, where), *trust,
        ],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert fast.returncode == 0, fast.stderr
    assert "model_signing loaded: False" in fast.stderr
    assert "downloading" not in fast.stderr
    # Another key: the entry verified under the first one does not satisfy it.
    other = cli(
        "pull", f"s3://{bucket}", dest, *where, "--require-signature",
        f"key:{keys.other_public}", env=env,
    )  # fmt: skip
    assert other.returncode == 1
    assert "does not verify against" in last_line(other)


def test_verify_rechecks_the_signature_against_the_files_on_disk(
    s3: tuple[S3Server, dict[str, str]], keys: Keys, tmp_path: Path
) -> None:
    server, env = s3
    files = model_files()
    bucket = server.new_bucket({**files, "model.sig": sign(files, keys, tmp_path)})
    dest = tmp_path / "dest"
    trust = f"key:{keys.public}"
    assert (
        cli("pull", f"s3://{bucket}", dest, "--require-signature", trust, env=env).returncode == 0
    )
    assert cli("verify", dest, "--require-signature", trust, env=env).returncode == 0
    wrong = cli("verify", dest, "--require-signature", f"key:{keys.other_public}", env=env)
    assert wrong.returncode == 1
    assert "does not verify against" in wrong.stdout

    # A signature swapped on disk for another valid one: not the one verified at download.
    sig = dest / "model.sig"
    sig.chmod(0o644)
    sig.write_bytes(sign({**files, "config.json": b"{}"}, keys, tmp_path))
    swapped = cli("verify", dest, env=env)
    assert swapped.returncode == 1
    # (the size check of the marker or the recorded signature digest catches it)
    assert "model.sig" in swapped.stdout

    unsigned = server.new_bucket(files)
    plain = tmp_path / "plain"
    assert cli("pull", f"s3://{unsigned}", plain, env=env).returncode == 0
    assert cli("verify", plain, env=env).returncode == 0
    required = cli("verify", plain, "--require-signature", trust, env=env)
    assert required.returncode == 1
    assert "not verified against a signature" in required.stdout


# -- the Hub -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub() -> Iterator[HubServer]:
    server = start_hub()
    yield server
    server.stop()


def test_hub_model_signed_with_the_model_signing_cli(
    hub: HubServer, keys: Keys, tmp_path: Path
) -> None:
    files = model_files(1)
    model = tmp_path / "model"
    for name, data in files.items():
        (model / name).parent.mkdir(parents=True, exist_ok=True)
        (model / name).write_bytes(data)
    signed = subprocess.run(
        [
            shutil.which("model_signing") or "model_signing", "sign", "key", str(model),
            "--private_key", str(keys.private), "--signature", str(model / "model.sig"),
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert signed.returncode == 0, signed.stderr
    repo = hub.add_repo("acme/signed")
    commit = {
        name: HubFile(data, lfs=name.endswith(".safetensors")) for name, data in files.items()
    }
    repo.add_commit({**commit, "model.sig": (model / "model.sig").read_bytes()})
    env = clean_env(hub.env(home=str(tmp_path / "hf-home")), STORAGE_INITIALIZER_RETRIES="0")
    trust = ("--require-signature", f"key:{keys.public}")

    done = cli("pull", "hf://acme/signed", tmp_path / "dest", *trust, env=env)
    assert done.returncode == 0, done.stderr
    assert "hashing" not in done.stderr  # LFS sha256 verified in the stream, others computed
    assert marker(tmp_path / "dest")["signature"]["signer"] == f"key sha256:{keys.fingerprint()}"

    name = "weights/model-00002.safetensors"
    repo.add_commit(
        {
            **commit,
            name: HubFile(flipped(files[name], 5), lfs=True),
            "model.sig": (model / "model.sig").read_bytes(),
        }
    )
    dest = tmp_path / "dest-tampered"
    done = cli("pull", "hf://acme/signed", dest, *trust, env=env)
    assert done.returncode == 1
    assert f"{name}: differs from the signed manifest" in last_line(done)
    assert tree(dest) == {}

    repo.add_commit(commit)  # the signature removed
    done = cli("pull", "hf://acme/signed", tmp_path / "dest-unsigned", *trust, env=env)
    assert done.returncode == 1
    assert "model.sig: missing" in last_line(done)


# -- settings and sigstore (offline) -----------------------------------------------------------


def test_require_signature_is_a_flag_an_env_var_and_a_config_key(tmp_path: Path) -> None:
    from storage_initializer import settings

    config = tmp_path / "config.yaml"
    config.write_text("require_signature: certificate:/etc/ca.pem,/etc/mid.pem\n")
    loaded = settings.load({}, {"STORAGE_INITIALIZER_CONFIG": str(config)})
    assert loaded.require_signature == "certificate:/etc/ca.pem,/etc/mid.pem"
    loaded = settings.load(
        {},
        {
            "STORAGE_INITIALIZER_CONFIG": str(config),
            "STORAGE_INITIALIZER_REQUIRE_SIGNATURE": "sigstore:me@example.com,https://issuer",
            "STORAGE_INITIALIZER_SIGNATURE_TRUST_ROOT": "/etc/trusted_root.json",
            "STORAGE_INITIALIZER_SIGNATURE_URI": "s3://b/model.sig",
        },
    )
    assert loaded.require_signature == "sigstore:me@example.com,https://issuer"
    assert loaded.signature_trust_root == "/etc/trusted_root.json"
    assert loaded.signature_uri == "s3://b/model.sig"
    flagged = settings.load({"require_signature": "key:/k.pub"}, {"STORAGE_INITIALIZER_CONFIG": ""})
    assert flagged.require_signature == "key:/k.pub"

    from storage_initializer.signing import parse_trust

    parsed = parse_trust("sigstore:https://github.com/o/r/.github/w.yml@refs/heads/main,"
                         "https://token.actions.githubusercontent.com", "/tr.json")  # fmt: skip
    assert parsed.identity == "https://github.com/o/r/.github/w.yml@refs/heads/main"
    assert parsed.issuer == "https://token.actions.githubusercontent.com"
    assert parsed.paths == ("/tr.json",)
    for bad in ("key", "key:", "pgp:/x", "sigstore:only-identity", "key:/a,/b"):
        with pytest.raises(ValueError):
            parse_trust(bad)


def test_bad_trust_values_are_one_line_usage_errors(tmp_path: Path) -> None:
    env = clean_env()
    done = cli("pull", tmp_path / "src", tmp_path / "dest", "--require-signature", "pgp:x", env=env)
    assert done.returncode != 0
    assert "--require-signature: 'pgp:x' is not a trust" in last_line(done)
    assert "key:PATH" in last_line(done)
    assert "Traceback" not in done.stderr


def test_sigstore_without_a_trust_root_is_a_clear_error_offline(keys: Keys, tmp_path: Path) -> None:
    """Keyless Sigstore needs Fulcio/Rekor to sign and, to verify, Sigstore's trust root
    (fetched with TUF when not given): offline, the pull must say what to give it."""
    files = model_files()
    source = tmp_path / "src"
    for name, data in {**files, "model.sig": sign(files, keys, tmp_path)}.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
    env = clean_env(STORAGE_INITIALIZER_RETRIES="0")
    done = cli(
        "pull", source, tmp_path / "dest", "--require-signature",
        "sigstore:someone@example.com,https://accounts.google.com", env=env,
    )  # fmt: skip
    assert done.returncode == 1
    assert "--signature-trust-root" in last_line(done)
    assert tree(tmp_path / "dest") == {}

    # A trust root that is not a Sigstore trust configuration: named, explained, refused.
    bogus = tmp_path / "trusted_root.json"
    bogus.write_text("{}")
    done = cli(
        "pull", source, tmp_path / "dest", "--require-signature",
        "sigstore:someone@example.com,https://accounts.google.com",
        "--signature-trust-root", bogus, env=env,
    )  # fmt: skip
    assert done.returncode == 1
    assert "cannot load the sigstore trust" in last_line(done)
    assert f"(trust root {bogus})" in last_line(done)
    assert tree(tmp_path / "dest") == {}


def test_tiered_caches_verify_a_copy_up_from_a_tier_filled_without_a_signature(
    s3: tuple[S3Server, dict[str, str]], keys: Keys, tmp_path: Path
) -> None:
    """The shared tier was filled by a pull that required nothing while the origin held a
    tampered file; a pull through a node tier that requires a signature must not copy it up
    unverified. The KServe entrypoint, configured by the environment alone."""
    server, env = s3
    files = model_files()
    name = "tokenizer.json"
    bucket = server.new_bucket(
        {**files, name: b'{"vocab": ["evil"]}', "model.sig": sign(files, keys, tmp_path)}
    )
    shared, node = tmp_path / "shared", tmp_path / "node"
    first = cli("pull", f"s3://{bucket}", tmp_path / "first", "--cache-dir", shared, env=env)
    assert first.returncode == 0, first.stderr
    required = {
        **env,
        "STORAGE_INITIALIZER_CACHE_DIR": f"{node},{shared}",
        "STORAGE_INITIALIZER_REQUIRE_SIGNATURE": f"key:{keys.public}",
    }
    done = subprocess.run(
        [sys.executable, "-m", "storage_initializer.entrypoint", f"s3://{bucket}",
         str(tmp_path / "dest")],
        env=required, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert f"{name}: differs from the signed manifest" in last_line(done)
    assert not (tmp_path / "dest").exists() or tree(tmp_path / "dest") == {}


def test_repair_keeps_a_model_verified_against_its_signature(
    s3: tuple[S3Server, dict[str, str]], keys: Keys, tmp_path: Path
) -> None:
    server, env = s3
    files = model_files()
    bucket = server.new_bucket({**files, "model.sig": sign(files, keys, tmp_path)})
    dest = tmp_path / "dest"
    pulled = cli(
        "pull", f"s3://{bucket}", dest, "--require-signature", f"key:{keys.public}", env=env
    )
    assert pulled.returncode == 0, pulled.stderr
    damaged = dest / "tokenizer.json"
    damaged.chmod(0o644)
    damaged.write_bytes(b'{"vocab": [1]}')

    repaired = cli("verify", dest, "--repair", "--source", f"s3://{bucket}", env=env)

    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "REPAIRED 1 file(s): tokenizer.json" in repaired.stdout
    assert "signature verified" in repaired.stderr
    assert marker(dest)["signature"]["signer"] == f"key sha256:{keys.fingerprint()}"
    assert "OK signature model.sig" in cli("verify", dest, env=env).stdout
