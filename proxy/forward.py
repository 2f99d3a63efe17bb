"""The forwarding hot path: a forwarder per route, over that route's upstream client (``proxy.egress.client``).

Each request is an ``Exchange``: it goes to the upstream base URL plus the raw path (less the route prefix,
when stripped) and query, byte for byte, with the token header replaced, and the answer streams back
untouched. Every failure is a ``Refusal``, and ``Forwarder.forward`` is the one place where it becomes
the sidecar's own answer: 503 no token, 502 upstream unreachable or broken, 504 upstream timed out, 503
when shutdown cut the request off.

A 401 from API Gateway's authorizer tells the token source, which refreshes at most once per 30 s however
many such answers come (callers cannot make the sidecar buy tokens) and keeps the token in hand until a new
one has arrived. An idempotent request whose body was small enough to keep is replayed once with the new
token; any other gets the 401 as it came.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import Counter
from collections.abc import Iterable
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp
from yarl import URL

from proxy.egress.client import UpstreamClient
from proxy.egress.route import EgressProxy, target_of
from proxy.egress.tls import TlsContext, default_context
from proxy.errors import Refusal, error_body
from proxy.exchange import ClientGone, Exchange
from proxy.guard import CALLER_HEADER
from proxy.paths import path_pattern
from proxy.request import REQUEST_ID_HEADER, RequestRecord
from proxy.secrets import Secret
from proxy.tokens.token import Token
from proxy.tracing import Tracing
from proxy.types import Receive, Scope, Send
from proxy.upstream import Limits, Timeouts

log = logging.getLogger("proxy.forward")


class TokenSource(Protocol):
    """What a forwarder is handed: something that yields a valid token, and hears when one was refused."""

    async def get(self) -> Token: ...

    async def replacement(self, token: Token) -> Token | None:
        """A valid token other than the refused ``token`` (after at most one rate-limited refresh), or None."""
        ...

    def refused(self, token: Token) -> None:
        """``token`` was refused for a request that cannot be replayed: refresh (rate-limited), do not wait."""
        ...


_PLAIN_PATH = "the request target must be a plain ASCII path such as /items?id=1"


class Forwarder:
    """Forwards requests (``forward``, called with the ASGI scope, receive and send) to ``upstream_url`` with a
    token from ``tokens``. Owns the route's upstream client (its connection pool) and counters; each request is an
    ``Exchange``."""

    def __init__(
        self,
        *,
        upstream_url: str,
        tokens: TokenSource,
        header: str,
        header_prefix: str = "",
        strip_prefix: str = "",
        timeouts: Timeouts,
        limits: Limits,
        api_key: Secret | None = None,
        methods: Iterable[str] | None = None,
        paths: Iterable[str] | None = None,
        api_id: str | None = None,
        proxy: EgressProxy | None = None,
        tls: TlsContext | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        parts = urlsplit(upstream_url)
        # OpenTelemetry (None: off): a client span per upstream call, whose context goes upstream.
        self.tracing = tracing
        self._scheme = parts.scheme
        self.host = parts.hostname or ""
        self._port = parts.port
        self._base_path = parts.path.rstrip("/")
        # The host as a URL carries it (an IPv6 literal in brackets), and host:port as messages name it.
        self._url_host = f"[{self.host}]" if ":" in self.host else self.host
        self.target = target_of(upstream_url)
        self.tokens = tokens
        self._header = header.lower()
        self._prefix = header_prefix
        self._strip = len(strip_prefix.rstrip("/"))
        self._api_key = api_key
        self.api_id = api_id
        self._extra = self._extra_headers()
        # The egress proxy on the way to the upstream (None: direct), and its Proxy-Authorization.
        self.proxy = proxy
        self.proxy_url = URL(proxy.url) if proxy is not None else None
        authorization = proxy.authorization() if proxy is not None else None
        self.proxy_headers = {"Proxy-Authorization": authorization} if authorization else None
        # The trusted CAs and client certificate (None: the default store, no certificate); every new connection
        # takes the current context, so a re-read certificate is used without a restart.
        self.tls = tls
        self.ssl_context: ssl.SSLContext | bool = True  # no TLS on the way: nothing to trust
        if tls is not None:
            self.ssl_context = tls.context
        elif self._scheme == "https" or (proxy is not None and proxy.url.startswith("https:")):
            self.ssl_context = default_context()
        # Failures on the way (egress proxy, TLS) by code (for /-/metrics).
        self.egress_failures: Counter[str] = Counter()
        # Requests being forwarded now: a reload closes a replaced forwarder once it has none.
        self.in_flight = 0
        # Names a client may not set (the sidecar sets them), and the headers set for the current token:
        # built once per token, not per request.
        # The caller token is the sidecar's business alone: never forwarded, whatever the settings. The request id
        # goes upstream as the sidecar settled it (the client's if sane).
        self.replaced = frozenset(
            {
                CALLER_HEADER,
                REQUEST_ID_HEADER,
                *(name.encode("latin-1") for name, _ in ((self._header, ""), *self._extra)),
            }
        )
        self._token_headers: tuple[Token, tuple[tuple[str, str], ...]] | None = None
        # connect bounds the whole wait for a connection, a free pooled one or a new one (whose handshake is
        # bounded by sock_connect too), as SIDECAR_POOL_TIMEOUT documents; sock_read bounds every wait for
        # upstream bytes, the status line included.
        self.pool_wait = timeouts.pool
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=timeouts.pool, sock_connect=timeouts.connect, sock_read=timeouts.read
        )
        self._max_connections = limits.max_connections
        self.read_timeout = timeouts.read
        self.max_body_bytes = limits.max_body_bytes
        self.methods = frozenset(methods) if methods is not None else None
        self.paths = tuple(path_pattern(glob) for glob in paths) if paths is not None else None
        # Streamed uploads may hold at most half the upstream connections, however slowly their clients send:
        # the other half stays free for everyone else. A streamed upload that finds no slot within the pool
        # wait gets 503 at once.
        self.upload_slots = asyncio.Semaphore(max(1, limits.max_connections // 2))
        self.client: UpstreamClient | None = None
        self.replays = 0

    def _extra_headers(self) -> tuple[tuple[str, str], ...]:
        # API Gateway usage plans: the configured key replaces any the client sent. A private API reached through a
        # VPC endpoint's own DNS name: API Gateway routes on x-apigw-api-id.
        extra = (("x-api-key", self._api_key.value),) if self._api_key else ()
        return (*extra, ("x-apigw-api-id", self.api_id)) if self.api_id else extra

    def headers_for(self, token: Token) -> tuple[tuple[str, str], ...]:
        cached = self._token_headers
        if cached is not None and cached[0] is token:
            return cached[1]
        headers = ((self._header, self._prefix + token.value), *self._extra)
        self._token_headers = (token, headers)
        return headers

    def reload_tls(self) -> bool:
        """Take up the TLS context's re-read files (the context re-reads them); True when a new one is in use."""
        if self.tls is None or self.ssl_context is self.tls.context:
            return False
        self.ssl_context = self.tls.context
        return True

    def reload_secrets(self) -> bool:
        """Re-read the API key file (SIGHUP); True when it changed."""
        if self._api_key is None or not self._api_key.reload():
            return False
        self._extra = self._extra_headers()
        self._token_headers = None
        return True

    def refusal(self, method: str, raw_path: bytes) -> Refusal | None:
        """The route's method and path allowlists (``methods``, ``paths`` in its TOML table), if it has them."""
        if self.methods is not None and method not in self.methods:
            allowed = ", ".join(sorted(self.methods))
            return Refusal(405, "method_not_allowed", f"this route accepts {allowed} only")
        if self.paths is not None:
            path = raw_path.decode("latin-1")
            if not any(pattern.fullmatch(path) for pattern in self.paths):
                return Refusal(403, "path_not_allowed", "this path is not in the route's paths allowlist")
        return None

    async def open(self) -> None:
        """Create the route's upstream client (its connection pool); called from the app's lifespan, inside the
        running loop."""
        self.client = UpstreamClient(
            timeout=self._timeout,
            max_connections=self._max_connections,
            proxy=self.proxy_url,
            proxy_headers=self.proxy_headers,
        )

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    def url(self, scope: Scope) -> URL:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
        try:
            path = raw_path[self._strip :].decode("ascii") if self._strip else raw_path.decode("ascii")
            query = scope["query_string"].decode("ascii")
        except UnicodeDecodeError:
            raise Refusal(400, "bad_request", _PLAIN_PATH) from None
        if self._strip and not path.startswith("/"):
            path = "/" + path
        if not path.startswith("/"):
            raise Refusal(400, "bad_request", _PLAIN_PATH)
        # Built from parts: nothing in the request (absolute-form, //host, @, backslashes, %2F) can change
        # the host. encoded=True keeps the path and query byte for byte.
        return URL.build(
            scheme=self._scheme,
            host=self._url_host,
            port=self._port,
            path=self._base_path + path,
            query_string=query,
            encoded=True,
        )

    async def forward(self, scope: Scope, receive: Receive, send: Send, record: RequestRecord) -> None:
        """Forward one request; ``record`` says what happened (status sent, error code, bytes, upstream time)."""
        exchange = Exchange(self, scope, receive, send, record)
        self.in_flight += 1
        try:
            await exchange.run()
        except ClientGone:
            record.error = "client_gone"
        except Refusal as failure:
            await self._failed(exchange, failure)
        except asyncio.CancelledError:
            # The server's shutdown grace ran out (the only thing that cancels a request): answer for ourselves
            # rather than leave uvicorn's bare 500 and traceback. The task ends here either way.
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            cut = Refusal(503, "shutting_down", "the sidecar stopped before the upstream answered; retry")
            await self._failed(exchange, cut)
        finally:
            self.in_flight -= 1

    async def _failed(self, exchange: Exchange, failure: Refusal) -> None:
        record = exchange.record
        record.error = failure.code
        if record.status:
            # The upstream's status line is gone already: end the connection without the final chunk, so the
            # client sees a broken response rather than a truncated one that looks complete.
            log.warning("%s %s: %s; closing the client connection", exchange.method, self.host, failure.detail)
            return
        record.status = failure.status
        record.bytes_out = await send_error(exchange.send, failure, request_id=record.request_id)


async def send_error(send: Send, refusal: Refusal, *, request_id: str) -> int:
    """Answer with the sidecar's JSON error; returns the body's size."""
    status, code = refusal.status, refusal.code
    body = error_body(code, refusal.detail, request_id)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"x-sidecar-error", code.encode()),
                (b"cache-control", b"no-store"),
                (REQUEST_ID_HEADER, request_id.encode()),
                *refusal.headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
    return len(body)


__all__ = ["Forwarder", "TokenSource", "send_error"]
