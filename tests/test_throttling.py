"""Throttling that outlasts the retries, end to end, for every cloud backend.

Each backend's real local server (moto, fake-gcs-server, Azurite, the Hub server of
tests/servers/hub.py) sits behind the counting, fault-injecting proxy (tests/servers/proxy.py),
which answers every matching request the way the service throttles: S3 ``503 SlowDown``, GCS
``429 rateLimitExceeded``, Azure ``503 ServerBusy``, the Hub ``429``. The KServe entrypoint runs
as its own process with few retries (``STORAGE_INITIALIZER_RETRIES`` and the SDK's own attempts
turned down), so giving up comes quickly; what must hold:

- exit status 1;
- the last log line (what KServe shows) names the URI, says the source is throttled or busy and
  that we gave up after a number of attempts, and says what to do;
- DEST holds no model file (nothing half-written is visible);
- the proxy saw the throttled requests: the retries really happened, bounded.

Two phases: throttled downloads (the listing is answered, every object GET is throttled: the
engine's retries run out) and a throttled listing (every request throttled: the provider's and
the SDK's listing retries run out). The GCS listing is retried by google-api-core for a fixed
30-second deadline (storage_initializer/providers/gcs.py), so only its download phase is run
here; its throttled listing is covered at provider level in tests/test_gcs.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import Run, clean_env, entrypoint, model_files
from tests.servers.azurite import Azurite, azurite
from tests.servers.gcs import GcsServer, gcs_server
from tests.servers.hub import HubServer, start_hub
from tests.servers.proxy import CountingProxy, Fault, s3_error
from tests.servers.s3 import S3Server, s3_server

__all__ = ["azurite", "gcs_server", "s3_server"]  # session fixtures used here

#: Retries of the engine (per chunk) and of each SDK, kept small so giving up is quick.
RETRIES = 2
MODEL = {"m/config.json": b'{"throttled": true}', "m/weights/a.bin": b"w" * 5000}


@dataclass
class Case:
    """One backend behind the proxy: the URI, the environment of the process, and the fault
    that throttles it (``downloads``: object GETs only; ``everything``: every request)."""

    uri: str
    env: dict[str, str]
    proxy: CountingProxy
    downloads: Fault
    everything: Fault
    #: Words that must be in the last line for this backend's throttling answer.
    says: tuple[str, ...]
    #: Requests per read attempt of ours: the SDK's own attempts (botocore retries once with
    #: S3_MAX_ATTEMPTS=1, as the stock initializer counts it; the others do not retry reads).
    sdk_attempts: int = 1


def gcs_throttle(**match: object) -> Fault:
    body = (
        b'{"error": {"code": 429, "message": "The rate of change requests to the bucket is too '
        b'high", "errors": [{"reason": "rateLimitExceeded"}]}}'
    )
    headers = {"Content-Type": "application/json", "Retry-After": "0"}
    return Fault(status=429, body=body, headers=headers, **match)  # type: ignore[arg-type]


def azure_busy(**match: object) -> Fault:
    body = b'<?xml version="1.0" encoding="utf-8"?><Error><Code>ServerBusy</Code></Error>'
    headers = {"x-ms-error-code": "ServerBusy", "Content-Type": "application/xml"}
    return Fault(status=503, body=body, headers=headers, **match)  # type: ignore[arg-type]


def hub_throttle(**match: object) -> Fault:
    headers = {"Content-Type": "application/json", "Retry-After": "0"}
    body = b'{"error": "You have been rate-limited; you can retry this action in a few minutes"}'
    return Fault(status=429, body=body, headers=headers, **match)  # type: ignore[arg-type]


@pytest.fixture
def s3_case(s3_server: S3Server) -> Iterator[Case]:
    bucket = s3_server.new_bucket(MODEL)
    with CountingProxy(s3_server.endpoint) as proxy:
        env = {**s3_server.env(endpoint=proxy.url), "S3_MAX_ATTEMPTS": "1"}
        slow = ("SlowDown", "Please reduce your request rate.")
        yield Case(
            f"s3://{bucket}/m",
            env,
            proxy,
            s3_error(*slow, status=503, method="GET", path_contains=f"/{bucket}/m/"),
            s3_error(*slow, status=503),
            ("SlowDown",),
            # GETs take the lean path (s3_lean): retried by the engine only; S3_MAX_ATTEMPTS
            # counts botocore's attempts at the listing.
            sdk_attempts=1,
        )


@pytest.fixture
def gcs_case(gcs_server: GcsServer) -> Iterator[Case]:
    bucket = gcs_server.new_bucket(MODEL)
    with CountingProxy(gcs_server.endpoint) as proxy:
        yield Case(
            f"gs://{bucket}/m",
            gcs_server.env(endpoint=proxy.url),
            proxy,
            gcs_throttle(method="GET", path_contains="/download/"),
            gcs_throttle(),
            ("429",),
        )


@pytest.fixture
def azure_case(azurite: Azurite) -> Iterator[Case]:
    container = azurite.new_container_name("throttle")
    azurite.upload(container, MODEL)
    with CountingProxy(f"http://127.0.0.1:{azurite.port}") as proxy:
        yield Case(
            azurite.uri(container, "m"),
            azurite.env(endpoint=f"{proxy.url}/{azurite.account}"),
            proxy,
            azure_busy(method="GET", path_contains=f"/{container}/m/"),
            azure_busy(),
            ("ServerBusy", "busy"),
        )


@pytest.fixture
def hf_case(tmp_path: Path) -> Iterator[Case]:
    hub: HubServer = start_hub()
    try:
        hub.add_repo("acme/busy").add_commit(
            {path.removeprefix("m/"): data for path, data in MODEL.items()}
        )
        with CountingProxy(hub.url) as proxy:
            yield Case(
                "hf://acme/busy",
                {**hub.env(home=str(tmp_path / "hf-home")), "HF_ENDPOINT": proxy.url},
                proxy,
                hub_throttle(method="GET", path_contains="/resolve/"),
                hub_throttle(),
                ("429",),
            )
    finally:
        hub.stop()


CASES: dict[str, str] = {
    "s3": "s3_case",
    "gcs": "gcs_case",
    "azure-blob": "azure_case",
    "hf": "hf_case",
}


def pull_throttled(case: Case, dest: Path) -> Run:
    env = clean_env(case.env, STORAGE_INITIALIZER_RETRIES=str(RETRIES))
    return entrypoint(case.uri, dest, env=env)


def assert_gave_up(run: Run, case: Case, dest: Path) -> int:
    """The checks of every case; returns the number of attempts the last line reports."""
    assert run.returncode == 1, run.describe()
    line = run.last_line
    assert case.uri in line, line
    for word in case.says:
        assert word in line, line
    assert re.search(r"throttl|busy|rate|slow ?down|429|503", line, re.IGNORECASE), line
    found = re.search(r"gave up after (\d+) attempts?", line)
    assert found, line
    # What to do: wait and run again, or raise the retries.
    assert re.search(r"STORAGE_INITIALIZER_RETRIES|run again", line), line
    if dest.exists():
        assert model_files(dest) == {}, sorted(model_files(dest))
    return int(found.group(1))


@pytest.mark.parametrize("backend", list(CASES))
def test_throttled_downloads_give_up_with_a_clear_last_line(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The listing is answered, every object GET is throttled: the engine retries each file
    RETRIES times, then the pull fails, naming the URI, the throttling and the fix."""
    case: Case = request.getfixturevalue(CASES[backend])
    case.proxy.set_faults(case.downloads)
    dest = tmp_path / "model"
    run = pull_throttled(case, dest)
    assert assert_gave_up(run, case, dest) == RETRIES + 1
    # The file that gave up was asked for RETRIES + 1 times by us, each time with the SDK's own
    # attempts; the others stop as soon as one file gives up (the pull is cancelled).
    per_path: dict[str, int] = {}
    for record in case.proxy.select(faulted=True):
        per_path[record.path] = per_path.get(record.path, 0) + 1
    assert per_path, "the proxy throttled nothing"
    assert max(per_path.values()) == (RETRIES + 1) * case.sdk_attempts, per_path


@pytest.mark.parametrize(
    "backend",
    [
        "s3",
        "azure-blob",
        "hf",
    ],
)
def test_throttled_listing_gives_up_with_a_clear_last_line(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Every request is throttled, the listing included: the provider's and the SDK's listing
    retries run out and the pull fails the same way; nothing is created in DEST."""
    case: Case = request.getfixturevalue(CASES[backend])
    case.proxy.set_faults(case.everything)
    dest = tmp_path / "model"
    run = pull_throttled(case, dest)
    attempts = assert_gave_up(run, case, dest)
    # The count in the message is the truth: the first listing request, that many times.
    assert attempts >= 2
    assert len(case.proxy.select(faulted=True)) == attempts
    assert not case.proxy.select(faulted=False), "a request got through the throttle"
