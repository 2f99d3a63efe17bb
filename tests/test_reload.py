"""Reloading every setting while serving (``proxy.reload``): a new TOML file takes effect for new requests,
requests in flight finish where they started, no credential buys a new token, an invalid configuration is
refused while the running one serves, and what needs a restart is named. Real servers on loopback, and a real
``serve`` process for SIGHUP and the file watcher."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import httpx2
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from proxy.reload import Reloader
from proxy.server.serving import running
from proxy.settings import load_settings
from tests.conftest import Stack, assert_hidden, awaiting, metric, run_cli, run_sidecar, sidecar_process, stack_env


class HeldUpstream:
    """An upstream whose answers wait until ``release`` is set; ``arrived`` is set when a request is waiting."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()
        self.app = Starlette(routes=[Route("/{rest:path}", self.answer)])

    async def answer(self, request: Request) -> JSONResponse:
        self.arrived.set()
        await self.release.wait()
        return JSONResponse({"held": True})


def write(path: Path, text: str) -> None:
    """Replace the file as an editor or a ConfigMap update does: a new file renamed into place."""
    new = path.with_suffix(".new")
    new.write_text(text)
    os.replace(new, path)


def route(prefix: str, url: str, extra: str = "") -> str:
    return f'[[routes]]\nprefix = "{prefix}"\nupstream_url = "{url}"\n{extra}\n'


@pytest.fixture
async def held() -> AsyncIterator[tuple[HeldUpstream, str]]:
    upstream = HeldUpstream()
    async with running(upstream.app) as url:
        yield upstream, url


async def test_a_new_toml_file_takes_effect_for_new_requests_while_one_in_flight_finishes(
    stack: Stack, client: httpx2.AsyncClient, tmp_path: Path, held: tuple[HeldUpstream, str]
):
    upstream, held_url = held
    toml = tmp_path / "sidecar.toml"
    write(toml, "read_timeout = 30\n" + route("/slow", held_url))
    env = stack_env(stack, SIDECAR_REFRESH_TOKEN=stack.emulator.refresh_token, SIDECAR_CONFIG=str(toml))
    async with run_sidecar(load_settings(env)) as sidecar:
        assert sidecar.app is not None
        reloader = Reloader(sidecar.app, env)
        in_flight = asyncio.create_task(client.get(f"{sidecar.url}/slow/report"))
        await upstream.arrived.wait()
        assert (await client.get(f"{sidecar.url}/orders")).status_code == 200
        # The held route goes; a new one comes, with its own header rule; a timeout changes.
        write(toml, "read_timeout = 12\n" + route("/b", stack.upstream_url, "strip_prefix = false"))
        with awaiting("pool_retired") as retired:
            assert await reloader.reload()
            new = await client.get(f"{sidecar.url}/b/items")
            moved = await client.get(f"{sidecar.url}/slow/report")  # the "/" route's now
            assert not in_flight.done()
            upstream.release.set()
            finished = await in_flight
            await asyncio.wait_for(retired.wait(), 10)  # its pool closes once that request has ended
        config = (await client.get(f"{sidecar.url}/-/config")).json()
        metrics = (await client.get(f"{sidecar.url}/-/metrics")).text
    assert (finished.status_code, finished.json()) == (200, {"held": True})
    assert new.status_code == 200 and new.json()["path"] == "/b/items"  # the new route's own rule
    assert moved.status_code == 200 and moved.json()["path"] == "/slow/report"
    assert stack.token_requests == 1  # the credential's provider, and its token, were kept
    assert sidecar.app.sidecar.forwarders[0].read_timeout == 12
    rows = {row["name"]: row for row in config["settings"]}
    assert (rows["SIDECAR_READ_TIMEOUT"]["value"], rows["SIDECAR_READ_TIMEOUT"]["source"]) == ("12", "toml")
    assert [each["prefix"] for each in config["routes"]] == ["/b"]
    # The counts go on across the reload: 2 before it, 3 after (/-/config included), and the scrape itself not.
    assert metric(metrics, "sidecar_requests_total", route="/", method="GET", status_class="2xx") == 2
    assert metric(metrics, "sidecar_requests_total", route="/slow", method="GET", status_class="2xx") == 1


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (route("/a", "ftp://nowhere"), "routes[0] (/a): upstream_url"),
        ("read_timeout = -1\n", "SIDECAR_READ_TIMEOUT: Input should be greater than 0"),
        ("[[routes]\n", "is not valid TOML"),
        (route("/a", "{url}", 'client_secret = "another-secret"'), "route /a: its client secret or refresh token"),
    ],
    ids=["bad-url", "bad-number", "bad-toml", "changed-credential"],
)
async def test_a_configuration_that_cannot_be_used_is_refused_and_the_running_one_serves(
    stack: Stack,
    client: httpx2.AsyncClient,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    change: str,
    problem: str,
):
    toml = tmp_path / "sidecar.toml"
    write(toml, route("/a", stack.upstream_url))
    env = stack_env(stack, SIDECAR_REFRESH_TOKEN=stack.emulator.refresh_token, SIDECAR_CONFIG=str(toml))
    async with run_sidecar(load_settings(env)) as sidecar:
        assert sidecar.app is not None
        before = sidecar.app.sidecar
        write(toml, change.replace("{url}", stack.upstream_url))
        reloader = Reloader(sidecar.app, env)
        with caplog.at_level(logging.ERROR, logger="proxy.reload"):
            assert not await reloader.reload()
            assert not await reloader.reload()  # refused again: compared with the running configuration
        assert sidecar.app.sidecar is before
        assert (await client.get(f"{sidecar.url}/a/x")).status_code == 200
    # Said at every look: the two asked for here, and the one the file watcher started on the change.
    refused = [r.getMessage() for r in caplog.records if r.name == "proxy.reload" and r.levelno == logging.ERROR]
    assert len(refused) >= 2
    text = refused[0]
    assert "refused, and the running one keeps serving" in text and problem in text
    assert_hidden(text, "another-secret", stack.emulator.refresh_token)


async def test_settings_that_need_a_restart_are_named_and_the_running_values_stay(
    stack: Stack, client: httpx2.AsyncClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    toml = tmp_path / "sidecar.toml"
    write(toml, "max_clients = 50\n")
    env = stack_env(stack, SIDECAR_REFRESH_TOKEN=stack.emulator.refresh_token, SIDECAR_CONFIG=str(toml))
    async with run_sidecar(load_settings(env)) as sidecar:
        assert sidecar.app is not None
        write(toml, 'max_clients = 7\nworkers = 2\ntoken_store = "file:/nonexistent/store"\n')
        with caplog.at_level(logging.INFO, logger="proxy.reload"):
            assert await Reloader(sidecar.app, env).reload()
        running_now = sidecar.app.sidecar
        assert (await client.get(f"{sidecar.url}/x")).status_code == 200
    assert running_now.limits.max_clients == 7  # the server's limits, changed in place
    assert (running_now.settings.workers, running_now.settings.token_store) == (1, "memory")
    said = " ".join(record.getMessage() for record in caplog.records)
    assert "SIDECAR_TOKEN_STORE, SIDECAR_WORKERS changed: taken up at the next restart" in said
    assert "configuration reloaded: SIDECAR_MAX_CLIENTS changed" in said


@pytest.mark.slow
async def test_a_serve_process_reloads_on_a_toml_change_and_on_sighup_and_refuses_a_broken_file(
    stack: Stack, tmp_path: Path
):
    toml = tmp_path / "sidecar.toml"
    write(toml, route("/a", stack.upstream_url))
    env = stack_env(stack, SIDECAR_REFRESH_TOKEN=stack.emulator.refresh_token, SIDECAR_CONFIG=str(toml))
    async with sidecar_process(env) as sidecar, httpx2.AsyncClient(trust_env=False, timeout=30) as client:
        assert (await client.get(f"{sidecar.url}/a/x")).status_code == 200
        write(toml, route("/a", stack.upstream_url) + route("/b", stack.upstream_url))
        await sidecar.read_until("configuration reloaded: routes changed")  # the file watcher saw it
        added = await client.get(f"{sidecar.url}/b/y")
        write(toml, "[[routes]\n")
        sidecar.process.send_signal(signal.SIGHUP)
        await sidecar.read_until("the new configuration is refused")
        still = await client.get(f"{sidecar.url}/b/y")
        config = (await client.get(f"{sidecar.url}/-/config")).json()
        code, said = await sidecar.stop()
    assert code == 0 and "Traceback" not in said
    assert added.status_code == 200 and added.json()["path"] == "/y"
    assert still.status_code == 200
    assert [each["prefix"] for each in config["routes"]] == ["/a", "/b"]
    assert stack.token_requests == 1
    assert_hidden(said + json.dumps(config), stack.emulator.refresh_token, stack.emulator.client.secret or "")


async def test_the_config_command_shows_each_value_and_where_it_came_from_never_a_secret(stack: Stack, tmp_path: Path):
    toml = tmp_path / "sidecar.toml"
    write(toml, "read_timeout = 12\n" + route("/a", stack.upstream_url))
    secret = tmp_path / "client_secret"
    secret.write_text(stack.emulator.client.secret or "")
    secret.chmod(0o600)
    env = stack_env(stack, SIDECAR_REFRESH_TOKEN=stack.emulator.refresh_token, SIDECAR_CONFIG=str(toml))
    del env["SIDECAR_CLIENT_SECRET"]
    env["SIDECAR_CLIENT_SECRET_FILE"] = str(secret)
    code, out, err = await run_cli("config", env=env)
    assert code == 0, err
    lines = {line.split(" = ")[0].strip(): line for line in out.splitlines() if " = " in line}
    assert lines["SIDECAR_READ_TIMEOUT"].endswith("= 12   (toml: read_timeout in SIDECAR_CONFIG)")
    assert lines["SIDECAR_CLIENT_SECRET"].endswith(f"= [file: {secret}]   (file: SIDECAR_CLIENT_SECRET_FILE)")
    assert lines["SIDECAR_REFRESH_TOKEN"].endswith("= [set]   (environment)")
    assert lines["SIDECAR_LISTEN"].endswith("(environment)")
    assert lines["SIDECAR_CONNECT_TIMEOUT"].endswith("= 5   (default)")
    assert "[[routes]] prefix = /a" in out
    code, out_json, _ = await run_cli("config", "--json", env=env)
    report = json.loads(out_json)
    assert code == 0 and report["routes"][0]["prefix"] == "/a"
    assert_hidden(out + out_json, stack.emulator.refresh_token, stack.emulator.client.secret or "")
    code, _, err = await run_cli("config", env={**env, "SIDECAR_READ_TIMEOUT": "soon"})
    assert code == 2 and "SIDECAR_READ_TIMEOUT" in err and "Traceback" not in err
