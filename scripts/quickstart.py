"""Quickstart demo: several replicas, one shared directory, one download.

Starts moto's S3 server on 127.0.0.1, uploads a sample model, then starts the replicas at the
same moment with KServe's entrypoint. Prints what each replica did, how many GETs each object
cost at the server, and how fast a replica starts once the model is there.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".work" / "quickstart"
BUCKET = "models"
PREFIX = "demo/sample-model"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"the S3 server did not start on port {port}")


def sample_model(size_mib: int) -> dict[str, bytes]:
    """A model-shaped tree: config, tokenizer, two weight shards (pseudo-random, reproducible)."""
    shard = size_mib * 1024 * 1024 // 2
    seed = hashlib.sha256(b"storage-initializer quickstart").digest()
    block = b"".join(hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(32768))
    weights = (block * (shard // len(block) + 1))[:shard]
    return {
        "config.json": b'{"architectures": ["DemoModel"], "hidden_size": 64}\n',
        "tokenizer/tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}\n',
        "model-00001-of-00002.safetensors": weights,
        "model-00002-of-00002.safetensors": weights[::-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--size-mib", type=int, default=64)
    args = parser.parse_args()

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    port = free_port()
    server_log = open(WORK / "s3-server.log", "w")  # noqa: SIM115 - lives as long as the server
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=server_log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, time.monotonic() + 30)
        endpoint = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "quickstart",
            "AWS_SECRET_ACCESS_KEY": "quickstart-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "STORAGE_INITIALIZER_PROGRESS_INTERVAL": "1",
        }
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="quickstart",
            aws_secret_access_key="quickstart-secret",
            region_name="us-east-1",
        )
        s3.create_bucket(Bucket=BUCKET)
        model = sample_model(args.size_mib)
        for name, data in model.items():
            s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{name}", Body=data)
        total = sum(len(v) for v in model.values())
        uri = f"s3://{BUCKET}/{PREFIX}"
        volume = WORK / "shared-volume"
        dest = volume / "sample-model"
        print(f"sample model: {len(model)} files, {total / 2**20:.0f} MiB at {uri} ({endpoint})")
        print(f"starting {args.replicas} replicas at once into {dest}\n")

        entrypoint = [sys.executable, "-m", "storage_initializer.entrypoint", uri, str(dest)]
        logs = [WORK / f"replica-{i}.log" for i in range(args.replicas)]
        handles = [open(path, "w") for path in logs]  # noqa: SIM115
        started = time.monotonic()
        procs = [
            subprocess.Popen(entrypoint, env=env, stdout=h, stderr=subprocess.STDOUT)
            for h in handles
        ]
        codes = [p.wait() for p in procs]
        wall = time.monotonic() - started
        for handle in handles:
            handle.close()

        outcomes = {}
        for i, (path, code) in enumerate(zip(logs, codes, strict=True)):
            text = path.read_text()
            match = re.search(r"summary: (.*?) s3://.*?: (.*)$", text, re.MULTILINE)
            what = match.group(1) if match else f"FAILED (exit {code}), see {path}"
            outcomes[what] = outcomes.get(what, 0) + 1
            print(f"  replica {i}: exit {code}, {what}" + (f": {match.group(2)}" if match else ""))
        print(f"\nall replicas done in {wall:.2f}s")

        server_log.flush()
        gets = {}
        for line in (WORK / "s3-server.log").read_text().splitlines():
            found = re.search(rf'"GET /{BUCKET}/{re.escape(PREFIX)}/([^\s?]+)\S* HTTP', line)
            if found:
                gets[found.group(1)] = gets.get(found.group(1), 0) + 1
        print("GET requests per object at the S3 server (ranged chunks count once each):")
        for name in model:
            print(f"  {name}: {gets.get(name, 0)}")

        late = time.monotonic()
        code = subprocess.run(entrypoint, env=env, capture_output=True).returncode
        print(
            f"\na replica started now finds the model complete: exit {code} in "
            f"{time.monotonic() - late:.2f}s (whole process)"
        )
        verify = subprocess.run(
            [sys.executable, "-m", "storage_initializer", "verify", str(dest)],
            capture_output=True,
            text=True,
        )
        print(verify.stdout.strip() or verify.stderr.strip())
        downloaded = outcomes.get("downloaded", 0)
        print(
            f"\n{downloaded} replica downloaded, {args.replicas - downloaded} waited and then "
            "started"
            if all(c == 0 for c in codes)
            else "\nsome replicas FAILED"
        )
        if any(codes) or downloaded != 1:
            sys.exit(1)
    finally:
        server.terminate()
        server.wait(timeout=10)
        server_log.close()


if __name__ == "__main__":
    main()
