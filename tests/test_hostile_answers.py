"""Answers a plain-http data path must survive, from a server whose every byte the test chooses
(tests/servers/raw_http.py), on each read path (lean with and without splice, requests):

- one byte of a body sent as TCP urgent data: ``recv`` would skip it (every later byte one
  off) and ``splice`` stops at its mark while ``poll`` keeps saying readable (a busy loop);
- a forged answer queued after a body on the kept-alive connection, before the next request:
  it must not be taken for the answer to that request;
- a body framed with a Transfer-Encoding http.client does not undo ("gzip, chunked"): its
  framing must not end up in the file;
- a whole-file answer longer than the listed size: another version, not the listed one cut.

A correct outcome is the server's bytes, or a clean failure with nothing visible.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import STATE_DIR, Run, clean_env, entrypoint, pattern
from tests.servers.raw_http import ETAG, RawHttp, Request

MiB = 1 << 20
DATA = pattern(5 * MiB + 123, 21)


#: The read paths of a plain-http file: lean with splice, lean without, and requests (the
#: provider's path behind a proxy or with the lean path off).
PATHS = {
    "splice": {},
    "no-splice": {"STORAGE_INITIALIZER_SPLICE": "false"},
    "requests": {"STORAGE_INITIALIZER_HTTP_LEAN": "false"},
}


@pytest.fixture(params=list(PATHS))
def splice_env(request: pytest.FixtureRequest) -> dict[str, str]:
    return PATHS[request.param]


def _pull(server: RawHttp, dest: Path, **env: str) -> Run:
    try:
        return entrypoint(
            server.url(),
            dest,
            env=clean_env(
                STORAGE_INITIALIZER_CHUNK_SIZE="2MiB",
                STORAGE_INITIALIZER_WORKERS="1",
                STORAGE_INITIALIZER_RETRIES="2",
                **env,
            ),
        )
    finally:
        server.close()


def _visible(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir() if p.name != STATE_DIR) if dest.exists() else []


def test_urgent_tcp_data_in_a_body_is_kept_in_order(
    tmp_path: Path, splice_env: dict[str, str]
) -> None:
    """With the stall guard off, a splice loop that spins at the urgent mark would run until
    the deadline (rc 1); recv without SO_OOBINLINE publishes the body shifted by one byte."""

    def urgent(server: RawHttp, conn: socket.socket, request: Request) -> bool:
        if request.method != "GET" or request.get_number != 1:
            return False
        head, body = server.answer(request)
        at = 3 * MiB // 2 + 5  # inside the first 2 MiB range, past the first splice segment
        conn.sendall(head + body[:at])
        conn.send(body[at : at + 1], socket.MSG_OOB)
        conn.sendall(body[at + 1 :])
        return True

    dest = tmp_path / "d"
    result = _pull(
        RawHttp(DATA, urgent),
        dest,
        STORAGE_INITIALIZER_STALL_TIMEOUT="0",
        STORAGE_INITIALIZER_TIMEOUT="90",
        **splice_env,
    )
    assert result.returncode == 0, result.describe()
    assert (dest / "model.bin").read_bytes() == DATA


def test_an_answer_queued_after_a_body_is_not_taken_for_the_next_one(
    tmp_path: Path, splice_env: dict[str, str]
) -> None:
    """After the first range's body, the server queues a complete 206 for the next range with
    wrong bytes, before that range is asked for. The last byte of the body and the forged head
    go out in one small send, so the forgery is in the socket when the body ends."""

    def forged(server: RawHttp, conn: socket.socket, request: Request) -> bool:
        if request.method != "GET" or request.get_number != 1:
            return False
        head, body = server.answer(request)
        asked = request.range(len(DATA))
        assert asked is not None
        start, end = asked[1], min(len(DATA), asked[1] + 2 * MiB)
        fake = b"\xee" * (end - start)
        fake_head = server.head(
            "206 Partial Content",
            [
                ("ETag", ETAG),
                ("Content-Range", f"bytes {start}-{end - 1}/{len(DATA)}"),
                ("Content-Length", str(len(fake))),
            ],
        )
        conn.sendall(head + body[:-1])
        conn.sendall(body[-1:] + fake_head + fake[:1000])
        conn.sendall(fake[1000:])
        return True

    dest = tmp_path / "d"
    result = _pull(RawHttp(DATA, forged), dest, **splice_env)
    assert result.returncode == 0, result.describe()
    assert (dest / "model.bin").read_bytes() == DATA


def _chunked(body: bytes) -> Iterator[bytes]:
    for at in range(0, len(body), 65536):
        part = body[at : at + 65536]
        yield f"{len(part):x}\r\n".encode() + part + b"\r\n"
    yield b"0\r\n\r\n"


def test_a_transfer_encoding_other_than_plain_chunked_is_refused(
    tmp_path: Path, splice_env: dict[str, str]
) -> None:
    """``Transfer-Encoding: gzip, chunked`` with a Content-Length: http.client only undoes a
    plain "chunked", so it would read Content-Length bytes of chunk framing into the file."""

    def framed(server: RawHttp, conn: socket.socket, request: Request) -> bool:
        if request.method != "GET":
            return False
        asked = request.range(len(DATA)) or (0, len(DATA))
        body = DATA[asked[0] : asked[1]]
        head = server.head(
            "206 Partial Content",
            [
                ("ETag", ETAG),
                ("Accept-Ranges", "bytes"),
                ("Content-Range", f"bytes {asked[0]}-{asked[1] - 1}/{len(DATA)}"),
                ("Content-Length", str(len(body))),
                ("Transfer-Encoding", "gzip, chunked"),
            ],
        )
        conn.sendall(head + b"".join(_chunked(body)))
        return True

    dest = tmp_path / "d"
    result = _pull(RawHttp(DATA, framed), dest, **splice_env)
    assert result.returncode != 0, result.describe()
    assert "Transfer-Encoding 'gzip, chunked'" in result.stderr, result.stderr
    assert _visible(dest) == []


def test_a_whole_file_answer_longer_than_listed_is_another_version(
    tmp_path: Path, splice_env: dict[str, str]
) -> None:
    """A server without ranges lists 5 MiB + 123 bytes (HEAD) and then sends 4 KiB more: taking
    the listed length of it would publish a cut file as the one listed."""

    def longer(server: RawHttp, conn: socket.socket, request: Request) -> bool:
        if request.method != "GET":
            return False
        body = DATA + b"Z" * 4096
        conn.sendall(
            server.head("200 OK", [("ETag", ETAG), ("Content-Length", str(len(body)))]) + body
        )
        return True

    dest = tmp_path / "d"
    result = _pull(RawHttp(DATA, longer, ranges=False), dest, **splice_env)
    assert result.returncode != 0, result.describe()
    assert "changed" in result.stderr, result.stderr
    assert _visible(dest) == []
