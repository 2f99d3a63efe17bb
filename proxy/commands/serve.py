"""``cognito-sidecar serve``: bind the listeners, then serve in this process or in ``SIDECAR_WORKERS`` forked ones."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from proxy.app import create_app
from proxy.errors import ConfigError
from proxy.logs import configure_logging
from proxy.reload import Reloader
from proxy.server.peers import WorkerPeers
from proxy.server.serving import GracefulServer, bind_listen, bound_url, config_for, tune_gc, worker_listeners
from proxy.server.workers import run_workers
from proxy.settings import Settings, load_settings

log = logging.getLogger("proxy")


def serve(env: Mapping[str, str]) -> int:
    settings = load_settings(env)
    configure_logging(settings.log_level, settings.log_format, settings.log_levels)
    sock = bind_listen(settings.listen, socket_mode=int(settings.socket_mode, 8), reuse_port=settings.workers > 1)
    sockets = [sock]
    if settings.metrics_listen is not None:
        sockets.append(bind_listen(settings.metrics_listen))
    try:
        if settings.workers > 1:
            return _serve_workers(settings, env, sockets)
        return _serve_on(settings, env, sockets, False)
    finally:
        if settings.unix_socket is not None:
            with contextlib.suppress(OSError):
                os.unlink(settings.unix_socket)


def _serve_on(
    settings: Settings,
    env: Mapping[str, str],
    sockets: Sequence[socket.socket],
    private_store: bool,
    peers: WorkerPeers | None = None,
    loaded: Settings | None = None,
) -> int:
    """One serving process on bound ``sockets`` (the forwarding listener, then the metrics one if any), whose
    settings came from ``env`` (read again on SIGHUP; ``loaded``: what it gave, if the process changed a value
    since); with workers, ``peers`` are the others."""
    app = create_app(
        settings,
        metrics_port=sockets[1].getsockname()[1] if len(sockets) > 1 else None,
        private_store=private_store,
        peers=peers,
    )
    log.info(
        "cognito-sidecar listening on %s, forwarding to %s with the %s in the %s header",
        bound_url(sockets[0]),
        settings.upstream_url,
        settings.token,
        settings.header,
    )
    if len(sockets) > 1:
        log.info("metrics and health (the /-/ routes only) on %s", bound_url(sockets[1]))
    reloader = Reloader(app, env, loaded)

    def start_draining() -> None:
        app.sidecar.draining = True  # the sidecar serving now (a reload may have replaced the first)

    def reload() -> None:
        log.info("SIGHUP: re-reading every setting and secret file")
        reloader.reload_soon()

    server = GracefulServer(
        config_for(app, grace=settings.shutdown_grace, limits=app.sidecar.limits),
        on_stop=start_draining,
        on_reload=reload,
        delay=settings.shutdown_delay,
    )
    tune_gc()
    server.run(sockets=list(sockets))
    return 0


def _serve_workers(settings: Settings, env: Mapping[str, str], sockets: Sequence[socket.socket]) -> int:
    """``SIDECAR_WORKERS`` processes on the bound sockets, sharing the token through the configured store, or through
    a file store in a private directory made here and removed at exit; each answers the others' scrapes on a
    socket in another such directory."""
    made: list[str] = []
    loaded = settings
    try:
        settings, private = shared_settings(settings)
        if private is not None:
            made.append(private)
        sockets_dir = _private_directory("the workers tell each other their metrics over sockets")
        made.append(sockets_dir)
        sharing = settings.token_store if settings.token_store.startswith("file:") else "the token store"
        listeners = worker_listeners(sockets[0], settings.workers)

        def serve_one(number: int) -> int:
            for other in {*listeners} - {listeners[number]}:
                other.close()  # another worker's queue: this one never accepts from it
            peers = WorkerPeers(Path(sockets_dir), number, settings.workers)
            return _serve_on(settings, env, [listeners[number], *sockets[1:]], private is not None, peers, loaded)

        return run_workers(settings.workers, serve_one, sharing=sharing)
    finally:
        for directory in made:
            shutil.rmtree(directory, ignore_errors=True)


def shared_settings(settings: Settings) -> tuple[Settings, str | None]:
    """The settings the workers run with, and the private directory made for them (None: a store was configured)."""
    if settings.token_store != "memory":
        return settings, None
    directory = _private_directory(
        "the workers share their token through a file store",
        or_else=", or set SIDECAR_TOKEN_STORE=file:/a/writable/dir",
    )
    return settings.copy_with(token_store=f"file:{directory}"), directory


def _private_directory(purpose: str, *, or_else: str = "") -> str:
    """A new directory only this user can enter (0700), for ``purpose``; removed by the caller."""
    base = os.environ.get("XDG_RUNTIME_DIR") or None
    try:
        return tempfile.mkdtemp(prefix="cognito-sidecar-", dir=base)
    except OSError as exc:
        raise ConfigError(
            [
                f"SIDECAR_WORKERS: {purpose} in a private directory, and none can be made in "
                f"{base or tempfile.gettempdir()} ({exc.strerror}). Give the sidecar a writable temporary directory "
                f"(a tmpfs on /tmp with a read-only root filesystem){or_else}"
            ]
        ) from None
