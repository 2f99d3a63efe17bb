"""Shared fixtures: the emulator, the sidecar and upstreams as real servers on ephemeral loopback ports."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx2
import pytest
from pydantic import SecretStr

from proxy.app import Sidecar, create_app
from proxy.cache import RetryPolicy
from proxy.emulator import EmulatorStack, make_stack
from proxy.serving import running
from proxy.settings import Settings

# Retries in tests: the same code path, with waits of milliseconds instead of seconds.
FAST_RETRY = RetryPolicy(attempts=3, wait_initial=0.01, wait_max=0.02, wait_jitter=0.0, deadline=5.0)


class FakeClock:
    """A wall clock the test moves by hand; shared by the emulator and the sidecar."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Stack:
    emulator: EmulatorStack
    cognito_url: str
    api_url: str

    @property
    def token_url(self) -> str:
        return f"{self.cognito_url}/oauth2/token"

    @property
    def upstream_url(self) -> str:
        return f"{self.api_url}/{self.emulator.apigw.stage}"

    @property
    def token_requests(self) -> int:
        return self.emulator.cognito.token_requests

    def settings(self, **overrides: Any) -> Settings:
        secret = self.emulator.client.secret
        values: dict[str, Any] = {
            "upstream_url": self.upstream_url,
            "token_url": self.token_url,
            "client_id": self.emulator.client.client_id,
            "client_secret": SecretStr(secret) if secret else None,
            "refresh_token": SecretStr(self.emulator.refresh_token) if self.emulator.refresh_token else None,
            "listen": "127.0.0.1:0",
            "access_log": False,
        }
        values.update(overrides)
        return Settings(**values)


@contextlib.asynccontextmanager
async def run_stack(**options: Any) -> AsyncIterator[Stack]:
    emulator = make_stack(**options)
    async with running(emulator.cognito.app) as cognito_url, running(emulator.apigw) as api_url:
        yield Stack(emulator, cognito_url, api_url)


@dataclass
class RunningSidecar:
    url: str
    parts: Sidecar


@contextlib.asynccontextmanager
async def run_sidecar(settings: Settings, *, clock: Callable[[], float] | None = None) -> AsyncIterator[RunningSidecar]:
    kwargs: dict[str, Any] = {"retry": FAST_RETRY}
    if clock is not None:
        kwargs["clock"] = clock
    app = create_app(settings, **kwargs)
    async with running(app) as url:
        yield RunningSidecar(url, app.state.sidecar)


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    async with run_stack() as value:
        yield value


@pytest.fixture
async def sidecar(stack: Stack) -> AsyncIterator[RunningSidecar]:
    async with run_sidecar(stack.settings()) as value:
        yield value


@pytest.fixture
async def client() -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(trust_env=False, timeout=30) as value:
        yield value


async def raw_request(url: str, request: bytes) -> tuple[int, dict[str, list[str]], bytes]:
    """Send exact bytes to ``url``'s host and port and read one response (Connection: close)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=30)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return status, headers, body


def cli_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any SIDECAR_ setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env.update(extra)
    return env


async def run_cli(*args: str, env: dict[str, str], limit: float = 60) -> tuple[int, str, str]:
    """Run ``python -m proxy ARGS`` to completion; exit status, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=limit)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()
