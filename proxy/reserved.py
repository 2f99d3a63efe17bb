"""The reserved ``/-/`` routes, a small Starlette app: ``/-/healthz``, ``/-/readyz`` (from state alone, never
waiting on the network: probes have short timeouts) and ``/-/metrics``. Their answers are reports, not errors."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.clock import Clock
from proxy.errors import error_body
from proxy.metrics import merge, render, snapshot
from proxy.request import CURRENT_REQUEST_ID
from proxy.settings.effective import effective
from proxy.sidecar import Sidecar
from proxy.types import Lifespan

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
        registry, peers = sidecar.registry, sidecar.peers
        if peers is not None:  # the whole sidecar: this worker's counts and the others'
            registry = merge({peers.number: snapshot(registry), **await peers.gather()}, peers.count)
        body, content_type = render(registry, request.headers.get("accept"))
        return Response(body, headers={"content-type": content_type, "cache-control": "no-store"})

    async def config(request: Request) -> Response:
        # The routes, files and hosts the sidecar uses are not a stranger's business; secrets show as [set].
        if not sidecar.guard.trusted(request.scope):
            return _error(
                403,
                "client_not_allowed",
                "the settings are shown to callers on this machine or with the caller token (X-Sidecar-Caller)",
            )
        return JSONResponse(effective(sidecar.settings), headers={"cache-control": "no-store"})

    async def not_found(request: Request) -> Response:
        reserved = "/-/healthz, /-/readyz, /-/metrics, /-/config"
        return _error(404, "not_found", f"{request.url.path} is not a sidecar route (reserved: {reserved})")

    return Starlette(
        routes=[
            Route("/-/healthz", healthz, methods=["GET", "HEAD"]),
            Route("/-/readyz", readyz, methods=["GET", "HEAD"]),
            Route("/-/metrics", metrics, methods=["GET"]),
            Route("/-/config", config, methods=["GET"]),
            Route("/-/{rest:path}", not_found),
            Route("/-", not_found),
        ],
        lifespan=lifespan,
    )


def _error(status: int, code: str, detail: str, *, warning: str = "") -> Response:
    return Response(
        error_body(code, detail, CURRENT_REQUEST_ID.get(), warning=warning),
        status_code=status,
        media_type="application/json",
        headers={"x-sidecar-error": code, "cache-control": "no-store"},
    )


__all__ = ["reserved_routes"]
