"""The upstreams' HTTP client: a route's aiohttp session (``UpstreamClient``), its requests sent below
``ClientSession.request``, and aiohttp's request with what the forwarder asks of it done once
(``ForwardedRequest``).

``ClientSession.request`` is a general client's front door: some forty keyword parameters merged with the
session's defaults, then a base URL, cookies, auth from the URL or a netrc file, proxies from the environment,
redirects, middlewares, traces and a total timeout, around the few steps that send a request. The forwarder uses
none of those (no redirects, no cookie jar, no auth, no environment, no middlewares or traces, no total timeout:
``proxy.upstream.Timeouts`` bound each wait instead), and going through them cost 65,000 of the 558,000
instructions a forwarded request took (``bench/cost.py``). ``UpstreamClient.send`` takes the steps that remain,
as aiohttp takes them:
- a connection from the pool, or a new one (through the egress proxy, if any) within the connect timeouts;
- the response parser, with the read timeout and aiohttp's default limits on the head;
- the request written, the response head read;
- an idempotent request whose pooled connection the upstream had closed (a keep-alive race, RFC 9112 9.3.1) is
  sent once more on a new connection, with the same body;
- an ``OSError`` on the way is a ``ClientOSError``, a connect that timed out a ``ConnectionTimeoutError``.
``tests/unit/test_aiohttp_internals.py`` checks that aiohttp still takes these steps, and that both ways put the
same bytes on the wire.

Imports nothing from the package.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Mapping, Sequence

import aiohttp
from aiohttp import hdrs
from aiohttp.helpers import TimerNoop
from aiohttp.payload import Payload
from aiohttp.typedefs import LooseHeaders
from multidict import CIMultiDict
from yarl import URL

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
    those given in one ``extend``, whatever form they come in (``UpstreamClient.send`` passes its list as it is)."""

    def update_headers(self, headers: LooseHeaders | None) -> None:
        built: CIMultiDict[str] = CIMultiDict({hdrs.HOST: self.url.host_port_subcomponent or ""})
        if headers:
            built.extend(headers)
        if len(built.getall(hdrs.HOST)) > 1:  # a Host given (never the sidecar's): aiohttp puts it in the URL's place
            super().update_headers(headers)
            return
        self.headers = built

    def update_auto_headers(self, skip_auto_headers: object) -> None:
        # skip_auto_headers is the session's SKIPPED_AUTO_HEADERS (no request passes its own); aiohttp only reads
        # the table it leaves (tests/unit/test_aiohttp_internals.py compares the two classes).
        self._skip_auto_headers = _SKIPPED


# Methods aiohttp sends again when their pooled connection turns out closed (its IDEMPOTENT_METHODS).
RETRIED_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# aiohttp's defaults for a session's response parser: the longest status or header line, and the most headers.
MAX_LINE_SIZE = 8190
MAX_FIELD_SIZE = 8190
MAX_HEADERS = 128
# Timeouts of this many seconds or more end on a whole second of the loop's clock, so that their timers share
# wake-ups (aiohttp's default).
CEIL_THRESHOLD = 5.0
# No total timeout: a response streams for as long as its bytes keep coming within the read timeout.
_NO_TIMER = TimerNoop()

# What a request sends: nothing, bytes, a stream, or (sent again) the payload aiohttp made of one of them.
Body = bytes | AsyncIterator[bytes] | Payload | None


class UpstreamClient:
    """One route's pool of upstream connections (at most ``max_connections``), and the requests sent on it.

    Built inside the running loop. ``timeout``'s ``connect`` bounds the wait for a connection, pooled or new,
    ``sock_connect`` a new one's handshake and ``sock_read`` every wait for upstream bytes; it has no total.
    ``proxy`` is the egress proxy every request goes through (None: direct), with its ``proxy_headers``."""

    def __init__(
        self,
        *,
        timeout: aiohttp.ClientTimeout,
        max_connections: int,
        proxy: URL | None = None,
        proxy_headers: Mapping[str, str] | None = None,
    ) -> None:
        self._connector = aiohttp.TCPConnector(
            limit=max_connections,
            limit_per_host=0,
            enable_cleanup_closed=True,
            timeout_ceil_threshold=CEIL_THRESHOLD,
        )
        self._timeout = timeout
        self._proxy = proxy
        self._proxy_headers = proxy_headers
        self._loop = asyncio.get_running_loop()
        # The session owns the pool and closes it; requests are sent below it (``send``), so its settings only say
        # what aiohttp's own requests on it would do: the same.
        self.session = aiohttp.ClientSession(
            connector=self._connector,
            timeout=timeout,
            auto_decompress=False,
            # No cookie jar: one client's upstream cookies must never reach another client.
            cookie_jar=aiohttp.DummyCookieJar(),
            # The client's own headers pass as they are; nothing is added on its behalf.
            skip_auto_headers=SKIPPED_AUTO_HEADERS,
            request_class=ForwardedRequest,
            trust_env=False,
            read_bufsize=STREAM_BUFFER,
        )

    async def aclose(self) -> None:
        await self.session.close()

    def _request(
        self, method: str, url: URL, headers: Sequence[tuple[str, str]], body: Body, tls: ssl.SSLContext | bool
    ) -> ForwardedRequest:
        return ForwardedRequest(
            method,
            url,
            headers=headers,
            data=body,
            loop=self._loop,
            proxy=self._proxy,
            proxy_headers=self._proxy_headers,
            timer=_NO_TIMER,
            session=self.session,
            ssl=tls,
        )

    async def send(
        self, method: str, url: URL, headers: Sequence[tuple[str, str]], body: Body, tls: ssl.SSLContext | bool
    ) -> aiohttp.ClientResponse:
        """Send a request and read the response's head; the body is the caller's to read (and the response's to
        release). ``headers`` must not hold a Host: the upstream's own is sent. ``tls``: the context to verify the
        upstream (or the egress proxy) with, True for none of the sidecar's own. Raises ``aiohttp.ClientError``
        and ``TimeoutError`` as ``ClientSession.request`` would."""
        request = self._request(method, url, headers, body, tls)
        retry = method in RETRIED_METHODS
        try:
            while True:
                try:
                    return await self._exchange(request)
                except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
                    raise  # no connection was had: nothing to retry on another
                except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
                    if not retry:
                        raise
                    retry = False
                    if body is not None:
                        # The payload rewinds itself once the cancelled writer has settled; a streamed one that was
                        # consumed cannot be sent again.
                        await request.close()
                        if request._body is not None and request._body.consumed:
                            raise
                        body = request._body
                    request = self._request(method, url, headers, body, tls)
                except aiohttp.ClientError:
                    raise
                except OSError as exc:
                    if exc.errno is None and isinstance(exc, TimeoutError):
                        raise
                    raise aiohttp.ClientOSError(*exc.args) from exc
        finally:
            if request._body is not None:
                await request._body.close()

    async def _exchange(self, request: ForwardedRequest) -> aiohttp.ClientResponse:
        try:
            connection = await self._connector.connect(request, traces=[], timeout=self._timeout)
        except TimeoutError as exc:
            raise aiohttp.ConnectionTimeoutError(f"Connection timeout to host {request.url}") from exc
        assert connection.protocol is not None
        connection.protocol.set_response_params(
            timer=_NO_TIMER,
            skip_payload=request.method == hdrs.METH_HEAD,
            read_until_eof=True,
            auto_decompress=False,
            read_timeout=self._timeout.sock_read,
            read_bufsize=STREAM_BUFFER,
            timeout_ceil_threshold=CEIL_THRESHOLD,
            max_line_size=MAX_LINE_SIZE,
            max_field_size=MAX_FIELD_SIZE,
            max_headers=MAX_HEADERS,
        )
        try:
            response = await request.send(connection)
            try:
                await response.start(connection)
            except BaseException:
                response.close()
                raise
        except BaseException:
            connection.close()
            raise
        return response


__all__ = ["RETRIED_METHODS", "SKIPPED_AUTO_HEADERS", "STREAM_BUFFER", "ForwardedRequest", "UpstreamClient"]
