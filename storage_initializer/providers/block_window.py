"""Taking bytes ``[start, end)`` out of a stream of blocks that may start early.

A server that ignores ``Range`` (or a GCS object served decompressed) answers with the whole
object, so the reader drops the first ``skip`` bytes itself; and it stops after the wanted length
rather than read (and write at the wrong offset) what follows. S3 and GCS reads did this in two
copies of one loop; :mod:`ranged` does the same for ``requests`` answers with Content-Range checks,
and :mod:`lean_http` for the lean GETs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator


def take_window(blocks: Iterable[bytes], skip: int, remaining: int | None) -> Iterator[bytes]:
    """The bytes of ``blocks`` after the first ``skip``, at most ``remaining`` of them (None: all).

    Stops pulling blocks as soon as ``remaining`` bytes are out, so the source is not read past
    the window.
    """
    if remaining is not None and remaining <= 0:
        return
    for block in blocks:
        if skip:
            cut = min(skip, len(block))
            block = block[cut:]
            skip -= cut
            if not block:
                continue
        if remaining is not None:
            block = block[:remaining]
            remaining -= len(block)
        yield block
        if remaining == 0:
            return
