"""The sidecar application: ``create_app(settings)`` wires settings, token caches and forwarders.

The Starlette app owns lifespan (the HTTP clients and the background refreshes) and the reserved
``/-/`` routes; every other request goes straight to the forwarder of the longest matching route
prefix. Routes whose credentials are the same share one token provider: one cache, one refresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import httpx2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.egress.tls import TOP_LEVEL_NAMES, TlsContext, TlsFiles
from proxy.errors import ConfigError, Refusal, error_body
from proxy.forward import Forwarder, send_error
from proxy.guard import CallerGuard
from proxy.logs import AccessLog, event
from proxy.metrics import RequestMetrics, render, sidecar_registry
from proxy.paths import pick_route
from proxy.request import CURRENT_REQUEST_ID, OWN_ROUTE, REQUEST_ID_HEADER, RequestRecord, request_id_of
from proxy.secrets import Secret, secret_file_warnings, secret_files
from proxy.server.limits import ConnectionLimits
from proxy.settings import RouteSettings, Settings
from proxy.store.base import Store
from proxy.tokens.build import open_configured_store, provider_for, token_http, token_tls
from proxy.tokens.grants import Grant
from proxy.tokens.provider import TokenProvider
from proxy.tokens.schedule import RefreshPolicy
from proxy.types import Message, Receive, Scope, Send
from proxy.watch import SECRET_POLL_INTERVAL, watch_files

log = logging.getLogger("proxy.app")


# Error codes that are not answers: the client left first. Logged, not counted in sidecar_errors_total.
# What the metrics listener answers for anything but the /-/ routes.
_METRICS_LISTENER_ONLY = Refusal(
    404,
    "not_found",
    "this listener (SIDECAR_METRICS_LISTEN) serves /-/metrics, /-/healthz and /-/readyz only; requests to "
    "forward go to SIDECAR_LISTEN",
)
NOT_ANSWERED = frozenset({"client_gone"})


@dataclass(frozen=True)
class UpstreamRoute:
    """A path prefix (as raw bytes, no trailing slash; ``/`` matches everything) and its forwarder."""

    prefix: bytes
    forwarder: Forwarder

    @property
    def label(self) -> str:
        """The route in logs and metrics."""
        return self.prefix.decode("latin-1")


@dataclass
class Sidecar:
    """The pieces of one running sidecar, kept on ``app.state.sidecar`` for the routes, metrics and tests."""

    settings: Settings
    http: httpx2.AsyncClient
    providers: list[TokenProvider]
    routes: list[UpstreamRoute]  # longest prefix first
    guard: CallerGuard = field(default_factory=CallerGuard)
    # Secret files other users could read or replace (proxy.secrets.exposure): logged, shown by readyz.
    file_warnings: list[str] = field(default_factory=list)
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    requests: RequestMetrics = field(default_factory=RequestMetrics)
    draining: bool = False
    # The token store shared with other sidecars (None: memory, each process on its own).
    store: Store | None = None
    # Every TLS context with files of its own (trusted CAs, client certificates), each once: re-read on change.
    tls: list[TlsContext] = field(default_factory=list)
    forwarders: list[Forwarder] = field(init=False)
    # Set whenever a re-read brought a new value (tests wait on it).
    secrets_changed: asyncio.Event = field(default_factory=asyncio.Event, init=False)

    def reload_secrets(self) -> bool:
        """Re-read every secret and TLS file (SIGHUP, or the watcher saw one change); True when a value changed."""
        # Every file is re-read (a list, not any(): no short-circuit).
        results = [context.reload() for context in self.tls]
        results += [forwarder.reload_tls() for forwarder in self.forwarders]
        results += [provider.reload_credentials() for provider in self.providers]
        results += [forwarder.reload_secrets() for forwarder in self.forwarders]
        if self.guard.caller_token is not None:
            results.append(self.guard.caller_token.reload())
        changed = any(results)
        log.info(
            "secret files re-read (%s)",
            "a value changed" if changed else "nothing changed",
            extra=event("secrets_reloaded", changed=changed),
        )
        if changed:
            self.secrets_changed.set()
        return changed

    @property
    def errors(self) -> Counter[str]:
        """The sidecar's own error answers by code: the app's, and the connections' (``ConnectionLimits``)."""
        return self.limits.errors

    def __post_init__(self) -> None:
        self.forwarders = [route.forwarder for route in self.routes]

    # The first route's pieces: the whole sidecar in the usual one-route form.
    @property
    def tokens(self) -> TokenProvider:
        return self.providers[0]

    @property
    def grant(self) -> Grant:
        return self.tokens.grant

    @property
    def forwarder(self) -> Forwarder:
        return self.routes[-1].forwarder


class SidecarApp(Starlette):
    """Starlette for lifespan and the ``/-/`` routes; every other request goes straight to a forwarder.

    Skipping Starlette's middleware and router on the hot path saves several wrappers around every
    ``send`` and a regex match per route; the forwarder answers its own errors.
    """

    def __init__(
        self,
        *,
        routes_by_prefix: list[UpstreamRoute],
        access_log: AccessLog | None,
        guard: CallerGuard,
        limits: ConnectionLimits,
        request_metrics: RequestMetrics,
        metrics_port: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.upstream_routes = routes_by_prefix
        self.prefixes = [route.prefix for route in routes_by_prefix]
        self.labels = [route.label for route in routes_by_prefix]
        self.access_log = access_log
        self.guard = guard
        self.limits = limits  # logs refusals (at most one line per code per 10 s); its errors are the app's too
        self.request_metrics = request_metrics
        # Requests to this local port (SIDECAR_METRICS_LISTEN) get the /-/ routes only, never the forwarder.
        self.metrics_port = metrics_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)  # lifespan
            return
        start = time.perf_counter()
        # Whatever happens to the request is noted here, and counted and logged once, below.
        record = RequestRecord(request_id_of(scope["headers"]))
        CURRENT_REQUEST_ID.set(record.request_id)  # this request's task only: uvicorn runs each in its own
        try:
            if self.metrics_port is not None and (scope.get("server") or ("", None))[1] == self.metrics_port:
                await self._metrics_listener(scope, receive, send, record)
                return
            # Who is asking, then which route: nothing is done for a caller the sidecar does not serve.
            refusal = self.guard.check(scope)
            index = None
            if refusal is None:
                try:
                    index = self._route(scope)
                except Refusal as exc:
                    refusal = exc
            if refusal is None:
                path: str = scope["path"]
                if path == "/-" or path.startswith("/-/"):
                    record.route = OWN_ROUTE
                    await self._own_route(scope, receive, send, record)
                    return
                refusal = self.guard.check_caller(scope)
            if index is not None:
                record.route = self.labels[index]
            if refusal is None:
                if index is None:
                    refusal = self._no_route(scope)
                else:
                    # The forwarder notes what it sent in the record: no wrapper around every send on the hot path.
                    await self.upstream_routes[index].forwarder.forward(scope, receive, send, record)
                    return
            if refusal.code != "no_route":
                self.limits.log_refusal(refusal.code, refusal.detail)
            record.status, record.error = refusal.status, refusal.code
            record.bytes_out = await send_error(send, refusal, request_id=record.request_id)
        finally:
            seconds = time.perf_counter() - start
            if record.error and record.error not in NOT_ANSWERED:
                self.limits.errors[record.error] += 1
            self.request_metrics.observe(record, scope["method"], seconds)
            if self.access_log is not None:
                self.access_log.record(scope, record, seconds)

    async def _metrics_listener(self, scope: Scope, receive: Receive, send: Send, record: RequestRecord) -> None:
        """The second listener: what it serves cannot use the credential, so no caller checks apply."""
        record.route = OWN_ROUTE
        path: str = scope["path"]
        if path.startswith("/-/"):
            await self._own_route(scope, receive, send, record)
            return
        record.status = 404  # like the /-/ routes' own 404: a report, not counted in sidecar_errors_total
        record.bytes_out = await send_error(send, _METRICS_LISTENER_ONLY, request_id=record.request_id)

    def _route(self, scope: Scope) -> int | None:
        """The index of the route for the request's path, once its dot segments are resolved (the scope then
        holds the resolved path: it is what is matched, logged and forwarded)."""
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        index, path = pick_route(self.prefixes, raw_path)
        if path is not raw_path:
            scope["raw_path"] = path
            scope["path"] = unquote(path.decode("latin-1"))
        return index

    def _no_route(self, scope: Scope) -> Refusal:
        prefixes = ", ".join(prefix.decode() for prefix in self.prefixes)
        return Refusal(404, "no_route", f"no route matches {scope['path']}; routes: {prefixes}")

    async def _own_route(self, scope: Scope, receive: Receive, send: Send, record: RequestRecord) -> None:
        """The reserved ``/-/`` routes, through Starlette; notes what was sent in ``record``. Their answers are
        reports (a 503 readiness probe says why), not errors: not counted in sidecar_errors_total."""
        request_id = (REQUEST_ID_HEADER, record.request_id.encode())

        async def send_and_note(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                message["headers"] = [*message.get("headers", ()), request_id]
            elif message["type"] == "http.response.body":
                record.bytes_out += len(message.get("body", b""))
            await send(message)

        await super().__call__(scope, receive, send_and_note)


def _error(status: int, code: str, detail: str) -> Response:
    return Response(
        error_body(code, detail, CURRENT_REQUEST_ID.get()),
        status_code=status,
        media_type="application/json",
        headers={"x-sidecar-error": code, "cache-control": "no-store"},
    )


def build_sidecar(
    settings: Settings,
    *,
    policy: RefreshPolicy | None = None,
    clock: Clock = SYSTEM_CLOCK,
    private_store: bool = False,
) -> Sidecar:
    """Assemble the sidecar's parts from settings (no I/O happens here). ``private_store``: the token store is the
    one ``SIDECAR_WORKERS`` made for its workers, removed at exit (rotated refresh tokens must still reach the
    refresh token file)."""
    routes = settings.effective_routes()
    if not routes:
        raise ConfigError(["SIDECAR_UPSTREAM_URL: is required (or routes in SIDECAR_CONFIG)"])
    egress = settings.egress
    tls = TlsContexts()
    token_context = token_tls(settings)
    if token_context is not None:
        tls.contexts[token_context.files] = token_context
    http = token_http(settings, token_context)
    store = open_configured_store(settings)
    providers: dict[tuple[str, ...], TokenProvider] = {}
    kinds: dict[tuple[str, ...], set[str]] = {}
    for route in routes:
        kinds.setdefault(route.credential_key(), set()).add(route.token)
    # Shortest prefix first, so the catch-all route's provider (the one-route form's) is providers[0].
    for route in reversed(routes):
        key = route.credential_key()
        if key not in providers:
            providers[key] = provider_for(
                settings,
                route,
                http,
                kinds=kinds[key],
                store=store,
                policy=policy,
                clock=clock,
                durable=not private_store,
            )
    upstream_routes = [
        UpstreamRoute(
            route.prefix.encode(),
            Forwarder(
                upstream_url=route.upstream_url,
                tokens=providers[route.credential_key()].view(route.token),
                header=route.header,
                header_prefix=route.header_prefix,
                strip_prefix=route.prefix if route.strip_prefix else "",
                connect_timeout=settings.connect_timeout,
                read_timeout=settings.read_timeout,
                pool_timeout=settings.pool_timeout,
                max_connections=settings.max_connections,
                api_key=Secret(route.api_key.get_secret_value(), route.api_key_file) if route.api_key else None,
                max_body_bytes=settings.max_body_bytes,
                methods=route.methods,
                paths=route.paths,
                api_id=route.api_id,
                proxy=egress.proxy_for(route.upstream_url),
                tls=tls.for_route(route),
            ),
        )
        for route in routes
    ]
    caller_token = settings.caller_token
    guard = CallerGuard(
        allowed_hosts=settings.allowed_hosts,
        allowed_origins=settings.allowed_origins,
        allow_from=None if settings.listens_on_loopback else settings.allow_from,
        caller_token=Secret(caller_token.get_secret_value(), settings.caller_token_file) if caller_token else None,
    )
    limits = ConnectionLimits(max_clients=settings.max_clients, max_header_bytes=settings.max_header_bytes)
    return Sidecar(
        settings,
        http,
        list(providers.values()),
        upstream_routes,
        store=store,
        guard=guard,
        limits=limits,
        file_warnings=secret_file_warnings(settings),
        tls=list(tls.contexts.values()),
    )


class TlsContexts:
    """One ``TlsContext`` per distinct set of TLS files: routes that name the same files share it."""

    def __init__(self) -> None:
        self.contexts: dict[TlsFiles, TlsContext] = {}

    def for_route(self, route: RouteSettings) -> TlsContext | None:
        names = TOP_LEVEL_NAMES
        if route.prefix != "/":
            label = f"route {route.prefix}:"
            names = (f"{label} ca_file", f"{label} client_cert_file", f"{label} client_key_file")
        files = route.tls_files(names)
        if not files.custom:
            return None
        if files not in self.contexts:  # the names only say how messages name the files: not compared
            self.contexts[files] = TlsContext(files)
        return self.contexts[files]


def create_app(
    settings: Settings,
    *,
    policy: RefreshPolicy | None = None,
    clock: Clock = SYSTEM_CLOCK,
    watch_interval: float = SECRET_POLL_INTERVAL,
    metrics_port: int | None = None,
    private_store: bool = False,
) -> SidecarApp:
    """The sidecar as an ASGI app. ``metrics_port``: the bound port of ``SIDECAR_METRICS_LISTEN``, if any (requests
    arriving there get the ``/-/`` routes only). ``policy``, ``clock`` and ``watch_interval`` are for tests."""
    sidecar = build_sidecar(settings, policy=policy, clock=clock, private_store=private_store)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        # From state alone, never waiting on the network: probes have short timeouts.
        if sidecar.draining:
            return _error(503, "draining", "the sidecar is shutting down")
        states = [provider.state() for provider in sidecar.providers]
        for code, reason in states:
            if code != "ready":
                return _error(503, code, reason)
        held = [tokens.expires_at for p in sidecar.providers if (tokens := p.usable()) is not None]
        body: dict[str, object] = {"status": "ready", "token_expires_in": round(min(held) - clock.monotonic())}
        warnings = [
            warning
            for p in sidecar.providers
            for warning in (p.grant.persist_error, p.grant.shared_warning, p.shared.problem if p.shared else None)
            if warning
        ] + sidecar.file_warnings
        if warnings:
            body["warning"] = " ".join(warnings)  # serving, but a restart (or a rotation) could lose a credential
        return JSONResponse(body)

    registry = sidecar_registry(sidecar, clock)

    async def metrics(request: Request) -> Response:
        body, content_type = render(registry, request.headers.get("accept"))
        return Response(body, headers={"content-type": content_type, "cache-control": "no-store"})

    async def not_found(request: Request) -> Response:
        return _error(
            404, "not_found", f"{request.url.path} is not a sidecar route (reserved: /-/healthz, /-/readyz, /-/metrics)"
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        for warning in sidecar.file_warnings:
            log.warning("%s", warning)
        for forwarder in sidecar.forwarders:
            await forwarder.open()
        if sidecar.store is not None:
            log.info("sharing tokens through the token store %s", sidecar.store.name)
        for provider in sidecar.providers:
            if provider.shared is None:
                provider.grant.claim()  # with a store, sharing the refresh token is the point
            provider.start()
        flusher = asyncio.create_task(access_log.run()) if access_log else None
        files = list(dict.fromkeys([*secret_files(settings), *(p for c in sidecar.tls for p in c.files.paths())]))
        watcher = (
            asyncio.create_task(watch_files(files, sidecar.reload_secrets, interval=watch_interval)) if files else None
        )
        try:
            yield
        finally:
            sidecar.draining = True
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            if flusher is not None:
                flusher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await flusher
            for provider in sidecar.providers:
                await provider.aclose()
                provider.grant.release()
            for forwarder in sidecar.forwarders:
                await forwarder.aclose()
            if sidecar.store is not None:
                await sidecar.store.aclose()
            await sidecar.http.aclose()

    access_log = AccessLog(settings.log_format, query=settings.access_log_query) if settings.access_log else None
    app = SidecarApp(
        routes_by_prefix=sidecar.routes,
        access_log=access_log,
        guard=sidecar.guard,
        limits=sidecar.limits,
        request_metrics=sidecar.requests,
        metrics_port=metrics_port,
        routes=[
            Route("/-/healthz", healthz, methods=["GET", "HEAD"]),
            Route("/-/readyz", readyz, methods=["GET", "HEAD"]),
            Route("/-/metrics", metrics, methods=["GET"]),
            Route("/-/{rest:path}", not_found),
            Route("/-", not_found),
        ],
        lifespan=lifespan,
    )
    app.state.sidecar = sidecar
    return app
