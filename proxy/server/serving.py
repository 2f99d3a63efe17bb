"""Running ASGI apps under uvicorn on sockets the sidecar binds itself.

Binding first means the real port is known at once (``:0`` picks a free one, as tests and the demo do)
and a busy port is a clear error rather than a traceback. Several apps can run in one event loop
(the demo runs the emulator and the sidecar together) because signals are left to the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import ssl
import stat
from collections.abc import AsyncIterator, Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from proxy.errors import SidecarError
from proxy.listen import parse_listen
from proxy.logs import quiet_uvicorn
from proxy.server.coalesce import CoalescingHttpToolsProtocol
from proxy.server.limits import KEEP_ALIVE_TIMEOUT, ConnectionLimits, protocol_for
from proxy.types import ASGIApp, Message, Receive, Scope, Send

# How long in-flight requests may run on after a stop is asked for.
DEFAULT_GRACE = 10
# Loop steps a stopped embedded server is given for its closed connections to finish closing.
SHUTDOWN_SETTLE_STEPS = 3
# uvicorn's main loop: a tick every 0.1 s (the Date header, the request limit), its counter wrapping daily.
TICK = 0.1
TICKS_PER_DAY = 864000

log = logging.getLogger("proxy.serving")


class ListenError(SidecarError, OSError):
    """The listen address cannot be bound."""

    code = "cannot_listen"

    def __init__(self, host: str, port: int, reason: str) -> None:
        self.host = host
        self.port = port
        self.reason = reason
        SidecarError.__init__(
            self,
            f"cannot listen on {format_address(host, port)}: {reason}. "
            "Choose another address with SIDECAR_LISTEN (e.g. 127.0.0.1:8081), or stop what is using it.",
        )


# A young-generation collection every 700 allocations (CPython's default) walks the many short-lived
# objects of each request; at 32 connections the resulting pauses made p99 about 3x p50. Collecting
# less often, with start-up objects frozen out of every scan, cut p99 from ~40 ms to ~13 ms.
GC_THRESHOLDS = (50_000, 20, 20)


def tune_gc() -> None:
    """Freeze what exists (imports, the app) and collect young objects less often; call once, before serving."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket on ``host:port``; raises ``ListenError`` with a plain reason.

    ``reuse_port``: the first of several on the same address (``SO_REUSEPORT``, see ``worker_listeners``), where
    nothing may listen yet: a plain bind must succeed first (and is given back at once), since a socket that shares
    its port would otherwise share it without a word with another sidecar of the same user left running there."""
    if reuse_port:
        probe = _bind_once(host, port, reuse_port=False, listen=False)
        port = probe.getsockname()[1]  # the one the system gave, for port 0
        probe.close()
    return _bind_once(host, port, reuse_port=reuse_port, listen=True)


def _bind_once(host: str, port: int, *, reuse_port: bool, listen: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must say TCP: asyncio turns Nagle off only on sockets that do, and with Nagle on, a response
    # written as headers then body waits ~40 ms for a delayed ACK on every keep-alive request.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(2048)
    except socket.gaierror as exc:
        sock.close()
        raise ListenError(host, port, f"unknown host ({exc.strerror})") from None
    except OSError as exc:
        sock.close()
        raise ListenError(host, port, (exc.strerror or str(exc)).lower()) from None
    sock.setblocking(False)
    return sock


def bind_unix(path: str, mode: int) -> socket.socket:
    """A listening Unix socket at ``path`` with file mode ``mode`` (who may connect is who may use the credential).

    A stale socket left by a killed sidecar is replaced; any other file at ``path`` is an error.
    """
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ListenError("unix:" + path, 0, (exc.strerror or str(exc)).lower()) from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Created with no access for anyone but the owner, then opened up to ``mode``: never briefly wider.
    previous = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise ListenError("unix:" + path, 0, (exc.strerror or str(exc)).lower()) from None
    finally:
        os.umask(previous)
    os.chmod(path, mode)
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def bind_listen(listen: str, *, socket_mode: int = 0o660, reuse_port: bool = False) -> socket.socket:
    """``bind`` or ``bind_unix`` for a ``SIDECAR_LISTEN`` value (``host:port`` or ``unix:/path``); ``reuse_port``
    applies to TCP."""
    if listen.startswith("unix:"):
        return bind_unix(listen.removeprefix("unix:"), socket_mode)
    return bind(*parse_listen(listen), reuse_port=reuse_port)


def worker_listeners(first: socket.socket, count: int) -> list[socket.socket]:
    """``count`` listening sockets for ``count`` workers: ``first`` and, for TCP (``first`` bound with
    ``reuse_port``), ``count - 1`` more on its address, so that each worker accepts from a queue of its own.

    On one shared socket every worker is woken for each new connection and the first awake accepts all that are
    waiting: 64 connections opened at once went 60 to 4, 62 to 2, or all to one (tests/test_shared_store.py). With
    ``SO_REUSEPORT`` the kernel hands each connection to one socket by a hash of its addresses and ports, so the
    workers get even shares to within chance. Only processes of the same user may join the group, and ``first``
    was bound where nothing listened (``bind``). A Unix socket has one queue (Linux balances no other way), so its
    workers share ``first``. The supervisor keeps every socket open: a worker's queue waits for it while it is
    started again."""
    if first.family == socket.AF_UNIX:
        return [first] * count
    host, port = first.getsockname()[:2]
    listeners = [first]
    try:
        for _ in range(count - 1):
            listeners.append(_bind_once(host, port, reuse_port=True, listen=True))  # joins ``first``
    except ListenError:
        for sock in listeners[1:]:
            sock.close()
        raise
    return listeners


def bound_url(sock: socket.socket, *, https: bool = False) -> str:
    if sock.family == socket.AF_UNIX:
        return f"unix:{sock.getsockname()}"
    host, port = sock.getsockname()[:2]
    return f"{'https' if https else 'http'}://{format_address(host, port)}"


@dataclass(frozen=True)
class ServerTls:
    """TLS for a server the emulator or a test runs: its certificate and key, and the CA whose client certificates it
    requires (``client_ca_file``; None: none asked for)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None


def config_for(
    app: ASGIApp, *, grace: int = DEFAULT_GRACE, limits: ConnectionLimits | None = None, tls: ServerTls | None = None
) -> uvicorn.Config:
    """uvicorn settings shared by every server: no Server/Date headers of its own (the upstream's pass through),
    no access log of its own (the sidecar's ``AccessLog`` is cheaper). ``limits``: the sidecar's connection
    limits (``proxy.server.limits``); the emulator's servers run without. ``tls``: serve HTTPS (the emulator)."""
    quiet_uvicorn()
    tls_options: dict[str, Any] = {}
    if tls is not None:
        tls_options = {
            "ssl_certfile": str(tls.cert_file),
            "ssl_keyfile": str(tls.key_file),
            "ssl_ca_certs": str(tls.client_ca_file) if tls.client_ca_file else None,
            "ssl_cert_reqs": ssl.CERT_REQUIRED if tls.client_ca_file else ssl.CERT_NONE,
        }
    return uvicorn.Config(
        app,
        lifespan="on",
        http=protocol_for(limits) if limits is not None else CoalescingHttpToolsProtocol,
        # No WebSocket: an Upgrade request is an ordinary request whose Upgrade header is dropped.
        ws="none",
        loop="uvloop",
        server_header=False,
        # The peer address is the truth: X-Forwarded-For from a client is passed on, never believed.
        proxy_headers=False,
        date_header=False,
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=grace,
        timeout_keep_alive=limits.keep_alive_timeout if limits is not None else KEEP_ALIVE_TIMEOUT,
        **tls_options,
    )


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to whoever runs the loop, and stops as soon as ``stop()`` is
    called (uvicorn's own main loop notices ``should_exit`` on its next 0.1 s tick)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._stopped = asyncio.Event()

    def stop(self) -> None:
        self.should_exit = True
        self._stopped.set()

    async def main_loop(self) -> None:
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 1) % TICKS_PER_DAY
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), TICK)
            should_exit = await self.on_tick(counter)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class GracefulServer(uvicorn.Server):
    """A uvicorn server that drains on SIGTERM/SIGINT and then exits 0, instead of re-raising the signal.

    ``on_stop`` runs as soon as the signal arrives (readiness turns 503 while in-flight requests finish);
    ``on_reload`` runs in the event loop on SIGHUP (re-read secret files).
    """

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        on_stop: Callable[[], None] | None = None,
        on_reload: Callable[[], None] | None = None,
        delay: float = 0.0,
    ) -> None:
        super().__init__(config)
        self._on_stop = on_stop
        self._on_reload = on_reload
        self._delay = delay
        self._stopping: asyncio.TimerHandle | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._on_stop is not None:
            self._on_stop()
        if sig == signal.SIGTERM and self._delay > 0 and self._stopping is None and not self.should_exit:
            # Orchestrators send SIGTERM while traffic may still be on its way: keep serving for the delay
            # (readiness already says draining), then stop. SIGINT, or a second signal, stops at once.
            log.info("SIGTERM: draining; new requests are still served for %g s", self._delay)
            loop = asyncio.get_event_loop()
            stop = super().handle_exit
            self._stopping = loop.call_later(self._delay, stop, sig, frame)
            loop.call_soon_threadsafe(lambda: None)  # wake the loop: the timer was set from a signal handler
            return
        if self._stopping is not None:
            self._stopping.cancel()
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets=sockets)
        if self.force_exit:
            # A second signal makes uvicorn skip the app's shutdown (and cancel it, with a traceback): the
            # sidecar's stop steps (the last access lines, the store, the refresh token file's lock) still run.
            await self.lifespan.shutdown()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        if self._on_reload is not None:
            loop = asyncio.get_running_loop()
            on_reload = self._on_reload
            previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda *_: loop.call_soon_threadsafe(on_reload))
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _notify_startup(app: ASGIApp, started: asyncio.Event) -> ASGIApp:
    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return

        async def send_and_notify(message: Message) -> None:
            await send(message)
            if message["type"] in ("lifespan.startup.complete", "lifespan.startup.failed"):
                started.set()

        await app(scope, receive, send_and_notify)

    return wrapped


@contextlib.asynccontextmanager
async def running(
    app: ASGIApp,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    grace: int = 5,
    limits: ConnectionLimits | None = None,
    sock: socket.socket | None = None,
    also: Sequence[socket.socket] = (),
    tls: ServerTls | None = None,
) -> AsyncIterator[str]:
    """Serve ``app`` in this loop (on ``sock``, or a new socket on ``host:port``, and on the sockets ``also``);
    yields ``sock``'s base URL (``unix:/path`` for a Unix socket; ``https://`` with ``tls``) once its lifespan
    startup is done."""
    sock = sock or bind(host, port)
    url = bound_url(sock, https=tls is not None)
    started = asyncio.Event()
    server = _EmbeddedServer(config_for(_notify_startup(app, started), grace=grace, limits=limits, tls=tls))
    task = asyncio.create_task(server.serve(sockets=[sock, *also]), name=f"uvicorn {url}")
    waiter = asyncio.create_task(started.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task.done():
        for each in (sock, *also):
            each.close()
        task.result()
        raise SidecarError(f"the server for {url} stopped during start-up")
    try:
        yield url
    finally:
        server.stop()
        await task
        for each in (sock, *also):
            each.close()
        # A connection still closing (a write to a client that stopped reading) would keep its socket past the
        # loop's end (ResourceWarning on Python 3.12+): drop it, and let the loop finish the closes.
        for connection in list(server.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.abort()
        for _ in range(SHUTDOWN_SETTLE_STEPS):
            await asyncio.sleep(0)
