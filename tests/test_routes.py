"""Several APIs from one sidecar: routes from the TOML file, longest prefix, shared credentials."""

from __future__ import annotations

from pathlib import Path

import httpx2

from proxy.settings import load_settings
from tests.conftest import FakeClock, Stack, run_sidecar, run_stack


def _config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "sidecar.toml"
    path.write_text(text)
    return str(path)


def _base_env(stack: Stack, config: str) -> dict[str, str]:
    return {
        "SIDECAR_CONFIG": config,
        "SIDECAR_TOKEN_URL": stack.token_url,
        "SIDECAR_CLIENT_ID": stack.emulator.client.client_id,
        "SIDECAR_CLIENT_SECRET": stack.emulator.client.secret or "",
        "SIDECAR_REFRESH_TOKEN": stack.emulator.refresh_token,
        "SIDECAR_LISTEN": "127.0.0.1:0",
        "SIDECAR_ACCESS_LOG": "0",
    }


async def test_longest_prefix_wins_and_shared_credentials_refresh_once(tmp_path: Path, client: httpx2.AsyncClient):
    clock = FakeClock()
    async with run_stack() as stack, run_stack(machine_to_machine=True, client_id="m2m") as other:
        for s in (stack, other):
            s.use_clock(clock)
        config = _config(
            tmp_path,
            f"""
[[routes]]
prefix = "/orders"
upstream_url = "{stack.upstream_url}"

[[routes]]
prefix = "/orders/archive"
upstream_url = "{stack.upstream_url}"
strip_prefix = false
token = "access_token"
header_prefix = "Bearer "

[[routes]]
prefix = "/billing"
upstream_url = "{other.upstream_url}"
token_url = "{other.token_url}"
client_id = "m2m"
client_secret = "{other.emulator.client.secret}"
grant = "client_credentials"
scopes = "api/write"
""",
        )
        settings = load_settings(_base_env(stack, config))
        async with run_sidecar(settings, clock=clock) as sidecar:
            orders = (await client.get(f"{sidecar.url}/orders/7?x=1")).json()
            archive = (await client.get(f"{sidecar.url}/orders/archive/2020")).json()
            billing = (await client.get(f"{sidecar.url}/billing/invoices")).json()
            unknown = await client.get(f"{sidecar.url}/elsewhere")
            lookalike = await client.get(f"{sidecar.url}/ordersX")
            clock.advance(3600)
            for _ in range(3):
                await client.get(f"{sidecar.url}/orders/1")
                await client.get(f"{sidecar.url}/orders/archive/1")
            await client.get(f"{sidecar.url}/billing/again")
    assert orders["path"] == "/7" and orders["query_string"] == "x=1"  # prefix stripped
    assert orders["claims"]["token_use"] == "id"
    assert archive["path"] == "/orders/archive/2020"  # prefix kept
    assert archive["claims"]["token_use"] == "access"
    assert dict(archive["headers"])["authorization"].startswith("[token ")
    assert billing["claims"]["scope"] == "api/write"
    assert billing["path"] == "/invoices"
    assert unknown.status_code == 404
    assert unknown.headers["x-sidecar-error"] == "no_route"
    assert lookalike.status_code == 404
    # /orders and /orders/archive share one credential: one refresh each time, id and access from one answer.
    assert stack.token_requests == 2
    assert other.token_requests == 2
