"""The forwarding hot path: a forwarder per route, over that route's aiohttp ClientSession.

Each request goes to the upstream base URL plus the raw path (less the route prefix, when stripped) and
query, byte for byte, with the token
header replaced, and the answer streams back untouched. This is the one place where failures become
the sidecar's own answers: 503 no token, 502 upstream unreachable or broken, 504 upstream timed out.

A 401 from API Gateway's authorizer for a token the sidecar believed valid drops that token, refreshes
once (shared with every other request) and replays the request once, when its body was small enough
to keep; a second 401 goes back to the client as it is.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp
from yarl import URL

from proxy.credentials import Secret
from proxy.errors import TokenError, error_body
from proxy.headers import downstream_response_headers, request_body_length, upstream_request_headers
from proxy.tokens import Token
from proxy.types import Receive, Scope, Send

log = logging.getLogger("proxy.forward")

# Request bodies up to this size are kept in memory so that a request refused with 401 can be replayed
# after a refresh; larger or unannounced (chunked) bodies stream and are never replayed.
REPLAY_BODY_LIMIT = 64 * 1024
# How much of a response body may wait in memory per request (aiohttp stops reading the upstream at twice
# this): large enough that a download moves in big chunks (64 KiB chunks capped a 1 GiB download near
# 300 MB/s), small enough that a slow client holds little memory. Measured side by side (5 alternating
# 1 GiB downloads each): 256 KiB 1,312 MB/s and 3.1 MiB peak RSS growth, 512 KiB 1,361 and 5.0,
# 1 MiB 1,417 and 8.9. Not worth 3x the memory per slow client.
STREAM_BUFFER = 256 * 1024
# An authorizer's 401 body is a few dozen bytes; it is kept to pass on if the replay cannot happen.
MAX_401_BODY = 64 * 1024


class TokenSource(Protocol):
    """What a forwarder is handed: something that yields a valid token (and hears when one was refused)."""

    async def get(self) -> Token: ...

    def invalidate(self, token: Token) -> None: ...


class ClientGone(Exception):
    """The client disconnected while its request body was being read."""


def _authorizer_refused(response: aiohttp.ClientResponse) -> bool:
    """Whether a 401 comes from API Gateway's authorizer (as opposed to the integration behind it)."""
    error_type = response.headers.get("x-amzn-ErrorType", "")
    return error_type.startswith("UnauthorizedException") or "invalid_token" in response.headers.get(
        "www-authenticate", ""
    )


class Forwarder:
    """Forwards requests (``forward``, called with the ASGI scope, receive and send) to ``upstream_url`` with a
    token from ``tokens``."""

    def __init__(
        self,
        *,
        upstream_url: str,
        tokens: TokenSource,
        header: str,
        header_prefix: str = "",
        strip_prefix: str = "",
        connect_timeout: float,
        read_timeout: float,
        pool_timeout: float,
        max_connections: int,
        api_key: Secret | None = None,
    ) -> None:
        parts = urlsplit(upstream_url)
        self._scheme = parts.scheme
        self._host = parts.hostname or ""
        self._port = parts.port
        self._base_path = parts.path.rstrip("/")
        self._tokens = tokens
        self._header = header.lower()
        self._prefix = header_prefix
        self._strip = len(strip_prefix.rstrip("/"))
        self._api_key = api_key
        self._extra = self._extra_headers()
        # Names a client may not set (the sidecar sets them), and the headers set for the current token:
        # built once per token, not per request.
        self._replaced = frozenset(name.encode("latin-1") for name, _ in ((self._header, ""), *self._extra))
        self._token_headers: tuple[Token, tuple[tuple[str, str], ...]] | None = None
        # connect covers waiting for a pooled connection plus opening one; sock_read bounds every wait for
        # upstream bytes, the status line included.
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=pool_timeout + connect_timeout, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self.replays = 0
        # The sidecar's own error answers by code, for /-/metrics; counted off the success path only.
        self.errors: Counter[str] = Counter()

    def _extra_headers(self) -> tuple[tuple[str, str], ...]:
        # API Gateway usage plans: the configured key replaces any the client sent.
        return (("x-api-key", self._api_key.value),) if self._api_key else ()

    def _headers_for(self, token: Token) -> tuple[tuple[str, str], ...]:
        cached = self._token_headers
        if cached is not None and cached[0] is token:
            return cached[1]
        headers = ((self._header, self._prefix + token.value), *self._extra)
        self._token_headers = (token, headers)
        return headers

    def reload_secrets(self) -> bool:
        """Re-read the API key file (SIGHUP); True when it changed."""
        if self._api_key is None or not self._api_key.reload():
            return False
        self._extra = self._extra_headers()
        self._token_headers = None
        return True

    async def open(self) -> None:
        """Create the client session (one per route); called from the app's lifespan, inside the running loop."""
        connector = aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,
            # No cookie jar: one client's upstream cookies must never reach another client.
            cookie_jar=aiohttp.DummyCookieJar(),
            # The client's own headers pass as they are; nothing is added on its behalf.
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            trust_env=False,
            read_bufsize=STREAM_BUFFER,
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _url(self, scope: Scope) -> URL:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
        path = raw_path[self._strip :].decode("ascii") if self._strip else raw_path.decode("ascii")
        if self._strip and not path.startswith("/"):
            path = "/" + path
        if not path.startswith("/"):
            raise ValueError("request target must be a path")
        # Built from parts: nothing in the request (absolute-form, //host, @, backslashes, %2F) can change
        # the host. encoded=True keeps the path and query byte for byte.
        return URL.build(
            scheme=self._scheme,
            host=self._host,
            port=self._port,
            path=self._base_path + path,
            query_string=scope["query_string"].decode("ascii"),
            encoded=True,
        )

    async def forward(self, scope: Scope, receive: Receive, send: Send) -> int:
        """Forward one request; returns the status sent to the client (0 if the client left before one was)."""
        session = self._session
        if session is None:
            return await self._error(
                send, 503, "not_ready", "the sidecar is starting or stopping; try again in a moment"
            )
        try:
            url = self._url(scope)
        except (ValueError, UnicodeDecodeError):
            return await self._error(
                send, 400, "bad_request", "the request target must be a plain ASCII path such as /items?id=1"
            )

        headers_in = scope["headers"]
        body: bytes | AsyncIterator[bytes] | None = None
        replayable = True
        length = request_body_length(headers_in)
        if length != 0:
            if length is not None and length <= REPLAY_BODY_LIMIT:
                try:
                    body = await _read_body(receive, limit=length)
                except ClientGone:
                    return 0
            else:
                body = _stream_body(receive)
                replayable = False

        try:
            token = await self._tokens.get()
        except TokenError as exc:
            return await self._error(send, 503, exc.code, f"no token could be had: {exc}")

        response = await self._send_upstream(session, scope, url, headers_in, token, body, send)
        if isinstance(response, int):
            return response
        try:
            if response.status == 401 and replayable and _authorizer_refused(response):
                replayed = await self._replay_after_401(session, scope, url, headers_in, token, body, response, send)
                if isinstance(replayed, int):
                    return replayed
                response.release()
                response = replayed
            return await self._relay(response, send)
        finally:
            response.release()

    async def _send_upstream(
        self,
        session: aiohttp.ClientSession,
        scope: Scope,
        url: URL,
        headers_in: list[tuple[bytes, bytes]],
        token: Token,
        body: bytes | AsyncIterator[bytes] | None,
        send: Send,
    ) -> aiohttp.ClientResponse | int:
        """The upstream's response, or the status of the error already sent in its place (0: client gone)."""
        client = scope.get("client")
        headers = upstream_request_headers(
            headers_in,
            replaced=self._replaced,
            set_headers=self._headers_for(token),
            client_host=client[0] if client else None,
            scheme=scope.get("scheme", "http"),
        )
        try:
            return await session.request(
                scope["method"], url, headers=headers, data=body, allow_redirects=False, compress=None
            )
        except ClientGone:
            return 0
        except (aiohttp.ServerTimeoutError, TimeoutError):
            return await self._error(
                send, 504, "upstream_timeout", f"the upstream {self._host} did not answer in time; try again later"
            )
        except aiohttp.ClientConnectorError as exc:
            return await self._error(
                send,
                502,
                "upstream_unreachable",
                f"could not connect to the upstream {self._host} ({_reason(exc)}); check SIDECAR_UPSTREAM_URL and "
                "the network",
            )
        except aiohttp.ClientError as exc:
            return await self._error(
                send, 502, "upstream_error", f"the upstream {self._host} broke the connection ({_reason(exc)})"
            )

    async def _replay_after_401(
        self,
        session: aiohttp.ClientSession,
        scope: Scope,
        url: URL,
        headers_in: list[tuple[bytes, bytes]],
        token: Token,
        body: bytes | AsyncIterator[bytes] | None,
        refused: aiohttp.ClientResponse,
        send: Send,
    ) -> aiohttp.ClientResponse | int:
        # Keep the 401 to hand back unchanged if no better token can be had.
        refused_body = await refused.content.read(MAX_401_BODY)
        self._tokens.invalidate(token)
        try:
            fresh = await self._tokens.get()
        except TokenError:
            fresh = token
        if fresh is token or fresh.value == token.value:
            await _send_buffered(refused, refused_body, send)
            return refused.status
        self.replays += 1
        log.info("API Gateway refused the token; refreshed and replaying %s once", scope["method"])
        return await self._send_upstream(session, scope, url, headers_in, fresh, body, send)

    async def _error(self, send: Send, status: int, code: str, detail: str) -> int:
        self.errors[code] += 1
        await send_error(send, status, code, detail)
        return status

    async def _relay(self, response: aiohttp.ClientResponse, send: Send) -> int:
        status = response.status
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": downstream_response_headers(response.raw_headers),
            }
        )
        content = response.content
        try:
            while chunk := await content.readany():
                # A body that is all in hand (the usual small answer) goes out as the last message at once.
                last = content.at_eof()
                await send({"type": "http.response.body", "body": chunk, "more_body": not last})
                if last:
                    return status
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The status line is gone already: end the connection without the final chunk, so the client sees
            # a broken response rather than a truncated one that looks complete.
            log.warning(
                "upstream %s broke off the response body (%s); closing the client connection", self._host, _reason(exc)
            )
            return status
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return status


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


async def _read_body(receive: Receive, *, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ClientGone  # more than announced: the server would have refused it already
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _stream_body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def _send_buffered(response: aiohttp.ClientResponse, body: bytes, send: Send) -> None:
    headers = [(k, v) for k, v in downstream_response_headers(response.raw_headers) if k != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_error(send: Send, status: int, code: str, detail: str) -> None:
    body = error_body(code, detail)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"x-sidecar-error", code.encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


__all__ = ["Forwarder", "TokenSource"]
