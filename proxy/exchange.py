"""One request through a route's ``Forwarder``: read the body, send it upstream with the token, relay the answer,
and what each way it can fail means (a ``Refusal`` with the sidecar's code, or ``ClientGone``)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import aiohttp
from yarl import URL

from proxy.egress.client import UpstreamClient
from proxy.egress.failures import EgressFailure, describe_failure, proxy_refusal
from proxy.errors import CLOSE, Refusal, TokenError
from proxy.headers import downstream_response_headers, request_body_length, upstream_request_headers
from proxy.logs import event
from proxy.request import REQUEST_ID_HEADER, SANE_REQUEST_ID, RequestRecord
from proxy.tokens.token import Token
from proxy.types import Receive, Scope, Send

if TYPE_CHECKING:
    from proxy.forward import Forwarder

log = logging.getLogger("proxy.forward")


# Request bodies up to this size are kept in memory so that a request refused with 401 can be replayed
# after a refresh; larger or unannounced (chunked) bodies stream and are never replayed.
REPLAY_BODY_LIMIT = 64 * 1024
# A streamed upload must average at least this many bytes a second once the read timeout has passed: a client
# sending a byte just inside the stall timeout would otherwise hold an upload slot and an upstream connection
# for as long as it likes. 1 KiB/s is far below any real network.
MIN_UPLOAD_RATE = 1024

_BAD_LENGTH = "Content-Length must be the body's size in plain digits, without spaces or signs"


class ClientGone(Exception):
    """The client disconnected while its request body was being read."""


# Methods that may be sent twice: RFC 9110 9.2.2. A POST refused with 401 goes back as it came.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


def _authorizer_refused(response: aiohttp.ClientResponse) -> bool:
    """Whether a 401 comes from API Gateway's authorizer (as opposed to the integration behind it)."""
    error_type = response.headers.get("x-amzn-ErrorType", "")
    return error_type.startswith("UnauthorizedException") or "invalid_token" in response.headers.get(
        "www-authenticate", ""
    )


class Exchange:
    """One request through a ``Forwarder``: read the body, send it upstream with the token, relay the answer.

    Every failure is raised as ``Refusal``; ``record`` holds what was sent to the client so far.
    """

    __slots__ = (
        "body",
        "body_failure",
        "forwarder",
        "method",
        "receive",
        "record",
        "replayable",
        "scope",
        "send",
        "slot",
    )

    def __init__(self, forwarder: Forwarder, scope: Scope, receive: Receive, send: Send, record: RequestRecord) -> None:
        self.forwarder = forwarder
        self.scope = scope
        self.receive = receive
        self.send = send
        self.record = record
        self.method: str = scope["method"]
        self.body: bytes | AsyncIterator[bytes] | None = None
        self.replayable = self.method in IDEMPOTENT_METHODS
        self.slot = False
        self.body_failure: Refusal | ClientGone | None = None

    async def run(self) -> None:
        forwarder = self.forwarder
        upstream = forwarder.client
        if upstream is None:
            raise Refusal(503, "not_ready", "the sidecar is starting or stopping; try again in a moment")
        if forwarder.methods is not None or forwarder.paths is not None:
            refused = forwarder.refusal(self.method, self.scope.get("raw_path") or b"")
            if refused is not None:
                raise refused
        url = forwarder.url(self.scope)
        try:
            length = request_body_length(self.scope["headers"])
        except ValueError:
            raise Refusal(400, "bad_request", _BAD_LENGTH) from None
        limit = forwarder.max_body_bytes
        if length and limit and length > limit:
            raise _too_large(limit)
        if length != 0:
            if length is not None and length <= REPLAY_BODY_LIMIT:
                self.body = await _read_body(self.receive, limit=length, stall=forwarder.read_timeout)
                self.record.bytes_in = len(self.body)
            else:
                await self._upload_slot()
                self.body = self._stream_body(limit)
                self.replayable = False  # a streamed body cannot be sent twice

        try:
            await self._exchange(upstream, url)
        finally:
            if self.slot:
                forwarder.upload_slots.release()

    async def _upload_slot(self) -> None:
        slots = self.forwarder.upload_slots
        try:
            await asyncio.wait_for(slots.acquire(), self.forwarder.pool_wait)
        except TimeoutError:
            raise Refusal(
                503,
                "too_many_uploads",
                "half the upstream connections carry streamed uploads already (the other half stay free for other "
                "requests); retry shortly",
            ) from None
        self.slot = True

    async def _stream_body(self, limit: int) -> AsyncIterator[bytes]:
        """The request body as it arrives, cut off (and the upstream request aborted) past ``limit`` bytes, when
        the client stalls for longer than the read timeout, or when it falls below ``MIN_UPLOAD_RATE`` on average
        once the read timeout has passed."""
        stall = self.forwarder.read_timeout
        record = self.record
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            try:
                # The time left before the average rate falls below the minimum, if that comes before a stall.
                allowance = stall + record.bytes_in / MIN_UPLOAD_RATE - (loop.time() - started)
                if allowance < stall:
                    chunk, more = await _next_chunk(self.receive, allowance, _too_slow(stall))
                else:
                    chunk, more = await _next_chunk(self.receive, stall)
                record.bytes_in += len(chunk)
                if limit and record.bytes_in > limit:
                    raise _too_large(limit)
            except (Refusal, ClientGone) as failure:
                self.body_failure = failure  # what the client hears, however aiohttp wraps it
                raise
            if chunk:
                yield chunk
            if not more:
                return

    async def _exchange(self, upstream: UpstreamClient, url: URL) -> None:
        forwarder = self.forwarder
        tokens = forwarder.tokens
        try:
            token = await tokens.get()
        except TokenError as exc:
            raise Refusal(503, exc.code, f"no token could be had: {exc}") from None
        response = await self._send_upstream(upstream, url, token)
        try:
            if response.status == 407 and forwarder.proxy is not None:  # http:// upstream: the proxy answered
                raise _egress_failure(forwarder, proxy_refusal(forwarder.proxy, 407, forwarder.target))
            if response.status == 401 and _authorizer_refused(response):
                if not self.replayable:
                    tokens.refused(token)
                elif (fresh := await tokens.replacement(token)) is not None:
                    forwarder.replays += 1
                    log.info(
                        "API Gateway refused the token; replaying %s once with a new one",
                        self.method,
                        extra=event("upstream_replay"),
                    )
                    response.release()
                    response = await self._send_upstream(upstream, url, fresh)
            await self._relay(response)
        finally:
            response.release()

    async def _send_upstream(self, upstream: UpstreamClient, url: URL, token: Token) -> aiohttp.ClientResponse:
        forwarder = self.forwarder
        scope = self.scope
        client = scope.get("client")
        headers = upstream_request_headers(
            scope["headers"],
            replaced=forwarder.replaced,
            set_headers=forwarder.headers_for(token),
            client_host=client[0] if client else None,
            scheme=scope.get("scheme", "http"),
        )
        record = self.record
        headers.append(("x-request-id", record.request_id))
        tracing = forwarder.tracing
        span = tracing.start_upstream(self.method, str(url), headers) if tracing is not None else None
        sent = time.perf_counter()
        try:
            response = await upstream.send(self.method, url, headers, self.body, forwarder.ssl_context)
        except (aiohttp.ClientError, TimeoutError, Refusal, ClientGone) as exc:
            # A failure of the request body (too large, stalled, client gone) is what the client hears about,
            # however the client library wrapped it.
            failure: Refusal | ClientGone
            if self.body_failure is not None:
                failure = self.body_failure
            elif isinstance(exc, Refusal | ClientGone):
                failure = exc
            else:
                failure = _upstream_failure(exc, forwarder)
            if tracing is not None and span is not None:
                tracing.end_upstream(span, None, failure.code if isinstance(failure, Refusal) else "client_gone")
            if failure is exc:
                raise
            raise failure from None
        finally:
            waited = time.perf_counter() - sent
            record.upstream_seconds = waited + (record.upstream_seconds or 0.0)
        if tracing is not None and span is not None:
            tracing.end_upstream(span, response.status)
        return response

    async def _relay(self, response: aiohttp.ClientResponse) -> None:
        send = self.send
        record = self.record
        headers, upstream_id = downstream_response_headers(response.raw_headers)
        if upstream_id and SANE_REQUEST_ID.fullmatch(upstream_id):
            record.upstream_request_id = upstream_id.decode("ascii")
        headers.append((REQUEST_ID_HEADER, record.request_id.encode()))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        record.status = response.status
        record.source = "upstream"
        content = response.content
        try:
            while chunk := await content.readany():
                record.bytes_out += len(chunk)
                # A body that is all in hand (the usual small answer) goes out as the last message at once.
                last = content.at_eof()
                await send({"type": "http.response.body", "body": chunk, "more_body": not last})
                if last:
                    return
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Refusal(
                502, "upstream_broke_off", f"the upstream broke off the response body ({_reason(exc)})"
            ) from None
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _upstream_failure(exc: BaseException, forwarder: Forwarder) -> Refusal:
    """The one mapping from an upstream client failure to the sidecar's answer."""
    host = forwarder.host
    failure = describe_failure(
        exc,
        target=forwarder.target,
        what="upstream",
        proxy=forwarder.proxy,
        proxy_status=exc.status if isinstance(exc, aiohttp.ClientHttpProxyError) else None,
        connect_error=isinstance(exc, aiohttp.ClientConnectorError),
        trust_setting="SIDECAR_CA_FILE (per route: ca_file)",
    )
    if failure is not None:
        return _egress_failure(forwarder, failure)
    if isinstance(exc, aiohttp.ServerTimeoutError | TimeoutError):
        return Refusal(
            504,
            "upstream_timeout",
            f"the upstream {host} did not answer in time (or no connection to it was free within "
            f"{forwarder.pool_wait:g} s); try again later",
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        return Refusal(
            502,
            "upstream_unreachable",
            f"could not connect to the upstream {host} ({_reason(exc)}); check SIDECAR_UPSTREAM_URL and the network",
        )
    return Refusal(502, "upstream_error", f"the upstream {host} broke the connection ({_reason(exc)})")


def _egress_failure(forwarder: Forwarder, failure: EgressFailure) -> Refusal:
    forwarder.egress_failures[failure.code] += 1
    return Refusal(502, failure.code, f"{failure.summary}; {failure.fix}")


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def _too_large(limit: int) -> Refusal:
    return Refusal(
        413,
        "body_too_large",
        f"the request body is larger than {limit} bytes (SIDECAR_MAX_BODY_BYTES; API Gateway's own payload limit "
        "is 10 MB)",
    )


def _stalled(seconds: float) -> Refusal:
    return Refusal(408, "body_timeout", f"the request body stalled for more than {seconds:g} s", CLOSE)


def _too_slow(seconds: float) -> Refusal:
    return Refusal(
        408,
        "body_too_slow",
        f"the request body arrived at less than {MIN_UPLOAD_RATE} bytes a second on average after {seconds:g} s",
        CLOSE,
    )


async def _next_chunk(receive: Receive, stall: float, late: Refusal | None = None) -> tuple[bytes, bool]:
    """The next piece of the request body and whether more follows; ``late`` (by default 408 ``body_timeout``)
    when nothing comes within ``stall`` seconds, ``ClientGone`` when the client leaves."""
    try:
        async with asyncio.timeout(max(stall, 0.0)):
            message = await receive()
    except TimeoutError:
        raise (late or _stalled(stall)) from None
    if message["type"] == "http.disconnect":
        raise ClientGone
    return message.get("body", b""), message.get("more_body", False)


async def _read_body(receive: Receive, *, limit: int, stall: float) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk, more = await _next_chunk(receive, stall)
        size += len(chunk)
        if size > limit:
            raise ClientGone  # more than announced: the server would have refused it already
        chunks.append(chunk)
        if not more:
            return b"".join(chunks)


__all__ = ["ClientGone", "Exchange"]
