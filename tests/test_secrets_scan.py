"""A secrets scan over everything the sidecar produces in a run: logs at debug level, error bodies, metrics,
readiness, and the output of every CLI command, including when the token endpoint echoes the request.

Each secret is looked for raw, base64-encoded, form-encoded, and as the Basic credentials base64(id:secret).
"""

from __future__ import annotations

import base64
import os
import urllib.parse
from pathlib import Path

import httpx2
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from proxy.server.serving import running
from tests.conftest import assert_hidden, cli_env, raw_request, run_cli, run_stack, sidecar_process

CLIENT_ID = "scan-client"
API_KEY = "api-key-0123456789abcdef"
CALLER = "caller-token-0123456789abcdef"


def _forms(client_secret: str, *secrets: str) -> list[str]:
    out = []
    for secret in (client_secret, *secrets):
        out += [secret, base64.b64encode(secret.encode()).decode(), urllib.parse.quote_plus(secret)]
    basic = base64.b64encode(f"{CLIENT_ID}:{client_secret}".encode()).decode()
    return [*out, basic, basic.rstrip("=")]


async def _echoing_token_endpoint(request: Request) -> JSONResponse:
    # The worst token endpoint: it repeats the whole request in its error.
    body = (await request.body()).decode()
    return JSONResponse(
        {"error": "invalid_request", "echo": {"authorization": request.headers.get("authorization"), "form": body}},
        status_code=400,
    )


def _write(folder: Path, name: str, value: str, mode: int = 0o600) -> str:
    path = folder / name
    path.write_text(value + "\n")
    path.chmod(mode)
    return str(path)


@pytest.mark.slow
async def test_nothing_a_run_produces_holds_a_secret(tmp_path: Path):
    produced: list[str] = []
    echo = Starlette(routes=[Route("/oauth2/token", _echoing_token_endpoint, methods=["POST"])])
    async with running(echo) as echo_url, run_stack(client_id=CLIENT_ID, api_key=API_KEY) as stack:
        secret = stack.emulator.client.secret or ""
        refresh = stack.emulator.refresh_token
        secrets = tmp_path / "secrets"
        secrets.mkdir(mode=0o700)
        env = cli_env(
            SIDECAR_UPSTREAM_URL=stack.upstream_url,
            SIDECAR_TOKEN_URL=stack.token_url,
            SIDECAR_CLIENT_ID=CLIENT_ID,
            # Readable by others: a warning, which names the file, never its content.
            SIDECAR_CLIENT_SECRET_FILE=_write(secrets, "client_secret", secret, 0o644),
            SIDECAR_REFRESH_TOKEN_FILE=_write(secrets, "refresh_token", refresh),
            SIDECAR_API_KEY_FILE=_write(secrets, "api_key", API_KEY),
            SIDECAR_CALLER_TOKEN_FILE=_write(secrets, "caller_token", CALLER),
            SIDECAR_LISTEN="127.0.0.1:0",
            SIDECAR_LOG_LEVEL="debug",
        )
        async with httpx2.AsyncClient(trust_env=False, timeout=30) as client:
            # 1. The real emulator: good and refused requests of every kind.
            async with sidecar_process(env) as sidecar:
                caller = {"X-Sidecar-Caller": CALLER}
                responses = [
                    await client.get(f"{sidecar.url}/ok", headers=caller),
                    await client.post(f"{sidecar.url}/ok", headers=caller, content=b"body"),
                    await client.get(f"{sidecar.url}/x", headers={"X-Sidecar-Caller": "wrong"}),
                    await client.get(f"{sidecar.url}/x", headers={**caller, "Host": "rebind.attacker.example"}),
                    await client.get(f"{sidecar.url}/x", headers={**caller, "Origin": "http://evil.example"}),
                    await client.request("TRACE", f"{sidecar.url}/x", headers=caller),
                    await client.get(f"{sidecar.url}/-/readyz"),
                    await client.get(f"{sidecar.url}/-/metrics"),
                ]
                assert [r.status_code for r in responses[:6]] == [200, 200, 401, 421, 403, 405]
                assert "client_secret has mode 0644" in responses[6].json()["warning"]
                produced += [f"{r.status_code} {dict(r.headers)} {r.text}" for r in responses]
                for request in (
                    b"GET /x HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
                    b"GET /x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                    b"GET /b/../../x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
                ):
                    produced.append(repr(await raw_request(sidecar.url, request)))
                code, log = await sidecar.stop()
                assert code == 0
                produced.append(log)
                assert "client_secret has mode 0644" in log

            # 2. A token endpoint that echoes the request: its error is shown, redacted.
            echo_env = {**env, "SIDECAR_TOKEN_URL": f"{echo_url}/oauth2/token"}
            async with sidecar_process(echo_env) as sidecar:
                failed = await client.get(f"{sidecar.url}/x", headers={"X-Sidecar-Caller": CALLER})
                assert failed.status_code == 503
                assert "[redacted]" in failed.text
                ready = await client.get(f"{sidecar.url}/-/readyz")
                produced += [failed.text, ready.text, (await client.get(f"{sidecar.url}/-/metrics")).text]
                code, log = await sidecar.stop()
                produced.append(log)

        # 3. Every CLI command, both streams.
        for args, command_env in (
            (("check", "--path", "/health"), env),
            (("check",), echo_env),
            (("token",), env),
            (("token",), echo_env),
            (("serve",), {**env, "SIDECAR_LISTEN": "nonsense"}),
        ):
            status, out, err = await run_cli(*args, env=command_env)
            produced.append(f"{args} {status}\n{out}\n{err}")
            assert "Traceback" not in err
        assert "WARN  a secret file is open to other users" in produced[-5]

    assert len(produced) > 15
    everything = "\n".join(produced)
    assert_hidden(everything, *_forms(secret, refresh, API_KEY, CALLER))
    assert os.environ.get("SIDECAR_CLIENT_SECRET") is None  # nothing leaked into this process's own environment
