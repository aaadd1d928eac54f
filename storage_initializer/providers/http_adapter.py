"""requests' ``HTTPAdapter``, with sockets that keep TCP urgent data in the byte stream.

Why: by default Linux takes a byte sent as TCP urgent data (``MSG_OOB``) out of the stream, so
``recv`` skips it and every later byte of a body arrives one position early. A checksum
catches that where the source announces one; a plain http(s) file without one would be
published shifted. ``SO_OOBINLINE`` leaves the byte where the server put it. The lean path
(``lean_http``) sets the option on its own sockets; the SDK paths built on requests (the
``http(s)://`` provider's fallback and redirects, GCS, Azure) take their adapters from here.
"""

from __future__ import annotations

import socket
from typing import Any

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection

SOCKET_OPTIONS = [
    *(HTTPConnection.default_socket_options or []),
    (socket.SOL_SOCKET, socket.SO_OOBINLINE, 1),
]


class StreamAdapter(HTTPAdapter):
    """An ``HTTPAdapter`` whose connections (direct and through a proxy) use
    :data:`SOCKET_OPTIONS`."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("socket_options", SOCKET_OPTIONS)
        super().init_poolmanager(*args, **kwargs)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        proxy_kwargs.setdefault("socket_options", SOCKET_OPTIONS)
        return super().proxy_manager_for(proxy, **proxy_kwargs)
