"""Reading a ``Retry-After`` header: how long a server asks us to wait before asking again.

One job, for every provider: the HTTP ones through :mod:`.httpcommon`, the SDK-based ones (S3,
GCS, Azure) from their error mappings. Its own module, needing only urllib3 (which every client
library here is built on), so that the S3 path does not import requests for it.
"""

from __future__ import annotations

from typing import Any

from urllib3.exceptions import InvalidHeader
from urllib3.util import Retry

#: A server asking for longer is not waited for longer (the engine caps its own wait lower).
MAX_RETRY_AFTER = 300.0

_PARSER = Retry(0)


def retry_after(headers: Any) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (``"7"``, ``"1.5"`` or an HTTP-date), in
    0..MAX_RETRY_AFTER; None when absent or unreadable. ``headers`` is any mapping with
    ``get`` (requests, urllib3, google-auth, azure-core, botocore headers)."""
    if not hasattr(headers, "get"):
        return None
    value = headers.get("Retry-After")
    if value is None:  # a plain dict of lowercased names (botocore's)
        value = headers.get("retry-after")
    if value is None:
        return None
    text = str(value).strip()
    if not text:
        return None
    try:
        seconds = float(text)  # urllib3 reads only whole seconds; a fraction is harmless
    except ValueError:
        try:
            seconds = _PARSER.parse_retry_after(text)  # an HTTP-date: seconds from now, >= 0
        except InvalidHeader:
            return None
    if seconds != seconds:  # NaN
        return None
    return max(0.0, min(seconds, MAX_RETRY_AFTER))
