"""The sidecar application: ``create_app(settings)`` wires settings, token cache and forwarder.

The Starlette app owns lifespan (the HTTP clients and the background refresh) and the reserved
``/-/`` routes; everything else is mounted straight onto the bare ASGI forwarder.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from proxy.cache import RetryPolicy, TokenProvider
from proxy.credentials import ClientCredentialsGrant, RefreshTokenGrant, grant_from_settings
from proxy.errors import ConfigError, TokenError, error_body
from proxy.forward import Forwarder
from proxy.logs import AccessLog
from proxy.metrics import render
from proxy.settings import Settings
from proxy.tokens import TokenEndpoint
from proxy.types import Message, Receive, Scope, Send

log = logging.getLogger("proxy.app")


@dataclass
class Sidecar:
    """The pieces of one running sidecar, kept on ``app.state.sidecar`` for the routes and for tests."""

    settings: Settings
    http: httpx2.AsyncClient
    endpoint: TokenEndpoint
    grant: RefreshTokenGrant | ClientCredentialsGrant
    tokens: TokenProvider
    forwarder: Forwarder
    draining: bool = False


class SidecarApp(Starlette):
    """Starlette for lifespan and the ``/-/`` routes; every other request goes straight to the forwarder.

    Skipping Starlette's middleware and router on the hot path saves several wrappers around every
    ``send`` and a regex match per route; the forwarder answers its own errors.
    """

    def __init__(self, *, forwarder: Forwarder, access_log: AccessLog | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.forwarder = forwarder
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.access_log is None:
            await self._dispatch(scope, receive, send)
            return
        status = 0
        start = time.perf_counter()

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._dispatch(scope, receive, send_and_note_status)
        finally:
            self.access_log.record(scope, status, time.perf_counter() - start)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope["path"].startswith("/-"):
            await self.forwarder(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def _error(status: int, code: str, detail: str) -> Response:
    return Response(
        error_body(code, detail),
        status_code=status,
        media_type="application/json",
        headers={"x-sidecar-error": code, "cache-control": "no-store"},
    )


def build_sidecar(
    settings: Settings, *, retry: RetryPolicy | None = None, clock: Callable[[], float] = time.time
) -> Sidecar:
    """Assemble the sidecar's parts from settings (no I/O happens here)."""
    http = httpx2.AsyncClient(trust_env=False, follow_redirects=False, timeout=settings.token_timeout)
    endpoint = TokenEndpoint(
        http, token_url=settings.token_url, client_id=settings.client_id, timeout=settings.token_timeout
    )
    grant = grant_from_settings(settings, endpoint)
    tokens = TokenProvider(
        grant,
        kinds={settings.token},
        margin=settings.refresh_margin,
        retry=retry,
        clock=clock,
    )
    if not settings.upstream_url:
        raise ConfigError(["SIDECAR_UPSTREAM_URL: is required"])
    forwarder = Forwarder(
        upstream_url=settings.upstream_url,
        tokens=tokens.view(settings.token),
        header=settings.header,
        header_prefix=settings.header_prefix,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        pool_timeout=settings.pool_timeout,
        max_connections=settings.max_connections,
        # API Gateway usage plans: the configured key replaces any the client sent.
        extra_headers=((b"x-api-key", settings.api_key.get_secret_value().encode()),) if settings.api_key else (),
    )
    return Sidecar(settings, http, endpoint, grant, tokens, forwarder)


def create_app(
    settings: Settings, *, retry: RetryPolicy | None = None, clock: Callable[[], float] = time.time
) -> SidecarApp:
    """The sidecar as an ASGI app. ``retry`` and ``clock`` are for tests."""
    sidecar = build_sidecar(settings, retry=retry, clock=clock)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if sidecar.draining:
            return _error(503, "draining", "the sidecar is shutting down")
        try:
            async with asyncio.timeout(settings.token_timeout):
                token = await sidecar.tokens.get()
        except TokenError as exc:
            return _error(503, exc.code, str(exc))
        except TimeoutError:
            return _error(503, "token_endpoint_unavailable", "a token refresh is still in progress; try again")
        body: dict[str, object] = {"status": "ready", "token_expires_in": round(token.expires_at - clock())}
        if sidecar.grant.persist_error:
            body["warning"] = sidecar.grant.persist_error  # serving, but a restart would lose the credential
        return JSONResponse(body)

    async def metrics(request: Request) -> Response:
        return Response(render(sidecar, clock), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def not_found(request: Request) -> Response:
        return _error(
            404, "not_found", f"{request.url.path} is not a sidecar route (reserved: /-/healthz, /-/readyz, /-/metrics)"
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await sidecar.forwarder.open()
        sidecar.tokens.start()
        flusher = asyncio.create_task(access_log.run()) if access_log else None
        try:
            yield
        finally:
            sidecar.draining = True
            if flusher is not None:
                flusher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await flusher
            await sidecar.tokens.aclose()
            await sidecar.forwarder.aclose()
            await sidecar.http.aclose()

    access_log = AccessLog() if settings.access_log else None
    app = SidecarApp(
        forwarder=sidecar.forwarder,
        access_log=access_log,
        routes=[
            Route("/-/healthz", healthz, methods=["GET", "HEAD"]),
            Route("/-/readyz", readyz, methods=["GET", "HEAD"]),
            Route("/-/metrics", metrics, methods=["GET"]),
            Route("/-/{rest:path}", not_found),
            Route("/-", not_found),
            Mount("/", app=sidecar.forwarder),
        ],
        lifespan=lifespan,
    )
    app.state.sidecar = sidecar
    return app
