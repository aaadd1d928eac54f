"""Listings that end: a paginated listing must never lead back to a page it sent already.

Why: every listing API we read pages through (GCS's ``nextPageToken``, Azure's ``NextMarker``,
S3's ``NextContinuationToken``, the Hub's ``Link: rel=next``) trusts the server for where the
next page is. A broken mirror or proxy that hands out a token it handed out before makes the
SDK loop for ever, fetching the same objects again and again, with the file list growing until
the pod is OOM-killed, and no stall guard notices, because bytes keep arriving. One token seen
twice is enough to know the listing cannot end, so it is refused with an error naming the source
instead.

botocore's paginator refuses a token equal to the one just before, not a longer cycle (A, B, A),
so S3 goes through here too.
"""

from __future__ import annotations

from storage_initializer.errors import SourceError


class PageTrail:
    """The page tokens (or next-page URLs) one listing has followed so far."""

    def __init__(self, where: str, hint: str) -> None:
        #: The redacted URI and what was being listed, for the error.
        self.where = where
        self.hint = hint
        self._followed: set[str] = set()

    def follow(self, token: str | None) -> None:
        """Note that the listing goes on to the page ``token`` names (None or "": it ended);
        raise :class:`SourceError` when that page was followed before."""
        if not token:
            return
        if token in self._followed:
            raise SourceError(
                f"{self.where}: the server's link to the next page leads back to a page it "
                "sent already (a listing that would never end)",
                self.hint,
            )
        self._followed.add(token)
