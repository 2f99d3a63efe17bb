"""What a client connection may cost: the limits enforced below the app, in uvicorn's httptools protocol.

uvicorn sets none of these itself (measured: 2,000 idle sockets all open after 85 s, a slowloris sending a
header line every 10 s connected for 100 s, a 64 MiB header block taking 240 MiB of memory):

- at most ``max_clients`` connections: one more gets 503 ``too_many_clients`` and is closed at once,
  rather than queued behind the others;
- a request head (request line and headers) must arrive whole within ``HEAD_TIMEOUT`` of the connection
  opening or of its first byte (408 ``request_timeout``, or a plain close when nothing was sent);
- a head larger than ``max_header_bytes`` gets 431 ``headers_too_large`` as soon as it crosses the limit;
- chunked trailers are dropped: httptools reports them like headers, and uvicorn would append them to
  the request's headers, which the forwarder may still be reading;
- a request httptools cannot parse, or one asking to upgrade the connection (WebSocket, h2c), gets the
  sidecar's JSON 400 instead of uvicorn's plain text (or, for an upgrade, a forwarded request whose body
  the parser would never read).

Idle keep-alive connections close after ``KEEP_ALIVE_TIMEOUT`` (uvicorn's own timer). Every refusal is
counted in ``ConnectionLimits.errors`` (shown as ``sidecar_errors_total{code}``) and logged, at most one
line per code per ``LOG_INTERVAL``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import httptools

from proxy.errors import Refusal, error_body
from proxy.listen import in_networks
from proxy.server.coalesce import CoalescingHttpToolsProtocol

# A request head (request line and headers) larger than this gets 431. API Gateway's own limit is 10 KiB,
# so a larger head could never be served anyway; 16 KiB leaves room for the headers the sidecar removes.
DEFAULT_MAX_HEADER_BYTES = 16 * 1024
# Client connections open at once; beyond it new ones are refused at once. Enough for any one legacy host
# (each holds ~10 KiB), few enough that a flood cannot exhaust file descriptors or memory.
DEFAULT_MAX_CLIENTS = 1000

log = logging.getLogger("proxy.refused")

# A legacy client sends its whole request head in one write; 10 s is generous for any real network and
# short enough that a slowloris holds a socket for seconds, not minutes.
HEAD_TIMEOUT = 10.0
# An idle keep-alive connection is closed after this. Longer than the 60 s idle timeout of common clients
# and load balancers, so the client closes first and never reuses a connection the sidecar is closing.
KEEP_ALIVE_TIMEOUT = 75
# After a refusal, what the client still sends is read and dropped for up to this long before the connection
# closes: closing with unread data makes the kernel send a reset, and the client would lose the answer.
LINGER_TIMEOUT = 2.0
# Refusals log one line per code per this many seconds, with the count since: a flood must not flood the log.
LOG_INTERVAL = 10.0
# Requests a client may send ahead of their answers on one connection. httptools parses a whole read (up to
# 256 KiB) at once and uvicorn queues a request per complete head in it: without a bound, 255 KiB of tiny
# pipelined heads cost thousands of queued requests per connection. Past this the rest of the read is dropped,
# the last queued request is answered with Connection: close, and the client retries the unanswered ones on a
# new connection (RFC 9112 9.3.2). A connection then costs at most one read buffer and this many heads.
MAX_PIPELINED = 8

_REASONS = {400: b"Bad Request", 403: b"Forbidden", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}
_REASONS[503] = b"Service Unavailable"


@dataclass
class ConnectionLimits:
    """The limits above, and the counters their refusals go to (shared with the app's metrics)."""

    max_clients: int = DEFAULT_MAX_CLIENTS
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    head_timeout: float = HEAD_TIMEOUT
    keep_alive_timeout: int = KEEP_ALIVE_TIMEOUT
    # Peers that may connect at all (SIDECAR_ALLOW_FROM on a non-loopback listener); None: any.
    allow_from: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None = None
    errors: Counter[str] = field(default_factory=Counter)
    _logged: dict[str, tuple[float, int]] = field(default_factory=dict, repr=False)

    def refused(self, code: str, detail: str) -> None:
        """Count a connection's refusal and log it (``log_refusal``)."""
        self.errors[code] += 1
        self.log_refusal(code, detail)

    def log_refusal(self, code: str, detail: str) -> None:
        """Log a refusal, at most one line per code per ``LOG_INTERVAL`` (the app counts its own)."""
        now = time.monotonic()
        last, count = self._logged.get(code, (0.0, 0))
        if now - last >= LOG_INTERVAL:
            more = f" ({count} more since the last line)" if count else ""
            log.warning("%s: %s%s", code, detail, more)
            self._logged[code] = (now, 0)
        else:
            self._logged[code] = (last, count + 1)


def refusal_bytes(refusal: Refusal) -> bytes:
    """A whole HTTP/1.1 answer in the sidecar's JSON error format, closing the connection."""
    body = error_body(refusal.code, refusal.detail)
    head = (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nx-sidecar-error: %s\r\n"
        b"cache-control: no-store\r\nconnection: close\r\n\r\n"
        % (refusal.status, _REASONS.get(refusal.status, b"Error"), len(body), refusal.code.encode())
    )
    return head + body


class HeadMeter:
    """Where the parser is in the current read, so that heads are measured in the bytes that carried them,
    padding included (httptools hands over header values without their surrounding whitespace). ``at`` is None
    once the messages in the read cannot be followed: a chunked body, or a read that began mid-message (the
    parser callbacks' count stays then)."""

    __slots__ = ("at", "head_from", "in_message", "read")

    def __init__(self) -> None:
        self.read = b""
        self.at: int | None = None
        self.head_from = 0
        self.in_message = False

    def start(self, data: bytes) -> None:
        self.read, self.at = data, (None if self.in_message else 0)

    def message_begins(self) -> None:
        self.in_message = True
        at, read = self.at, self.read
        if at is not None:
            while at < len(read) and read[at] in b"\r\n":  # the parser skips blank lines between messages
                at += 1
            self.head_from = at

    def head_ends(self) -> int | None:
        """The size of the head that just ended, when it could be followed."""
        if self.at is None:
            return None
        end = self.read.find(b"\r\n\r\n", self.head_from)
        if end < 0:
            self.at = None
            return None
        self.at = end + 4
        return self.at - self.head_from


_TOO_MANY_PIPELINED = (
    f"a client sent more than {MAX_PIPELINED} requests ahead of their answers on one connection; the queued ones "
    "are answered and the connection closes"
)


def _not_allowed(peer: str) -> Refusal:
    detail = f"{peer} is not in SIDECAR_ALLOW_FROM; add its network there to let it use the sidecar"
    return Refusal(403, "client_not_allowed", detail)


def _too_many_clients(limit: int) -> Refusal:
    detail = f"the sidecar already serves {limit} connections (SIDECAR_MAX_CLIENTS); retry shortly"
    return Refusal(503, "too_many_clients", detail)


def _head_too_large(limit: int) -> Refusal:
    detail = (
        f"the request head is larger than {limit} bytes (SIDECAR_MAX_HEADER_BYTES; API Gateway itself refuses more "
        "than 10 KiB)"
    )
    return Refusal(431, "headers_too_large", detail)


class _PipelineFull(Exception):
    """Raised from a parser callback to stop parsing a read that holds too many pipelined requests."""


class LimitedHttpToolsProtocol(CoalescingHttpToolsProtocol):
    """uvicorn's httptools protocol (with coalesced writes) enforcing ``limits``; see the module docstring.

    Build a subclass bound to one ``ConnectionLimits`` with ``protocol_for``.
    """

    limits: ConnectionLimits = ConnectionLimits()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._in_head = True
        self._began = False
        self._head_bytes = 0
        self._head_started = False
        self._lingering = False
        self._discarding = False  # too many requests sent ahead: the rest of the connection is dropped
        self._meter = HeadMeter()
        self._refusal_after: Refusal | None = None  # answered once the response under way is complete
        self._served = False  # a request head has arrived on this connection
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_deadline = 0.0
        super().connection_made(transport)
        limits = self.limits
        if limits.allow_from is not None and self.client and not in_networks(self.client[0], limits.allow_from):
            self._refuse(_not_allowed(self.client[0]))  # before it costs a client slot:
            self.connections.discard(self)  # while it lingers for its answer, it holds none
            return
        if len(self.connections) > limits.max_clients:
            self._refuse(_too_many_clients(limits.max_clients))
            return
        self._head_deadline = self.loop.time() + limits.head_timeout
        self._head_timer = self.loop.call_at(self._head_deadline, self._head_expired)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering or self._discarding:
            return  # refused already: dropped, see LINGER_TIMEOUT and MAX_PIPELINED
        self._unset_keepalive_if_required()
        counted = self._in_head  # a read that starts inside a head and ends inside it is all head
        self._began = False
        self._meter.start(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as exc:
            refusal = exc.__context__
            if refusal is not None:  # its traceback would hold this frame and the read until a (rare) full GC
                refusal.__traceback__ = None
            if isinstance(refusal, _PipelineFull):
                return
            if isinstance(refusal, Refusal):
                self._refuse(refusal)
            else:
                self._refuse(Refusal(400, "bad_request", "the request is not valid HTTP/1.1"))
            return
        finally:
            self._meter.read = b""  # never kept past the read: an idle connection holds no buffer
        if counted and self._in_head and not self._began:
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                self._refuse(self._too_large())
        elif self._began and self._in_head:
            # A head that began in this read and goes on in the next: all of the read from its start is head (or,
            # when the read could not be followed, what the parser has reported of it).
            so_far = len(data) - self._meter.head_from if self._meter.at is not None else self._reported_head()
            self._head_bytes = max(self._head_bytes, so_far)
            if self._head_bytes > self.limits.max_header_bytes:
                self._refuse(self._too_large())
        if self.timeout_keep_alive_task is None and self._served and not self._head_started and not self.pipeline:
            cycle = self.cycle
            if cycle is None or cycle.response_complete:
                # Bytes that start no request (a CRLF between requests) cancelled the idle timer above: arm it again.
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive, self.timeout_keep_alive_handler
                )

    # Parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._meter.message_begins()
        self._in_head = True
        self._began = True
        self._head_started = True
        self._head_bytes = 0
        # One timer per connection, not per request: it checks the deadline when it fires and re-arms.
        self._head_deadline = self.loop.time() + self.limits.head_timeout
        if self._head_timer is None:
            self._head_timer = self.loop.call_at(self._head_deadline, self._head_expired)

    # No on_url or on_header of its own: a head's size is measured in the bytes of each read (a Python call per
    # header line cost 16k instructions a request). Chunked trailers, which httptools reports like headers, go
    # to a list of their own (see on_headers_complete).

    def on_headers_complete(self) -> None:
        size = self._meter.head_ends()
        if size is None:  # a head over several reads, or in a read that could not be followed
            size = max(self._head_bytes, self._reported_head())
        if size > self.limits.max_header_bytes:
            raise self._too_large()  # padding the parser does not report counts too
        self._in_head = False
        self._head_started = False
        self._served = True
        if self.parser.should_upgrade() and self.parser.get_method() != b"CONNECT":
            # WebSocket or h2c: the parser stops at the head, so no body or later request could be read safely.
            # (CONNECT goes on to the app, which refuses it with 405.)
            raise Refusal(
                400,
                "upgrade_not_supported",
                "the sidecar speaks HTTP/1.1 only: no WebSocket or h2c upgrade (API Gateway's Cognito authorizer "
                "cannot guard WebSockets either); send the request without Upgrade",
            )
        if len(self.pipeline) >= MAX_PIPELINED:
            self._stop_pipeline()
        super().on_headers_complete()
        # The request's scope holds the list its headers went to; trailers go to this one, which nobody reads.
        self.headers = []

    def _stop_pipeline(self) -> None:
        """Too many requests ahead of their answers: answer the queued ones, the last with Connection: close, drop
        the rest, and stop parsing this read (the exception ends ``feed_data``)."""
        self._discarding = True
        self.flow.pause_reading()
        newest, _ = self.pipeline[0]
        newest.keep_alive = False
        self.limits.refused("too_many_pipelined", _TOO_MANY_PIPELINED)
        raise _PipelineFull

    def on_body(self, body: bytes) -> None:
        if self._meter.at is not None:
            self._meter.at += len(body)
        super().on_body(body)

    def on_chunk_header(self) -> None:
        self._meter.at = None  # chunk sizes are not reported: the rest of this read cannot be followed

    def on_message_complete(self) -> None:
        self._meter.in_message = False
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._in_head = True
        self._head_bytes = 0
        refusal = self._refusal_after
        if refusal is not None:
            if self.pipeline or not self.cycle or not self.cycle.response_complete:
                self.flow.pause_reading()  # a queued request is answered first; still nothing more is read
            elif not self.transport.is_closing():
                self._refusal_after = None
                self._unset_keepalive_if_required()  # uvicorn's: cancels the idle timer it just armed
                self._answer_refusal(refusal)

    # Helpers
    def _reported_head(self) -> int:
        """The head's size as the parser reported it so far: the target and each header line (name, ": ", value,
        CRLF), without the padding it drops."""
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def _too_large(self) -> Refusal:
        return _head_too_large(self.limits.max_header_bytes)

    def _head_expired(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._head_started and self.loop.time() < self._head_deadline:
            self._head_timer = self.loop.call_at(self._head_deadline, self._head_expired)  # a later head
            return
        if not self._head_started and self._served:
            return  # between requests: the keep-alive timer's business
        if self._head_started:
            limit = self.limits.head_timeout
            self._refuse(Refusal(408, "request_timeout", f"the request head did not arrive within {limit:g} s"))
        else:
            self.transport.close()  # a connection that sent nothing at all: closed without a word

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _refuse(self, refusal: Refusal) -> None:
        self._cancel_head_timer()
        self.limits.refused(refusal.code, refusal.detail)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.more_body:
                # A request whose body is still coming is under way: its answer cannot be told apart from the
                # refusal, nor can the request be finished (the refusal is about its own bytes).
                self.transport.close()
                return
            # Whole requests are under way (the refusal concerns the one after them): the refusal follows their
            # answers, so that none is lost; nothing more is read meanwhile.
            self._refusal_after = refusal
            self.flow.pause_reading()
            return
        self._answer_refusal(refusal)

    def _answer_refusal(self, refusal: Refusal) -> None:
        self.transport.write(refusal_bytes(refusal))
        transport = self.transport
        if transport.can_write_eof():
            # The answer, then end-of-stream, then read and drop until the client closes or LINGER_TIMEOUT ends.
            self._lingering = True
            transport.write_eof()
            self.loop.call_later(LINGER_TIMEOUT, transport.close)
        else:
            transport.close()

    def eof_received(self) -> None:
        if self._lingering:
            self.transport.close()


def protocol_for(limits: ConnectionLimits) -> type[LimitedHttpToolsProtocol]:
    """A protocol class bound to ``limits``, for ``uvicorn.Config(http=...)``."""
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,), {"limits": limits})


__all__ = [
    "HEAD_TIMEOUT",
    "KEEP_ALIVE_TIMEOUT",
    "MAX_PIPELINED",
    "ConnectionLimits",
    "LimitedHttpToolsProtocol",
    "protocol_for",
]
