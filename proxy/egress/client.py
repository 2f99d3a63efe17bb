"""The upstreams' HTTP client: aiohttp's, with what the forwarder asks of its requests done once.

Imports nothing from the package.
"""

from __future__ import annotations

import aiohttp
from aiohttp import hdrs
from aiohttp.typedefs import LooseHeaders
from multidict import CIMultiDict

# How much of a response body may wait in memory per request (aiohttp stops reading the upstream at twice
# this): large enough that a download moves in big chunks (64 KiB chunks capped a 1 GiB download near
# 300 MB/s), small enough that a slow client holds little memory. Measured side by side (5 alternating
# 1 GiB downloads each): 256 KiB 1,312 MB/s and 3.1 MiB peak RSS growth, 512 KiB 1,361 and 5.0,
# 1 MiB 1,417 and 8.9. Not worth 3x the memory per slow client.
STREAM_BUFFER = 256 * 1024


# The headers aiohttp would add on a client's behalf (what it may add for a body, Content-Type, included): none is
# added, so that what the client sent goes upstream as it came.
SKIPPED_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
_SKIPPED: CIMultiDict[None] = CIMultiDict((name, None) for name in sorted(SKIPPED_AUTO_HEADERS))


class ForwardedRequest(aiohttp.ClientRequest):
    """aiohttp's request, with its two header steps done once rather than per request: the skipped automatic
    headers are one shared table (aiohttp sorts and copies them per request), and the headers are the Host plus
    those given in one ``extend`` (the sidecar never passes its own Host)."""

    def update_headers(self, headers: LooseHeaders | None) -> None:
        if not isinstance(headers, CIMultiDict) or hdrs.HOST in headers:
            super().update_headers(headers)
            return
        self.headers = CIMultiDict({hdrs.HOST: self.url.host_port_subcomponent or ""})
        self.headers.extend(headers)

    def update_auto_headers(self, skip_auto_headers: object) -> None:
        # skip_auto_headers is the session's SKIPPED_AUTO_HEADERS (no request passes its own); aiohttp only reads
        # the table it leaves (tests/unit/test_aiohttp_internals.py compares the two classes).
        self._skip_auto_headers = _SKIPPED


__all__ = ["SKIPPED_AUTO_HEADERS", "STREAM_BUFFER", "ForwardedRequest"]
