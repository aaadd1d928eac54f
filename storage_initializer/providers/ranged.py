"""Reading the body of a ranged HTTP GET the way every HTTP-based provider needs it.

Servers answer a ``Range`` request with 206 and the asked-for bytes, or ignore it and send the
whole file with 200; some CDNs answer with a different range than asked. This takes bytes
``[start, end)`` out of either answer, in bounded blocks, and turns a body that ends early or a
connection that breaks into a :class:`TransientError`, so that the engine resumes the chunk.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import requests

from storage_initializer.blocks import BLOCK
from storage_initializer.errors import TransientError

_CONTENT_RANGE = re.compile(r"bytes (\d+)-")


def stream_range(
    response: requests.Response,
    start: int,
    end: int | None,
    *,
    label: str,
    ranged: bool,
    file_size: int | None = None,
    block: int = BLOCK,
) -> Iterator[bytes]:
    """Yield bytes ``[start, end)`` of ``response`` (already checked for 200/206); ``label``
    names the (redacted) source and what is read, for error messages."""
    skip = 0
    if ranged and response.status_code == 200:
        skip = start  # the server ignored Range: drop the head ourselves
    elif response.status_code == 206:
        got = response.headers.get("Content-Range", "")
        match = _CONTENT_RANGE.match(got)
        if not match or int(match.group(1)) != start:
            raise TransientError(
                f"{label}: asked for bytes from {start}, got Content-Range {got!r}"
            )
    wanted = None if end is None else end - start
    sent = 0
    try:
        for data in response.iter_content(block):
            if skip:
                if len(data) <= skip:
                    skip -= len(data)
                    continue
                data, skip = data[skip:], 0
            if wanted is not None and sent + len(data) > wanted:
                data = data[: wanted - sent]
            if data:
                sent += len(data)
                yield data
            if wanted is not None and sent >= wanted:
                break
    except requests.RequestException as exc:
        raise TransientError(f"{label}: transfer failed ({type(exc).__name__})") from None
    expected = wanted
    if expected is None and file_size is not None:
        expected = file_size - start
    if expected is not None and sent < expected:
        raise TransientError(f"{label}: connection closed after {sent} of {expected} bytes")
