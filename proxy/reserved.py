"""The reserved ``/-/`` routes, a small Starlette app: ``/-/healthz``, ``/-/readyz`` (from state alone, never
waiting on the network: probes have short timeouts), ``/-/metrics``, ``/-/config`` and the status page (``/-/``,
``proxy.status``). Their answers are reports, not errors."""

from __future__ import annotations

import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy import __version__
from proxy.clock import Clock
from proxy.errors import error_body
from proxy.request import CURRENT_REQUEST_ID
from proxy.settings.effective import effective
from proxy.sidecar import Sidecar
from proxy.status import CSP, PAGE, PAGE_PATHS, SCRIPT, SHOWN_CLAIMS, STYLE
from proxy.types import Lifespan

# The /-/ routes for trusted callers only (they show routes, files, hosts, requests): never on the metrics
# listener, whose callers are scrapers on the network.
TRUSTED_ROUTES = PAGE_PATHS | {"/-/config"}
# What a caller that may not see details is told instead of them.
UNTRUSTED_DETAIL = "details for callers on this machine or with the caller token, and in the sidecar's log"


def reserved_routes(sidecar: Sidecar, clock: Clock, lifespan: Lifespan) -> Starlette:
    """The ``/-/`` routes over ``sidecar``'s state; ``lifespan`` runs the sidecar's start and stop."""

    ready_on_process = sidecar.settings.ready_when == "process"

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        # Details (file paths, other processes, the token endpoint's words) only for a caller on this machine or
        # one with the caller token; anyone else who can reach the probe gets codes and counts.
        trusted = sidecar.guard.trusted(request.scope)
        if sidecar.draining:
            return _error(503, "draining", "the sidecar is shutting down")
        warnings = sidecar.warnings()
        shown = " ".join(warnings) if trusted else f"{len(warnings)} warning(s); {UNTRUSTED_DETAIL}"
        body: dict[str, object] = {"status": "ready"}
        for code, reason in (provider.state() for provider in sidecar.providers):
            if code != "ready":
                detail = reason if trusted else UNTRUSTED_DETAIL
                if not ready_on_process:
                    # The warnings may say why (another store key, another process on the same file).
                    return _error(503, code, detail, warning=shown if warnings else "")
                # SIDECAR_READY_WHEN=process: serving is what counts; the token's trouble is told, not acted on.
                body.setdefault("token", {"error": code, "detail": detail})
        held = [tokens.expires_at for p in sidecar.providers if (tokens := p.usable()) is not None]
        if len(held) == len(sidecar.providers):
            body["token_expires_in"] = round(min(held) - clock.monotonic())
        if warnings:  # serving, but a restart (or a rotation) could lose a credential
            body["warning"] = shown
        return JSONResponse(body)

    async def metrics(request: Request) -> Response:
        from proxy.metrics import merge, render  # with prometheus-client: at the first scrape, not at start

        registry, peers = sidecar.registry, sidecar.peers
        if peers is not None:  # the whole sidecar: this worker's counts and the others'
            registry = merge({peers.number: sidecar.counts(), **await peers.gather()}, peers.count)
        body, content_type = render(registry, request.headers.get("accept"))
        return Response(body, headers={"content-type": content_type, "cache-control": "no-store"})

    def refuse_stranger(request: Request) -> Response | None:
        # The routes, files, hosts and recent requests are not a stranger's business; secrets are never shown.
        if sidecar.guard.trusted(request.scope):
            return None
        return _error(
            403,
            "client_not_allowed",
            f"{request.url.path} is shown to callers on this machine or with the caller token (X-Sidecar-Caller)",
        )

    async def page(request: Request) -> Response:
        refused = refuse_stranger(request)
        asset = {
            "/-/": (PAGE, "text/html; charset=utf-8"),
            "/-/status.js": (SCRIPT, "text/javascript; charset=utf-8"),
            "/-/status.css": (STYLE, "text/css; charset=utf-8"),
        }[request.url.path]
        return refused or Response(
            asset[0],
            media_type=asset[1],
            headers={
                "content-security-policy": CSP,
                "x-content-type-options": "nosniff",
                "referrer-policy": "no-referrer",
                "cache-control": "no-store",
            },
        )

    async def config(request: Request) -> Response:
        refused = refuse_stranger(request)  # secrets show as [set] in any case
        return refused or JSONResponse(effective(sidecar.settings), headers={"cache-control": "no-store"})

    async def status(request: Request) -> Response:
        refused = refuse_stranger(request)
        return refused or JSONResponse(status_report(sidecar, clock), headers={"cache-control": "no-store"})

    async def not_found(request: Request) -> Response:
        reserved = "/-/ (the status page), /-/healthz, /-/readyz, /-/metrics, /-/config"
        return _error(404, "not_found", f"{request.url.path} is not a sidecar route (reserved: {reserved})")

    return Starlette(
        routes=[
            Route("/-/healthz", healthz, methods=["GET", "HEAD"]),
            Route("/-/readyz", readyz, methods=["GET", "HEAD"]),
            Route("/-/metrics", metrics, methods=["GET"]),
            Route("/-/config", config, methods=["GET"]),
            Route("/-/", page, methods=["GET"]),
            Route("/-/status.js", page, methods=["GET"]),
            Route("/-/status.css", page, methods=["GET"]),
            Route("/-/status.json", status, methods=["GET"]),
            Route("/-/{rest:path}", not_found),
            Route("/-", not_found),
        ],
        lifespan=lifespan,
    )


def status_report(sidecar: Sidecar, clock: Clock) -> dict[str, Any]:
    """What the status page shows (``proxy.status``): each route and its credential, the token in hand's claims
    (never the token), the last refresh, the store, and the last requests."""
    now = clock.monotonic()
    routes = []
    ready = True
    for route in sidecar.settings.effective_routes():
        provider = sidecar.credentials.get(route.credential_key())
        if provider is None:
            continue
        state, reason = provider.state()
        ready = ready and state == "ready"
        tokens = provider.usable()
        claims: dict[str, Any] = {}
        if tokens is not None:
            held = tokens[route.token].claims
            claims = {name: held[name] for name in SHOWN_CLAIMS if name in held}
            if isinstance(claims.get("exp"), int | float):
                claims["exp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(claims["exp"]))
        failure = provider.last_error
        shared = provider.shared
        routes.append(
            {
                "prefix": route.prefix,
                "upstream": route.upstream_url,
                "token": route.token,
                "header": route.header,
                "credential": {
                    "state": state,
                    "detail": reason if state != "ready" else (str(failure) if failure else ""),
                    "grant": route.grant,
                    "client_id": route.client_id,
                    "token_url": route.token_url,
                    "expires_in": tokens.expires_at - now if tokens else None,
                    "next_refresh_in": max(0.0, provider.schedule.background_at - now) if tokens else None,
                    "last_outcome": f"failed: {failure.code}" if failure else ("success" if tokens else "none yet"),
                    "claims": claims,
                    "store": f"{shared.store.name}{' (out of reach)' if shared.problem else ''}"
                    if shared
                    else "memory (this process only)",
                },
            }
        )
    return {
        "version": __version__,
        "ready": ready and not sidecar.draining,
        "warnings": sidecar.warnings(),
        "routes": routes,
        "requests": sidecar.recent.rows(),
    }


def _error(status: int, code: str, detail: str, *, warning: str = "") -> Response:
    return Response(
        error_body(code, detail, CURRENT_REQUEST_ID.get(), warning=warning),
        status_code=status,
        media_type="application/json",
        headers={"x-sidecar-error": code, "cache-control": "no-store"},
    )


__all__ = ["TRUSTED_ROUTES", "reserved_routes"]
