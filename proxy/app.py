"""The sidecar as an ASGI app: ``create_app(settings)`` builds the parts (``proxy.sidecar``) and serves them.

Every request goes straight to the forwarder of the longest matching route prefix, after the caller checks;
the reserved ``/-/`` routes and lifespan (the sidecar's ``start`` and ``stop``) go to ``proxy.reserved``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from urllib.parse import unquote

from starlette.applications import Starlette

from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.errors import CLOSE, Refusal
from proxy.forward import send_error
from proxy.listen import in_networks
from proxy.paths import is_plain, pick_route
from proxy.request import CURRENT_REQUEST_ID, OWN_ROUTE, REQUEST_ID_HEADER, RequestRecord, request_id_of
from proxy.reserved import TRUSTED_ROUTES, reserved_routes
from proxy.server.peers import WorkerPeers
from proxy.settings import Settings
from proxy.sidecar import Sidecar, build_sidecar
from proxy.tokens.schedule import RefreshPolicy
from proxy.types import Message, Receive, Scope, Send
from proxy.watch import SECRET_POLL_INTERVAL

log = logging.getLogger("proxy.app")

# Error codes that are not answers: the client left first. Logged, not counted in sidecar_errors_total.
NOT_ANSWERED = frozenset({"client_gone"})
# What the metrics listener answers for anything but the /-/ routes.
_METRICS_LISTENER_ONLY = Refusal(
    404,
    "not_found",
    "this listener (SIDECAR_METRICS_LISTEN) serves /-/metrics, /-/healthz and /-/readyz only; requests to "
    "forward go to SIDECAR_LISTEN",
)


class SidecarApp:
    """The ASGI app: every request goes straight to the forwarder of its route, except the ``/-/`` routes and
    lifespan, which go to a small Starlette app (``proxy.reserved``).

    Skipping Starlette's middleware and router on the hot path saves several wrappers around every
    ``send`` and a regex match per route; the forwarder answers its own errors.
    """

    def __init__(self, sidecar: Sidecar, *, clock: Clock = SYSTEM_CLOCK, metrics_port: int | None = None) -> None:
        self.clock = clock
        # Requests to this local port (SIDECAR_METRICS_LISTEN) get the /-/ routes only, never the forwarder.
        self.metrics_port = metrics_port
        self.use(sidecar)

    def use(self, sidecar: Sidecar) -> None:
        """Serve new requests with ``sidecar``'s parts (at start, and on a reload: requests in flight finish with
        the parts they started with). One synchronous step: no request sees half of each."""
        self.sidecar = sidecar
        self.upstream_routes = sidecar.routes
        self.prefixes = [route.prefix for route in sidecar.routes]
        self.root_only = self.prefixes == [b"/"]
        self.labels = [route.label for route in sidecar.routes]
        self.access_log = sidecar.access_log
        self.guard = sidecar.guard
        self.metrics_allow_from = sidecar.settings.metrics_allow_from
        self.limits = sidecar.limits  # logs refusals (at most one line per code per 10 s); its errors are the app's
        self.request_metrics = sidecar.requests
        self.recent = sidecar.recent
        self.tracing = sidecar.tracing
        self.reserved = reserved_routes(sidecar, self.clock, self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.sidecar.start()
        try:
            yield
        finally:
            await self.sidecar.stop()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.reserved(scope, receive, send)  # lifespan
            return
        start = time.perf_counter()
        # Whatever happens to the request is noted here, and counted and logged once, below.
        record = RequestRecord(request_id_of(scope["headers"]))
        CURRENT_REQUEST_ID.set(record.request_id)  # this request's task only: uvicorn runs each in its own
        tracing = self.tracing
        # Traced: what is forwarded or refused, not the sidecar's own /-/ routes (probes and scrapes every few s).
        span = tracing.start_request(scope) if tracing is not None and not scope["path"].startswith("/-/") else None
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
                if self.guard.caller_token is not None:
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
            if tracing is not None and span is not None:
                tracing.end_request(span, scope["method"], record)
            if record.error and record.error not in NOT_ANSWERED:
                self.limits.errors[record.error] += 1
            self.request_metrics.observe(record, scope["method"], seconds)
            self.recent.note(scope, record, seconds)
            if self.access_log is not None:
                self.access_log.record(scope, record, seconds)

    async def _metrics_listener(self, scope: Scope, receive: Receive, send: Send, record: RequestRecord) -> None:
        """The second listener: what it serves cannot use the credential, so any Host may ask (a scraper names a
        Service) and no caller token is wanted; only peers in ``SIDECAR_METRICS_ALLOW_FROM`` get an answer."""
        record.route = OWN_ROUTE
        client = scope.get("client")
        if client and not in_networks(client[0], self.metrics_allow_from):
            refusal = Refusal(
                403,
                "client_not_allowed",
                f"{client[0]} is not in SIDECAR_METRICS_ALLOW_FROM; add its network there to let it scrape",
                CLOSE,
            )
            self.limits.log_refusal(refusal.code, refusal.detail)
            record.status, record.error = refusal.status, refusal.code
            record.bytes_out = await send_error(send, refusal, request_id=record.request_id)
            return
        path: str = scope["path"]
        if path.startswith("/-/") and path not in TRUSTED_ROUTES:
            await self._own_route(scope, receive, send, record)
            return
        record.status = 404  # like the /-/ routes' own 404: a report, not counted in sidecar_errors_total
        record.bytes_out = await send_error(send, _METRICS_LISTENER_ONLY, request_id=record.request_id)

    def _route(self, scope: Scope) -> int | None:
        """The index of the route for the request's path, once its dot segments are resolved (the scope then
        holds the resolved path: it is what is matched, logged and forwarded)."""
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        if self.root_only and is_plain(raw_path):
            return 0  # the one-route form, and nothing to resolve: the usual request, in one call
        index, path = pick_route(self.prefixes, raw_path)
        if path is not raw_path:
            scope["raw_path"] = path
            scope["path"] = unquote(path.decode("latin-1"))
        return index

    def _no_route(self, scope: Scope) -> Refusal:
        if not self.guard.trusted(scope):  # the routes are not a stranger's business
            return Refusal(404, "no_route", "no route matches this path")
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

        await self.reserved(scope, receive, send_and_note)


def create_app(
    settings: Settings,
    *,
    policy: RefreshPolicy | None = None,
    clock: Clock = SYSTEM_CLOCK,
    watch_interval: float = SECRET_POLL_INTERVAL,
    metrics_port: int | None = None,
    private_store: bool = False,
    peers: WorkerPeers | None = None,
) -> SidecarApp:
    """The sidecar as an ASGI app. ``metrics_port``: the bound port of ``SIDECAR_METRICS_LISTEN``, if any (requests
    arriving there get the ``/-/`` routes only). ``peers``: the other workers, with ``SIDECAR_WORKERS``.
    ``policy``, ``clock`` and ``watch_interval`` are for tests."""
    sidecar = build_sidecar(
        settings, policy=policy, clock=clock, watch_interval=watch_interval, private_store=private_store, peers=peers
    )
    return SidecarApp(sidecar, clock=clock, metrics_port=metrics_port)


__all__ = ["SidecarApp", "create_app"]
