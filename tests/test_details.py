"""What a caller from another machine learns from the sidecar's own answers: codes and counts, not file paths,
processes, the token endpoint's words or the route prefixes. The app runs in-process under httpx2's ASGI
transport, which lets the peer address be one that is not this machine's."""

from __future__ import annotations

import httpx2

from proxy.app import create_app
from proxy.settings import RouteSettings
from tests.conftest import Stack

STRANGER = ("203.0.113.5", 40000)


async def test_a_stranger_gets_codes_and_counts_not_details(stack: Stack):
    base = stack.settings()
    route = RouteSettings(
        prefix="/r",
        upstream_url=stack.upstream_url,
        token_url=base.token_url,
        client_id=base.client_id,
        client_secret=base.client_secret,
        refresh_token=base.refresh_token,
    )
    settings = stack.settings(routes=(route,), upstream_url=None, listen="0.0.0.0:8080", allow_from="0.0.0.0/0")
    app = create_app(settings)
    for client, detailed in ((STRANGER, False), (("127.0.0.1", 40000), True)):
        transport = httpx2.ASGITransport(app=app, client=client)
        async with httpx2.AsyncClient(transport=transport, base_url="http://localhost") as http:
            ready = await http.get("/-/readyz")
            assert (ready.status_code, ready.headers["x-sidecar-error"]) == (503, "token_pending")
            assert ("first token request" in ready.json()["detail"]) is detailed
            missing = await http.get("/nowhere/x", headers={"Host": "localhost"})
            assert missing.headers["x-sidecar-error"] == "no_route"
            assert ("routes: /r" in missing.json()["detail"]) is detailed
