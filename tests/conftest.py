"""Shared fixtures: the emulator, the sidecar and upstreams as real servers on ephemeral loopback ports."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import sysconfig
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families

import proxy
from proxy.app import SidecarApp, create_app
from proxy.emulator import EmulatorStack, make_stack
from proxy.forward import Forwarder
from proxy.server.serving import ServerTls, bind_listen, bound_url, running
from proxy.settings import SecretStr, Settings
from proxy.sidecar import Sidecar
from proxy.tokens.grants import Grant
from proxy.tokens.provider import TokenProvider
from proxy.tokens.schedule import RefreshPolicy

# Retries in tests: the same code path, with waits of milliseconds instead of seconds. The refusal hold and
# the 401 rate limit keep their real values: tests count on them.
FAST_POLICY = RefreshPolicy(first_wait=0.01, max_wait=0.05, min_interval=0.01, throttled_wait=0.01)


class FakeClock:
    """A clock the test moves by hand, shared by the emulator (as its wall clock) and the sidecar (as its
    monotonic and wall clock, and for the refresher's sleeps: ``advance`` wakes the sleepers it passes)."""

    def __init__(self) -> None:
        self.now = float(int(time.time()))  # whole seconds, as a JWT's iat and exp are
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []
        self.sleeps = 0  # sleeps begun so far
        self._slept = asyncio.Event()

    def __call__(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        entry = (self.now + seconds, asyncio.get_running_loop().create_future())
        self._sleepers.append(entry)
        self.sleeps += 1
        self._slept.set()
        try:
            await entry[1]
        finally:
            self._sleepers.remove(entry)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for due, future in self._sleepers:
            if due <= self.now and not future.done():
                future.set_result(None)

    async def settle(self, seconds: float, *, limit: float = 30) -> None:
        """``advance``, then wait (bounded, in real time) until every sleeper it woke sleeps again: whatever the
        clock drives (the refresher) has done its work for the new time."""
        woken = sum(1 for due, future in self._sleepers if due <= self.now + seconds and not future.done())
        target = self.sleeps + woken
        self.advance(seconds)
        async with asyncio.timeout(limit):
            while self.sleeps < target:
                self._slept.clear()
                await self._slept.wait()


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

    def use_clock(self, clock: Callable[[], float]) -> None:
        """Make the emulated Cognito and API Gateway tell time by ``clock`` (pass the same to the sidecar)."""
        self.emulator.cognito.clock = clock
        self.emulator.apigw._clock = clock

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
async def run_stack(*, tls: ServerTls | None = None, host: str = "127.0.0.1", **options: Any) -> AsyncIterator[Stack]:
    """The emulator's Cognito and API Gateway, over HTTPS with ``tls``."""
    emulator = make_stack(**options)
    async with (
        running(emulator.cognito.app, tls=tls, host=host) as cognito_url,
        running(emulator.apigw, tls=tls, host=host) as api_url,
    ):
        yield Stack(emulator, cognito_url, api_url)


@dataclass
class RunningSidecar:
    url: str
    parts: Sidecar
    metrics_url: str | None = None  # SIDECAR_METRICS_LISTEN's, when the settings have it
    app: SidecarApp | None = None

    # The first route's pieces: the whole sidecar in the usual one-route form.
    @property
    def tokens(self) -> TokenProvider:
        return self.parts.providers[0]

    @property
    def grant(self) -> Grant:
        return self.tokens.grant

    @property
    def forwarder(self) -> Forwarder:
        return self.parts.routes[-1].forwarder


@contextlib.asynccontextmanager
async def run_sidecar(
    settings: Settings,
    *,
    clock: FakeClock | None = None,
    policy: RefreshPolicy = FAST_POLICY,
    watch_interval: float = 0.05,
    host: str = "127.0.0.1",
) -> AsyncIterator[RunningSidecar]:
    kwargs: dict[str, Any] = {"policy": policy, "watch_interval": watch_interval}
    if clock is not None:
        kwargs["clock"] = clock
    also = [bind_listen(settings.metrics_listen)] if settings.metrics_listen else []
    app = create_app(settings, metrics_port=also[0].getsockname()[1] if also else None, **kwargs)
    async with running(app, host=host, limits=app.sidecar.limits, also=also) as url:
        yield RunningSidecar(url, app.sidecar, bound_url(also[0]) if also else None, app)


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


# The proxy variables of the machine running the tests: never inherited by a sidecar process (loopback traffic
# would go to the machine's proxy); tests that want a proxy set their own.
PROXY_VARIABLES = frozenset({"https_proxy", "http_proxy", "no_proxy", "all_proxy"})


# Settings for tests that need no server: made-up values, which must never show in any output.
SECRET = "s3cr3t-client-secret"
REFRESH = "rt-very-secret-refresh-token"

BASE = {
    "SIDECAR_UPSTREAM_URL": "https://abc123.execute-api.us-east-1.amazonaws.com/prod",
    "SIDECAR_COGNITO_DOMAIN": "https://my-app.auth.us-east-1.amazoncognito.com",
    "SIDECAR_CLIENT_ID": "client123",
    "SIDECAR_CLIENT_SECRET": SECRET,
    "SIDECAR_REFRESH_TOKEN": REFRESH,
}


def cli_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any SIDECAR_ setting or proxy variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_") and k.lower() not in PROXY_VARIABLES}
    env.update(extra)
    return env


async def run_cli(
    *args: str, env: dict[str, str], limit: float = 60, python: tuple[str, ...] = ()
) -> tuple[int, str, str]:
    """Run ``python [PYTHON] -m proxy ARGS`` to completion; exit status, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *python,
        "-m",
        "proxy",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout=limit)
    finally:
        if process.returncode is None:  # timed out (or cancelled): never leave it running, holding a port
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


# Run the CLI in an installation made by installation_without: no .pth file (-S: the editable install's finder
# would supply what is missing) and no working directory (-P: a checkout) on the path.
PLAIN_PYTHON = ("-S", "-P")


def installation_without(root: Path, *, packages: tuple[str, ...] = (), parts: tuple[str, ...] = ()) -> str:
    """A PYTHONPATH for this project installed without some of it, as a user's installation or an image has it:
    ``proxy`` copied without its subpackages ``parts``, and site-packages linked entry by entry without the
    distributions ``packages`` (their modules and metadata). Run with ``python *PLAIN_PYTHON``."""
    source = Path(proxy.__file__).parent
    shutil.copytree(source, root / "src" / "proxy", ignore=shutil.ignore_patterns("__pycache__"))
    for part in parts:
        shutil.rmtree(root / "src" / "proxy" / part)
    site = Path(sysconfig.get_paths()["purelib"])
    (root / "site").mkdir()
    for entry in site.iterdir():
        name = entry.name.split("-")[0].lower()
        if name not in packages and entry.suffix != ".pth":
            (root / "site" / entry.name).symlink_to(entry)
    return os.pathsep.join([str(root / "src"), str(root / "site")])


def stack_env(stack: Stack, **extra: str) -> dict[str, str]:
    """Environment for a sidecar command talking to ``stack``, on an ephemeral port; ``extra`` adds or overrides."""
    values = {
        "SIDECAR_UPSTREAM_URL": stack.upstream_url,
        "SIDECAR_TOKEN_URL": stack.token_url,
        "SIDECAR_CLIENT_ID": stack.emulator.client.client_id,
        "SIDECAR_CLIENT_SECRET": stack.emulator.client.secret or "",
        "SIDECAR_LISTEN": "127.0.0.1:0",
        # SIGTERM stops at once unless a test is about the delay.
        "SIDECAR_SHUTDOWN_DELAY": "0",
    }
    return cli_env(**(values | extra))


@dataclass
class SidecarProcess:
    """``cognito-sidecar serve`` as a child process, with the stderr lines read so far."""

    process: asyncio.subprocess.Process
    url: str
    lines: list[str]

    async def read_until(self, text: str, *, limit: float = 30) -> str:
        """Read stderr lines until one contains ``text``; that line."""
        assert self.process.stderr is not None
        async with asyncio.timeout(limit):
            while True:
                line = (await self.process.stderr.readline()).decode()
                assert line, "the sidecar exited; it said:\n" + "".join(self.lines)
                self.lines.append(line)
                if text in line:
                    return line

    async def stop(self, sig: int | None = signal.SIGTERM) -> tuple[int, str]:
        """Send ``sig`` (None: none, it is stopping already), read the rest of stderr, wait; the exit status
        and everything it logged."""
        assert self.process.stderr is not None
        if self.process.returncode is None and sig is not None:
            self.process.send_signal(sig)
        rest = await asyncio.wait_for(self.process.stderr.read(), timeout=30)
        code = await asyncio.wait_for(self.process.wait(), timeout=30)
        self.lines.append(rest.decode())
        return code, "".join(self.lines)


@contextlib.asynccontextmanager
async def sidecar_process(env: dict[str, str]) -> AsyncIterator[SidecarProcess]:
    """Start ``python -m proxy serve`` with ``env``; yields once it logged where it listens (no polling)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", env=env, stderr=asyncio.subprocess.PIPE
    )
    child = SidecarProcess(process, "", [])
    try:
        line = await child.read_until("listening on ")
        child.url = line.split("listening on ")[1].split(",")[0]
        yield child
    finally:
        if process.returncode is None:
            await child.stop(signal.SIGKILL)


def assert_hidden(text: str, *secrets: str) -> None:
    """Fail if a secret shows in ``text``, without putting the secret in the failure message."""
    leaked = [index for index, secret in enumerate(secrets) if secret and secret in text]
    if leaked:
        raise AssertionError(f"secret(s) {leaked} of {len(secrets)} appear in the output")


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value in a Prometheus text exposition, read with prometheus-client's parser (which fails on
    a malformed exposition); fails when the sample is absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"{name}{labels} not in the metrics")


@contextlib.asynccontextmanager
async def raw_upstream(
    answer: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[str]:
    """A TCP server on an ephemeral loopback port that answers every connection with ``answer``: for
    upstreams that misbehave in ways a framework would not let them."""
    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}/s"
        server.close()


def answering(raw: bytes) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """For ``raw_upstream``: read a request head, answer ``raw`` (exact bytes), close."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(raw)
        await writer.drain()
        writer.close()

    return answer


# An answer that promises 1,000 body bytes and breaks off after 7.
BREAKS_OFF = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial"


class SilentUpstream:
    """Accepts connections and never answers until ``release`` is set; ``accepted`` once one came in."""

    def __init__(self) -> None:
        self.accepted = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted.set()
        await self.release.wait()
        writer.close()

    async def first_connection(self) -> None:
        async with asyncio.timeout(30):
            await self.accepted.wait()


@contextlib.contextmanager
def awaiting(event_name: str) -> Iterator[asyncio.Event]:
    """An event set when the package logs a line for ``event_name`` (what the sidecar reports, as it reports it)."""
    seen = asyncio.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            happened = getattr(record, "sidecar_event", None)  # what logs.event() attaches: (name, fields)
            if happened is not None and happened[0] == event_name:
                seen.set()

    handler = Watch()
    logger = logging.getLogger("proxy")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(min(logger.getEffectiveLevel(), logging.INFO))  # events at INFO are seen too
    try:
        yield seen
    finally:
        logger.setLevel(level)
        logger.removeHandler(handler)
