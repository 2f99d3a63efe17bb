"""`login`, `token` and `check` run as a person runs them, against the emulator, with every failure explained."""

from __future__ import annotations

import asyncio
import socket
import stat
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx2
import pytest

from proxy.secrets import read_secret_file
from proxy.settings import SecretStr
from tests.conftest import Stack, assert_hidden, cli_env, run_cli, run_sidecar, run_stack, stack_env


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _register(stack: Stack, redirect_uri: str) -> None:
    stack.emulator.client.redirect_uris = (*stack.emulator.client.redirect_uris, redirect_uri)


async def start_login(stack: Stack, *args: str) -> asyncio.subprocess.Process:
    """``cognito-sidecar login ARGS`` as a child process that does not open a browser."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "login", *args, "--no-browser", "--timeout", "30",
        env=stack_env(stack), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def stderr_line_with(process: asyncio.subprocess.Process, text: str) -> str:
    """Read the child's stderr up to the first line containing ``text``."""
    assert process.stderr is not None
    async with asyncio.timeout(30):
        while True:
            line = (await process.stderr.readline()).decode()
            assert line, "login exited early"
            if text in line:
                return line


async def _code_for(stack: Stack, client: httpx2.AsyncClient, redirect_uri: str, **params: str) -> str:
    """What a browser sign-in gives: the code from the redirect's query string."""
    query = {
        "response_type": "code",
        "client_id": stack.emulator.client.client_id,
        "redirect_uri": redirect_uri,
        "scope": "openid",
        "state": "s",
        **params,
    }
    response = await client.get(f"{stack.cognito_url}/oauth2/authorize", params=query)
    assert response.status_code == 302, response.text
    return parse_qs(urlsplit(response.headers["location"]).query)["code"][0]


@pytest.mark.slow
async def test_login_end_to_end_with_the_listener(stack: Stack, client: httpx2.AsyncClient, tmp_path: Path):
    redirect_uri = f"http://127.0.0.1:{_free_port()}/callback"
    _register(stack, redirect_uri)
    out = tmp_path / "secrets" / "refresh-token"
    process = await start_login(stack, "--redirect-uri", redirect_uri, "--out", str(out))
    url = (await stderr_line_with(process, "/oauth2/authorize?")).strip()
    assert "code_challenge_method=S256" in url and "state=" in url
    # The "browser": Cognito's hosted UI signs the test user in and redirects to the listener, which was
    # listening before the URL was printed.
    page = await client.get(url, follow_redirects=True)
    assert page.status_code == 200
    assert "You can close this tab" in page.text
    out_text, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0, err
    assert out_text == b""  # the refresh token is not printed unless asked
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert f"SIDECAR_REFRESH_TOKEN_FILE={out}" in err.decode()
    # And the credential works in the sidecar.
    settings = stack.settings(refresh_token=SecretStr(out.read_text().strip()), refresh_token_file=out)
    async with run_sidecar(settings) as sidecar:
        assert (await client.get(f"{sidecar.url}/after-login")).status_code == 200


async def test_login_with_a_copied_code(stack: Stack, client: httpx2.AsyncClient):
    redirect_uri = "https://myapp.example/callback"
    _register(stack, redirect_uri)
    code = await _code_for(stack, client, redirect_uri)
    status, out, err = await run_cli(
        "login", "--code", code, "--redirect-uri", redirect_uri, "--print", env=stack_env(stack)
    )
    assert status == 0, err
    looks_like_a_refresh_token = len(out.strip()) > 20  # a bool: the token stays out of failure messages
    assert looks_like_a_refresh_token
    assert "eyJ" not in out  # the refresh token only, no JWT


async def test_first_run_login_writes_the_file_the_settings_name(
    stack: Stack, client: httpx2.AsyncClient, tmp_path: Path
):
    # As config/example.env has it: SIDECAR_REFRESH_TOKEN_FILE names the file login is about to create, in a
    # directory that does not exist yet either.
    target = tmp_path / "new" / "secrets" / "refresh-token"
    redirect_uri = "https://myapp.example/callback"
    _register(stack, redirect_uri)
    for args in ((), ("--out", str(target))):
        code = await _code_for(stack, client, redirect_uri)
        env = stack_env(stack, SIDECAR_REFRESH_TOKEN_FILE=str(target))
        status, out, err = await run_cli("login", "--code", code, "--redirect-uri", redirect_uri, *args, env=env)
        assert status == 0, err
        assert out == "" and f"Saved the refresh token to {target}" in err
        assert stat.S_IMODE(target.stat().st_mode) == 0o600
        assert stat.S_IMODE(target.parent.stat().st_mode) == 0o700
        target.unlink()
        target.parent.rmdir()


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("trailing slash", "trailing slash counts"),
        ("used twice", "already used"),
        ("wrong verifier", "code_verifier does not match"),
        ("wrong secret", "encoded once"),
    ],
)
async def test_login_failures_explain_themselves(stack: Stack, client: httpx2.AsyncClient, case: str, expected: str):
    redirect_uri = "http://localhost:8001/callback"
    params = {"code_challenge": "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM", "code_challenge_method": "S256"}
    code = await _code_for(stack, client, redirect_uri, **(params if case == "wrong verifier" else {}))
    args = ["login", "--code", code, "--redirect-uri", redirect_uri, "--print"]
    env = stack_env(stack)
    if case == "trailing slash":
        args[4] = redirect_uri + "/"
    elif case == "used twice":
        assert (await run_cli(*args, env=env))[0] == 0
    elif case == "wrong verifier":
        args += ["--code-verifier", "not-the-verifier"]
    elif case == "wrong secret":
        env["SIDECAR_CLIENT_SECRET"] = "wrong"
    status, out, err = await run_cli(*args, env=env)
    assert status == 1
    assert out == ""
    assert expected in err
    assert "Token endpoint answered HTTP 400" in err
    assert "Traceback" not in err


async def test_sign_in_refused_at_the_hosted_ui(stack: Stack, client: httpx2.AsyncClient):
    port = _free_port()
    redirect_uri = f"http://127.0.0.1:{port}/cb"
    process = await start_login(stack, "--redirect-uri", redirect_uri, "--print")
    await stderr_line_with(process, "Waiting up to")  # printed once the listener is bound
    # Cognito redirects the browser with an error instead of a code.
    page = await client.get(f"{redirect_uri}?error=access_denied&error_description=User+cancelled")
    _, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert page.status_code == 400
    assert process.returncode == 1
    assert "access_denied (User cancelled)" in err.decode()


async def test_token_prints_only_the_token(stack: Stack, client: httpx2.AsyncClient):
    env = stack_env(stack, SIDECAR_REFRESH_TOKEN=stack.emulator.refresh_token)
    status, out, err = await run_cli("token", env=env)
    assert status == 0, err
    token = out.strip()
    one_line, is_jwt = out == token + "\n", token.count(".") == 2  # bools: no token in a failure message
    assert one_line
    assert is_jwt
    # It is usable as-is: curl -H "Authorization: $(cognito-sidecar token)" ...
    response = await client.get(f"{stack.upstream_url}/direct", headers={"Authorization": token})
    assert response.json()["claims"]["token_use"] == "id"
    status, out, _ = await run_cli("token", "--type", "access", env=env)
    response = await client.get(f"{stack.upstream_url}/direct", headers={"Authorization": out.strip()})
    assert response.json()["claims"]["token_use"] == "access"


CAUSES = {
    "invalid_request": "a required form field is missing",
    "invalid_client": "encoded once",
    "invalid_grant": "its life counts from the original sign-in",
    "unauthorized_client": "ALLOW_REFRESH_TOKEN_AUTH",
    "unsupported_grant_type": "SIDECAR_TOKEN_URL is not a Cognito token endpoint",
    "invalid_scope": "not allowed for this app client",
}


@pytest.mark.parametrize("error", sorted(CAUSES))
async def test_every_cognito_error_is_explained_by_token(stack: Stack, error: str):
    stack.emulator.cognito.fail_next(400, f'{{"error":"{error}"}}')
    status, out, err = await run_cli("token", env=stack_env(stack, SIDECAR_REFRESH_TOKEN=stack.emulator.refresh_token))
    assert status == 1
    assert out == ""
    assert f"Cognito refused the refresh request with {error}" in err
    assert err.count(f"Cognito refused the refresh request with {error}") == 1  # said once, not logged again
    assert CAUSES[error] in err
    assert f'{{"error":"{error}"}}' in err  # the raw body
    assert_hidden(err, stack.emulator.refresh_token)


@pytest.mark.parametrize(
    ("status_code", "body", "expected"),
    [
        (503, "<html><body><h1>503 Service Temporarily Unavailable</h1></body></html>", "HTTP 503"),
        (429, '{"message":"Rate exceeded"}', "throttling"),
    ],
)
async def test_unknown_and_throttled_answers_are_explained(stack: Stack, status_code: int, body: str, expected: str):
    stack.emulator.cognito.fail_next(status_code, body, times=20, content_type="text/html")
    env = stack_env(stack, SIDECAR_REFRESH_TOKEN=stack.emulator.refresh_token)
    status, _, err = await run_cli("token", env=env)
    assert status == 1
    assert expected in err
    assert body[:40] in err


async def test_one_shot_commands_say_a_failure_on_lines_of_its_own_and_promise_no_retry(stack: Stack):
    stack.emulator.cognito.fail_next(503, "busy", times=20, content_type="text/plain")
    status, out, err = await run_cli("token", env=stack_env(stack, SIDECAR_REFRESH_TOKEN=stack.emulator.refresh_token))
    assert (status, out) == (1, "")
    lines = err.splitlines()
    assert lines[0] == "cognito-sidecar: The token endpoint failed (HTTP 503)."
    assert lines[1:3] == ["Likely causes:", "  - Cognito or a proxy in between is having trouble"]
    assert lines[3] == "What to do: if it persists, check the token endpoint's health."
    assert lines[4] == "Token endpoint answered HTTP 503: busy"
    assert "retrying" not in err and "keeps trying" not in err  # it tried once, and is done
    async with run_sidecar(stack.settings()) as sidecar, httpx2.AsyncClient(trust_env=False) as client:
        detail = (await client.get(f"{sidecar.url}/x")).json()["detail"]
    assert "\n" not in detail and "; the sidecar keeps retrying." in detail  # one line, from a sidecar that does


async def test_check_passes_and_shows_claims_not_the_token(stack: Stack):
    env = stack_env(stack, SIDECAR_REFRESH_TOKEN=stack.emulator.refresh_token)
    status, out, err = await run_cli("check", "--path", "/health", env=env)
    assert status == 0, out + err
    assert "PASS  a real refresh worked: id_token" in out
    assert "token_use=id" in out and f"aud={stack.emulator.client.client_id}" in out
    assert "answered 200 with the token" in out
    assert "eyJ" not in out + err
    assert_hidden(out + err, stack.emulator.refresh_token)


async def test_check_explains_a_wrong_stage_and_an_access_token_without_scopes(stack: Stack):
    env = stack_env(
        stack,
        SIDECAR_REFRESH_TOKEN=stack.emulator.refresh_token,
        SIDECAR_UPSTREAM_URL=f"{stack.api_url}/staging",
        SIDECAR_TOKEN="access_token",
    )
    status, out, _ = await run_cli("check", "--path", "/health", env=env)
    assert status == 1
    assert "WARN  the access token carries no custom scope" in out
    assert "FAIL  GET" in out and "Missing Authentication Token" in out
    assert "wrong stage or path" in out


async def test_check_reports_bad_settings_and_unresolvable_hosts():
    status, out, _ = await run_cli("check", env=cli_env(SIDECAR_CLIENT_ID="x"))
    assert status == 2  # a configuration problem, as every command says one
    assert "FAIL  setting" in out and "SIDECAR_TOKEN_URL: is required: set SIDECAR_COGNITO_DOMAIN" in out
    env = cli_env(
        SIDECAR_COGNITO_DOMAIN="https://no-such-domain.invalid",
        SIDECAR_CLIENT_ID="x",
        SIDECAR_REFRESH_TOKEN="y",
    )
    status, out, _ = await run_cli("check", env=env)
    assert status == 1
    assert "does not resolve" in out


async def test_check_says_what_rotation_needs(tmp_path: Path):
    async with run_stack(rotate_refresh_tokens=True, grace_period=30) as stack:
        token_file = tmp_path / "refresh-token"
        token_file.write_text(stack.emulator.refresh_token + "\n")
        env = stack_env(stack, SIDECAR_REFRESH_TOKEN_FILE=str(token_file))
        status, out, err = await run_cli("check", env=env)
    assert status == 0, out + err
    assert "WARN  Cognito rotates this app client's refresh tokens" in out
    assert "RetryGracePeriodSeconds" in out
    assert f"the new one is in {token_file}" in out
    assert_hidden(out + err, stack.emulator.refresh_token, read_secret_file(token_file))
