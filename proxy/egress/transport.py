"""The HTTP client for token endpoints (and the one-shot commands): httpx2 over the egress proxy and TLS context.

``EgressTransport`` sends each request directly or through the proxy its URL calls for (``proxy.egress``), over the
current trusted-CA context (``proxy.egress.tls``). It keeps one pooled httpx2 transport per (proxy, context) pair, so
CONNECT tunnels are kept alive and reused like direct connections; a re-read CA file gives new connections the new
context, and the transports it replaced are closed with the client.
"""

from __future__ import annotations

import ssl

import httpx2

from proxy.egress.route import Egress, EgressProxy
from proxy.egress.tls import TlsContext, default_context


class EgressTransport(httpx2.AsyncBaseTransport):
    """Direct or through the egress proxy, per request URL; verification against ``tls``'s current context."""

    def __init__(self, egress: Egress, tls: TlsContext | None = None) -> None:
        self.egress = egress
        self.tls = tls
        self._transports: dict[tuple[str | None, int], httpx2.AsyncHTTPTransport] = {}

    def _context(self) -> ssl.SSLContext:
        return self.tls.context if self.tls is not None else default_context()

    def _transport(self, proxy: EgressProxy | None) -> httpx2.AsyncHTTPTransport:
        context = self._context()
        key = (proxy.url if proxy is not None else None, id(context))
        transport = self._transports.get(key)
        if transport is None:
            transport = httpx2.AsyncHTTPTransport(verify=context, proxy=_proxy(proxy) if proxy else None)
            self._transports[key] = transport
        return transport

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        proxy = self.egress.proxy_for(str(request.url))
        return await self._transport(proxy).handle_async_request(request)

    async def aclose(self) -> None:
        transports = list(self._transports.values())
        self._transports.clear()
        for transport in transports:
            await transport.aclose()


def _proxy(proxy: EgressProxy) -> httpx2.Proxy:
    authorization = proxy.authorization()
    headers = {"Proxy-Authorization": authorization} if authorization else None
    return httpx2.Proxy(proxy.url, headers=headers)


def token_client(egress: Egress, tls: TlsContext | None, *, timeout: float) -> httpx2.AsyncClient:
    """The client token endpoints are called with: no redirects followed, no environment read (``egress`` already
    holds what the environment says), a cookie jar that nothing puts cookies in."""
    return httpx2.AsyncClient(
        transport=EgressTransport(egress, tls), trust_env=False, follow_redirects=False, timeout=timeout
    )


def proxy_status(exc: httpx2.HTTPError) -> int | None:
    """The status of a proxy's refusal of ``CONNECT`` (httpx2 says it as ``ProxyError("407 ...")``)."""
    if isinstance(exc, httpx2.ProxyError):
        head = str(exc).split(" ", 1)[0]
        if head.isdigit() and len(head) == 3:
            return int(head)
    return None


__all__ = ["EgressTransport", "proxy_status", "token_client"]
