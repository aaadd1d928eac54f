"""What the two Hub-like providers, ``hf://`` and ``modelscope://``, do the same way.

Both name a model ``owner/model[:revision]``, ask a Hub's JSON API for the revision and the file
list, and read files with ranged GETs whose answer may be the whole file or the range. One job:
those shared steps, written once, so that a fix to one Hub's parsing or reading reaches the
other. What each Hub words differently (its error messages, its token, its redirects) stays in
its own module.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import requests

from storage_initializer import tls
from storage_initializer.blocks import BLOCK
from storage_initializer.errors import InitializerError, UsageError
from storage_initializer.providers import httpcommon
from storage_initializer.providers.ranged import stream_range

if TYPE_CHECKING:
    from storage_initializer.providers.base import RemoteFile
    from storage_initializer.uri import SourceUri

#: An owner or model name, as both Hubs accept it.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class HubGrammar:
    """How one Hub's URIs name a model, for parsing them and for the messages of a bad one."""

    #: The Hub as messages name it ("Hugging Face").
    hub: str
    #: The URI's grammar, shown when a URI does not follow it.
    form: str
    #: What may follow ':' ("branch or tag").
    revisions: str
    #: The hint when ``owner/model`` is missing.
    hint: str
    #: Whether path parts may follow ``owner/model`` (a sub-directory).
    subpath: bool

    def repo_id(self, parts: Sequence[str], redacted: str) -> tuple[str, str]:
        """The first two path parts, ``owner`` and ``model[:revision]`` → (``owner/model``,
        revision as written or "")."""
        extra = len(parts) > 2 and not self.subpath
        if len(parts) < 2 or extra or not parts[0] or not parts[1]:
            raise UsageError(f"invalid {self.hub} URI {redacted}: expected {self.form}", self.hint)
        model, colon, revision = parts[1].partition(":")
        for label, value in (("owner", parts[0]), ("model name", model)):
            if not NAME_RE.match(value) or ".." in value:
                raise UsageError(
                    f"invalid {self.hub} URI {redacted}: bad {label} {value!r}",
                    f"Expected {self.form}",
                )
        if colon and not revision:
            scheme = self.form.partition("://")[0]
            raise UsageError(
                f"invalid {self.hub} URI {redacted}: empty revision after ':'",
                f"Write {scheme}://owner/model:<{self.revisions}>, or drop the ':'",
            )
        return f"{parts[0]}/{model}", revision


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
    where: str,
) -> requests.Response:
    """One GET of a Hub API URL that must answer 200; any other outcome is raised as the error
    the provider words (one attempt: the caller decides how often to try). The body of a 200 is
    read here, bounded (:func:`httpcommon.read_metadata`); ``where`` (the redacted URI and what
    was asked) names an answer that is too large."""
    try:
        response = session.get(
            url,
            params=params,
            headers=headers,
            timeout=timeout,
            verify=tls.requests_verify(),
            stream=True,
        )
        if response.status_code == 200:
            try:
                httpcommon.read_metadata(response, where)
            except BaseException:
                response.close()
                raise
    except requests.RequestException as exc:
        raise transport_error(exc) from None
    if response.status_code != 200:
        with response:  # its body is read, if at all, by httpcommon.error_body: bounded
            raise http_error(response)
    return response


def range_headers(start: int, end: int | None) -> dict[str, str]:
    """The ``Range`` header for bytes ``[start, end)``; none for a whole file."""
    if start > 0 or end is not None:
        return {"Range": f"bytes={start}-" + ("" if end is None else str(end - 1))}
    return {}


class HubErrors(Protocol):
    """What :func:`download` needs of a Hub source: its URI and its wording of failures."""

    uri: SourceUri

    def _http_error(self, response: requests.Response, what: str) -> InitializerError: ...

    def _transport_error(self, exc: Exception, what: str) -> InitializerError: ...


def download(
    source: HubErrors,
    send: Callable[[], requests.Response],
    file: RemoteFile,
    start: int,
    end: int | None,
) -> Iterator[bytes]:
    """Bytes ``[start, end)`` of ``file`` from the answer ``send()`` gets, which must be 200 or
    206; a failure is raised as ``source`` words it, and the response is closed however the
    reading ends."""
    what = f"downloading {file.path}"
    try:
        response = send()
    except requests.RequestException as exc:
        raise source._transport_error(exc, what) from None
    with response:
        if response.status_code not in (200, 206):
            raise source._http_error(response, what)
        yield from stream_range(
            response,
            start,
            end,
            label=f"{source.uri.redacted}: {what}",
            ranged=start > 0 or end is not None,
            file_size=file.size,
            block=BLOCK,
        )
