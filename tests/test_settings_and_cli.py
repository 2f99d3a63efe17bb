"""Configuration loading and the command line, run as a person would run them."""

from __future__ import annotations

import asyncio
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest

from proxy import __version__
from proxy.settings import PATH_KEYS, Settings
from tests.conftest import (
    BASE,
    PLAIN_PYTHON,
    SECRET,
    Stack,
    assert_hidden,
    cli_env,
    installation_without,
    run_cli,
    sidecar_process,
    stack_env,
)


async def test_bad_configuration_exits_2_without_a_traceback():
    code, _, err = await run_cli("serve", env=cli_env(SIDECAR_CLIENT_SECRET=SECRET, SIDECAR_LISTEN="nonsense"))
    assert code == 2
    assert "Traceback" not in err
    assert "SIDECAR_UPSTREAM_URL: is required" in err
    assert "SIDECAR_LISTEN" in err
    assert SECRET not in err


async def test_busy_port_is_a_clear_error():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = cli_env(**BASE, SIDECAR_LISTEN=f"127.0.0.1:{port}")
        code, _, err = await run_cli("serve", env=env)
    assert code == 1
    assert "cannot listen on 127.0.0.1" in err and "address already in use" in err
    assert "Traceback" not in err


@pytest.mark.slow
async def test_serve_runs_as_a_process_and_stops_on_sigterm(stack: Stack, tmp_path: Path):
    token_file = tmp_path / "refresh-token"
    token_file.write_text(stack.emulator.refresh_token + "\n")
    token_file.chmod(stat.S_IRUSR | stat.S_IWUSR)
    env = stack_env(
        stack, SIDECAR_REFRESH_TOKEN_FILE=str(token_file), SIDECAR_LOG_LEVEL="debug", SIDECAR_ACCESS_LOG_QUERY="1"
    )
    async with sidecar_process(env) as sidecar, httpx2.AsyncClient(trust_env=False, timeout=30) as client:
        response = await client.get(f"{sidecar.url}/from-a-process?x=1")
        own = [(await client.get(f"{sidecar.url}{path}")).status_code for path in ("/-/healthz", "/-/nope")]
        code, text = await sidecar.stop()
    assert response.status_code == 200
    assert response.json()["claims"]["token_use"] == "id"
    assert code == 0
    assert "Traceback" not in text
    assert_hidden(text, stack.emulator.refresh_token, stack.emulator.client.secret or "")
    assert "token refreshed" in text
    # The access log: a forwarded request (status from the forwarder), and of the sidecar's own routes the error
    # only (a passing probe gets no line by default).
    assert own == [200, 404]
    assert '"GET /from-a-process?x=1" 200' in text
    assert '"GET /-/healthz"' not in text and '"GET /-/nope" 404' in text


@pytest.mark.slow
async def test_sigterm_keeps_serving_for_the_shutdown_delay_while_readiness_says_draining(stack: Stack):
    env = stack_env(stack, SIDECAR_REFRESH_TOKEN=stack.emulator.refresh_token, SIDECAR_SHUTDOWN_DELAY="1.5")
    async with sidecar_process(env) as sidecar, httpx2.AsyncClient(trust_env=False, timeout=30) as client:
        assert (await client.get(f"{sidecar.url}/before")).status_code == 200
        start = time.monotonic()
        sidecar.process.send_signal(signal.SIGTERM)
        await sidecar.read_until("draining")
        ready = await client.get(f"{sidecar.url}/-/readyz")
        assert (ready.status_code, ready.headers["x-sidecar-error"]) == (503, "draining")
        served = await client.get(f"{sidecar.url}/during-the-delay")
        assert served.status_code == 200  # a request on its way while endpoints update is still served
        code, text = await sidecar.stop(None)
        elapsed = time.monotonic() - start
    assert code == 0 and "Traceback" not in text
    assert elapsed >= 1.5  # the listener stayed open for the delay (a bound, not a timing measurement)


async def test_sigint_skips_the_shutdown_delay(stack: Stack):
    env = stack_env(stack, SIDECAR_REFRESH_TOKEN=stack.emulator.refresh_token, SIDECAR_SHUTDOWN_DELAY="60")
    async with sidecar_process(env) as sidecar, httpx2.AsyncClient(trust_env=False, timeout=30) as client:
        assert (await client.get(f"{sidecar.url}/-/healthz")).status_code == 200  # serving: signals are handled
        code, text = await sidecar.stop(signal.SIGINT)  # within the test's own timeout, far below 60 s
    assert code == 0 and "draining; new requests" not in text


async def test_a_second_signal_still_runs_the_shutdown_steps(stack: Stack):
    env = stack_env(stack, SIDECAR_REFRESH_TOKEN=stack.emulator.refresh_token, SIDECAR_LOG_LEVEL="info")
    async with sidecar_process(env) as sidecar, httpx2.AsyncClient(trust_env=False, timeout=30) as client:
        assert (await client.get(f"{sidecar.url}/x")).status_code == 200
        sidecar.process.send_signal(signal.SIGINT)
        await sidecar.read_until("Shutting down")
        sidecar.process.send_signal(signal.SIGINT)  # an impatient second Ctrl-C
        code, text = await sidecar.stop(None)
    assert code == 0
    assert "Traceback" not in text and "CancelledError" not in text
    assert "Application shutdown complete" in text


def test_version_and_serve_help_list_every_setting():
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == f"cognito-sidecar {__version__}"
    text = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    keys = {
        key
        for key in Settings.fields
        if key not in ("routes", "proxy_environment", "tracing_endpoint")
        and (not key.endswith("_file") or key in PATH_KEYS)
    }
    undescribed = {key for key in keys if not Settings.fields[key].description}
    assert not undescribed, undescribed
    assert "HTTPS_PROXY" in text and "NO_PROXY" in text
    for key in keys:
        assert f"SIDECAR_{key.upper()}" in text
    assert "SIDECAR_MAX_BODY_BYTES\n      largest request body, bytes; 0 for no limit (default: 10485760)" in text
    assert "(capped at half its life) (default: 300)\n" in text  # as a user writes it: no 300.0, no False
    assert "(default: False)" not in text and ".0)" not in text
    bare = subprocess.run([sys.executable, "-m", "proxy"], capture_output=True, text=True, timeout=60)
    assert bare.returncode == 0 and bare.stdout.startswith("usage: cognito-sidecar") and bare.stderr == ""


async def test_serve_options_override_their_variables(stack: Stack, tmp_path: Path):
    toml = tmp_path / "sidecar.toml"
    toml.write_text("read_timeout = 12\n")
    env = stack_env(stack, SIDECAR_REFRESH_TOKEN=stack.emulator.refresh_token, SIDECAR_LISTEN="127.0.0.1:1")
    env["SIDECAR_UPSTREAM_URL"] = "https://not-this-one.example/prod"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        stack.upstream_url,
        "--config",
        str(toml),
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    line = (await asyncio.wait_for(process.stderr.readline(), 30)).decode()
    try:
        assert f"forwarding to {stack.upstream_url} " in line and "listening on http://127.0.0.1:" in line, line
        url = line.split("listening on ")[1].split(",")[0]
        async with httpx2.AsyncClient(trust_env=False, timeout=30) as client:
            assert (await client.get(f"{url}/x")).status_code == 200
            rows = {row["name"]: row for row in (await client.get(f"{url}/-/config")).json()["settings"]}
        assert rows["SIDECAR_READ_TIMEOUT"]["value"] == "12"  # from the --config file
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.communicate(), 30)


async def test_without_the_emulator_demo_and_emulator_say_how_to_get_it_and_check_still_runs(tmp_path: Path):
    # The production image's tree: the package without proxy/emulator (the Dockerfile's build-sidecar stage).
    env = cli_env(PYTHONPATH=installation_without(tmp_path, parts=("emulator",)))
    for command in (["demo"], ["emulator", "--host", "127.0.0.1"]):
        status, out, err = await run_cli(*command, env=env, python=PLAIN_PYTHON)
        assert status == 2, err
        assert "the emulator is not in this installation" in err and "--target emulator" in err
        assert "Traceback" not in err and out == ""
    status, out, err = await run_cli(
        "check", env=env | {"SIDECAR_UPSTREAM_URL": "http://127.0.0.1:9/"}, python=PLAIN_PYTHON
    )
    assert status == 2 and "SIDECAR_COGNITO_DOMAIN" in out and "emulator" not in out + err  # settings, not imports


async def test_a_redis_store_without_redis_py_is_a_configuration_error_that_names_the_extra(tmp_path: Path):
    env = cli_env(PYTHONPATH=installation_without(tmp_path, packages=("redis",)))
    settings = {"SIDECAR_UPSTREAM_URL": "http://127.0.0.1:9/", "SIDECAR_TOKEN_URL": "http://127.0.0.1:9/oauth2/token"}
    settings |= {"SIDECAR_CLIENT_ID": "c", "SIDECAR_CLIENT_SECRET": "s", "SIDECAR_REFRESH_TOKEN": "r"}
    settings |= {"SIDECAR_ALLOW_INSECURE": "1", "SIDECAR_LISTEN": "127.0.0.1:0"}
    status, _, err = await run_cli(
        "serve", env=env | settings | {"SIDECAR_TOKEN_STORE": "redis://127.0.0.1:9/0"}, python=PLAIN_PYTHON
    )
    assert status == 2, err
    assert "SIDECAR_TOKEN_STORE" in err and "pip install 'cognito-sidecar[redis]'" in err and "Traceback" not in err


@pytest.mark.slow
async def test_demo_shows_the_whole_path():
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "demo",
        "--listen",
        "127.0.0.1:0",
        env=cli_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(30):
            while not any("curl -s" in line for line in lines):
                line = (await process.stdout.readline()).decode()
                assert line, "demo exited early: " + "".join(lines)
                lines.append(line)
    finally:
        process.send_signal(signal.SIGINT)
        out, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    text = "".join(lines) + out.decode()
    assert process.returncode == 0
    assert "HTTP 200" in text
    assert "token_use: id" in text
    assert "aud: demo-client" in text
    assert "eyJ" not in text  # no JWT is ever printed


@pytest.mark.slow
async def test_the_emulator_hands_its_credentials_to_a_sidecar_through_files_that_start_it_clean(tmp_path: Path):
    """The compose dev stack's way: no secret file in the repository, no warning at start."""
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    emulator = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "emulator",
        "--cognito-port",
        "0",
        "--api-port",
        "0",
        "--write-credentials",
        str(credentials),
        env=cli_env(),
        stdout=asyncio.subprocess.PIPE,
    )
    assert emulator.stdout is not None
    try:
        said = {}
        for _ in range(3):  # SIDECAR_TOKEN_URL=..., SIDECAR_UPSTREAM_URL=..., SIDECAR_CLIENT_ID=...
            name, _, value = (await asyncio.wait_for(emulator.stdout.readline(), 30)).decode().strip().partition("=")
            said[name] = value
        files = {path.name: stat.S_IMODE(path.stat().st_mode) for path in credentials.iterdir()}
        assert files == {"client_secret": 0o600, "refresh_token": 0o600}
        env = cli_env(
            **said,
            SIDECAR_CLIENT_SECRET_FILE=str(credentials / "client_secret"),
            SIDECAR_REFRESH_TOKEN_FILE=str(credentials / "refresh_token"),
            SIDECAR_LISTEN="127.0.0.1:0",
            SIDECAR_SHUTDOWN_DELAY="0",
        )
        async with sidecar_process(env) as sidecar, httpx2.AsyncClient(trust_env=False, timeout=30) as client:
            assert (await client.get(f"{sidecar.url}/hello")).status_code == 200
            ready = (await client.get(f"{sidecar.url}/-/readyz")).json()
            code, text = await sidecar.stop()
        assert code == 0 and "warning" not in ready
        assert " WARNING " not in text and " ERROR " not in text
        assert_hidden(text, (credentials / "refresh_token").read_text().strip())
    finally:
        emulator.send_signal(signal.SIGTERM)
        await asyncio.wait_for(emulator.wait(), 30)
