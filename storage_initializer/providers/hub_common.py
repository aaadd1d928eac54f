"""What the two Hub-like providers, ``hf://`` and ``modelscope://``, do the same way.

Both name a model ``owner/model[:revision]``, ask a Hub's JSON API for the revision and the file
list, and read files with ranged GETs whose answer may be the whole file or the range. One job:
those shared steps, written once, so that a fix to one Hub's parsing or reading reaches the
other. What each Hub words differently (its error messages, its token, its redirects) stays in
its own module.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping

import requests

from storage_initializer import tls
from storage_initializer.blocks import BLOCK
from storage_initializer.errors import InitializerError, UsageError
from storage_initializer.providers.ranged import stream_range

#: An owner or model name, as both Hubs accept it.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def split_repo_id(
    owner: str, model_part: str, *, redacted: str, hub: str, form: str, revisions: str
) -> tuple[str, str]:
    """``owner`` and ``model[:revision]`` → (``owner/model``, revision as written or "").

    ``hub`` names the Hub in messages ("Hugging Face"), ``form`` is the URI's grammar and
    ``revisions`` what may follow ':' ("branch or tag")."""
    model, colon, revision = model_part.partition(":")
    for label, value in (("owner", owner), ("model name", model)):
        if not NAME_RE.match(value) or ".." in value:
            raise UsageError(
                f"invalid {hub} URI {redacted}: bad {label} {value!r}", f"Expected {form}"
            )
    if colon and not revision:
        scheme = form.partition("://")[0]
        raise UsageError(
            f"invalid {hub} URI {redacted}: empty revision after ':'",
            f"Write {scheme}://owner/model:<{revisions}>, or drop the ':'",
        )
    return f"{owner}/{model}", revision


def raw_bytes(session: requests.Session) -> None:
    """Ask for the stored bytes: listed sizes and ``Range`` offsets are of those, not of a
    compressed encoding."""
    session.headers["Accept-Encoding"] = "identity"


def get_ok(
    session: requests.Session,
    url: str,
    *,
    params: Mapping[str, str] | None,
    headers: Mapping[str, str] | None = None,
    timeout: tuple[float, float],
    transport_error: Callable[[Exception], InitializerError],
    http_error: Callable[[requests.Response], InitializerError],
) -> requests.Response:
    """One GET of a Hub API URL that must answer 200; any other outcome is raised as the error
    the provider words (one attempt: the caller decides how often to try)."""
    try:
        response = session.get(
            url,
            params=params,
            headers=headers,
            timeout=timeout,
            verify=tls.requests_verify(),
        )
    except requests.RequestException as exc:
        raise transport_error(exc) from None
    if response.status_code != 200:
        raise http_error(response)
    return response


def range_headers(start: int, end: int | None) -> dict[str, str]:
    """The ``Range`` header for bytes ``[start, end)``; none for a whole file."""
    if start > 0 or end is not None:
        return {"Range": f"bytes={start}-" + ("" if end is None else str(end - 1))}
    return {}


def checked_body(
    response: requests.Response,
    start: int,
    end: int | None,
    *,
    file_size: int | None,
    label: str,
    http_error: Callable[[requests.Response], InitializerError],
) -> Iterator[bytes]:
    """Bytes ``[start, end)`` of a file download's answer, which must be 200 or 206; the
    response is closed however the reading ends."""
    with response:
        if response.status_code not in (200, 206):
            raise http_error(response)
        yield from stream_range(
            response,
            start,
            end,
            label=label,
            ranged=start > 0 or end is not None,
            file_size=file_size,
            block=BLOCK,
        )
