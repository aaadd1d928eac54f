"""The termination message (termination.py): the KServe entrypoint as a real process against a
real S3 server (moto), its result read from the file the kubelet would read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.helpers import clean_env, entrypoint
from tests.servers.s3 import SECRET_KEY, S3Server, s3_server

__all__ = ["s3_server"]

LIMIT = 4096
WEIGHTS = bytes(range(256)) * 1000


def _env(server: S3Server, log: Path) -> dict[str, str]:
    return clean_env(
        server.env(),
        STORAGE_INITIALIZER_TERMINATION_LOG=str(log),
        AWS_EC2_METADATA_DISABLED="true",
    )


def _message(log: Path) -> dict[str, Any]:
    raw = log.read_bytes()
    assert len(raw) <= LIMIT, f"{len(raw)} bytes"
    return json.loads(raw)


def test_success_summarises_every_pair(s3_server: S3Server, tmp_path: Path) -> None:
    bucket = s3_server.new_bucket(
        {"base/config.json": b"{}", "base/w.bin": WEIGHTS, "lora/adapter.bin": b"x" * 1000}
    )
    log = tmp_path / "termination-log"
    args = [f"s3://{bucket}/base", tmp_path / "m", f"s3://{bucket}/lora", tmp_path / "l"]
    done = entrypoint(*args, env=_env(s3_server, log))
    assert done.returncode == 0, done.describe()
    first = _message(log)
    assert first["outcome"] == "ok"
    assert first["models"] == 2
    assert first["bytes_from_origin"] == len(WEIGHTS) + 2 + 1000
    assert first["bytes_reused"] == 0
    assert [p["source"] for p in first["pulls"]] == [f"s3://{bucket}/base", f"s3://{bucket}/lora"]
    assert all(p["fingerprint"] and p["outcome"] == "downloaded" for p in first["pulls"])
    assert first["pulls"][0]["dest"] == str(tmp_path / "m")

    again = entrypoint(*args, env=_env(s3_server, log))
    assert again.returncode == 0, again.describe()
    second = _message(log)
    assert second["bytes_from_origin"] == 0
    assert second["bytes_reused"] == first["bytes_from_origin"]
    assert [p["fingerprint"] for p in second["pulls"]] == [p["fingerprint"] for p in first["pulls"]]


def test_failure_writes_the_last_log_line(s3_server: S3Server, tmp_path: Path) -> None:
    bucket = s3_server.new_bucket({"base/w.bin": b"w"})
    log = tmp_path / "termination-log"
    done = entrypoint(
        f"s3://{bucket}/base",
        tmp_path / "m",
        f"s3://{bucket}/no-such-model",
        tmp_path / "x",
        env=_env(s3_server, log),
    )
    assert done.returncode == 1, done.describe()
    message = _message(log)
    assert message["outcome"] == "failed"
    assert message["reason"] and message["reason"] in done.last_line
    assert message["source"] == f"s3://{bucket}/no-such-model"
    assert [p["source"] for p in message["pulls"]] == [f"s3://{bucket}/base"]


def test_huge_uri_and_many_pairs_stay_within_the_limit(s3_server: S3Server, tmp_path: Path) -> None:
    files = {f"m{i}/w.bin": b"w" * i for i in range(40)}
    bucket = s3_server.new_bucket(files)
    log = tmp_path / "termination-log"
    args: list[Any] = []
    for i in range(40):
        args += [f"s3://{bucket}/m{i}", tmp_path / ("d" * 200) / str(i)]
    done = entrypoint(*args, env=_env(s3_server, log))
    assert done.returncode == 0, done.describe()
    message = _message(log)
    assert message["models"] == 40
    assert message["bytes_from_origin"] == sum(range(40))
    assert len(message["pulls"]) + message.get("omitted", 0) == 40

    huge = f"s3://{bucket}/" + "k" * 20_000
    done = entrypoint(huge, tmp_path / "h", env=_env(s3_server, log))
    assert done.returncode == 1, done.describe()
    message = _message(log)
    assert message["outcome"] == "failed"
    # The URI is shortened in the reason (redact.shorten_uri), so nothing needs cutting.
    assert "…" in message["reason"] and len(message["reason"]) < 2000
    assert message["source"].startswith(f"s3://{bucket}/kkk")


def test_no_secret_reaches_the_message(s3_server: S3Server, tmp_path: Path) -> None:
    log = tmp_path / "termination-log"
    planted = "planted-sas-signature-0123456789"
    env = _env(s3_server, log)
    # A password in a URL, a SAS-style query, and the S3 secret key itself (in the env).
    done = entrypoint(
        f"http://user:{planted}@127.0.0.1:1/model.bin?sig={planted}",
        tmp_path / "h",
        env=env,
    )
    assert done.returncode == 1, done.describe()
    text = log.read_text()
    assert planted not in text
    assert SECRET_KEY not in text
    assert json.loads(text)["outcome"] == "failed"


def test_an_empty_setting_writes_nothing(s3_server: S3Server, tmp_path: Path) -> None:
    bucket = s3_server.new_bucket({"base/w.bin": b"w"})
    env = _env(s3_server, tmp_path / "unused")
    env["STORAGE_INITIALIZER_TERMINATION_LOG"] = ""
    done = entrypoint(f"s3://{bucket}/base", tmp_path / "m", env=env)
    assert done.returncode == 0, done.describe()
    assert not (tmp_path / "unused").exists()


def test_the_message_fits_whatever_it_is_given() -> None:
    """Multi-byte text, hundreds of pairs, a reason longer than the limit: always valid JSON
    within 4096 bytes (the kubelet counts bytes, not characters), totals over every pair."""
    from storage_initializer import termination

    runs = [
        {
            "source": f"hf://org/模型-{i}-" + "é" * 300,
            "dest": "/mnt/" + "ü" * 500,
            "outcome": "downloaded",
            "fingerprint": "f" * 64,
            "bytes_from_origin": i,
            "bytes_reused": 1,
            "seconds": 0.5,
        }
        for i in range(300)
    ]
    ok = termination.success_message(runs)
    assert len(ok.encode()) <= LIMIT
    data = json.loads(ok)
    assert data["models"] == 300 and data["bytes_from_origin"] == sum(range(300))
    assert len(data["pulls"]) + data["omitted"] == 300
    failed = termination.failure_message("ß" * 10_000, "s3://b/" + "k" * 10_000, runs)
    assert len(failed.encode()) <= LIMIT
    data = json.loads(failed)
    assert data["outcome"] == "failed" and data["reason"].startswith("ßßß")
