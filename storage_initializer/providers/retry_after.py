"""Reading a ``Retry-After`` header: how long a server asks us to wait before asking again.

One job, for every provider: the HTTP ones through :mod:`.httpcommon`, the SDK-based ones (S3,
GCS, Azure) from their error mappings. Its own module, on the standard library only, so that a
lean pull imports no HTTP client library for it (urllib3 alone costs ~25 ms of CPU to import).
"""

from __future__ import annotations

import email.utils
import time
from typing import Any

#: A server asking for longer is not waited for longer (the engine caps its own wait lower).
MAX_RETRY_AFTER = 300.0


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
    seconds: float | None
    try:
        seconds = float(text)  # urllib3 reads only whole seconds; a fraction is harmless
    except ValueError:
        seconds = _until(text)  # an HTTP-date
        if seconds is None:
            return None
    if seconds != seconds:  # NaN
        return None
    return max(0.0, min(seconds, MAX_RETRY_AFTER))


def _until(text: str) -> float | None:
    """Seconds from now to the HTTP-date ``text`` (>= 0; a date without a zone is UTC, as
    urllib3 reads it); None when it is not a date."""
    parsed = email.utils.parsedate_tz(text)
    if parsed is None:
        return None
    if parsed[9] is None:
        parsed = (*parsed[:9], 0)
    return max(0.0, email.utils.mktime_tz(parsed) - time.time())
