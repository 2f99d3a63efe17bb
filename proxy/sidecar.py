"""The sidecar's parts, assembled from settings (``build_sidecar``), and their lifecycle (``Sidecar.start`` and
``Sidecar.stop``, in numbered steps). Routes whose credentials are the same share one token provider: one cache,
one refresh. The ASGI entry that serves them is ``proxy.app``."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx2

from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.egress.route import unresolved
from proxy.egress.tls import TOP_LEVEL_NAMES, TlsContext, TlsFiles
from proxy.errors import ConfigError
from proxy.forward import Forwarder
from proxy.guard import CallerGuard
from proxy.logs import AccessLog, event, set_trace_ids
from proxy.secrets import Secret, secret_file_warnings, secret_files
from proxy.server.limits import ConnectionLimits
from proxy.server.peers import WorkerPeers
from proxy.settings import RouteSettings, Settings
from proxy.stats import RequestMetrics
from proxy.status import RecentRequests
from proxy.store.base import Store
from proxy.tokens.build import open_configured_store, provider_for, token_http, token_tls
from proxy.tokens.provider import TokenProvider, TokenView
from proxy.tokens.schedule import RefreshPolicy
from proxy.tracing import Tracing
from proxy.watch import SECRET_POLL_INTERVAL, watch_files

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger("proxy.app")
# How long the start-up look-up of a token endpoint's host may take before it is reported, seconds.
LOOKUP_TIMEOUT = 5.0
# How often a reload's retired forwarders are looked at, to close those whose requests have ended, seconds.
RETIRE_CHECK_INTERVAL = 1.0


@dataclass(frozen=True)
class UpstreamRoute:
    """A path prefix (as raw bytes, no trailing slash; ``/`` matches everything) and its forwarder."""

    prefix: bytes
    forwarder: Forwarder

    @property
    def label(self) -> str:
        """The route in logs and metrics."""
        return self.prefix.decode("latin-1")


@dataclass
class Sidecar:
    """The pieces of one sidecar, and its lifecycle: ``start()`` and ``stop()`` run in the server's lifespan."""

    settings: Settings
    http: httpx2.AsyncClient
    # Each credential's provider, by RouteSettings.credential_key() (the catch-all route's first): a reload keeps
    # those it still has.
    credentials: dict[tuple[str, ...], TokenProvider]
    routes: list[UpstreamRoute]  # longest prefix first
    guard: CallerGuard = field(default_factory=CallerGuard)
    # Secret files other users could read or replace (proxy.secrets.exposure): logged, shown by readyz.
    file_warnings: list[str] = field(default_factory=list)
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    requests: RequestMetrics = field(default_factory=RequestMetrics)
    draining: bool = False
    # The token store shared with other sidecars (None: memory, each process on its own).
    store: Store | None = None
    # Every TLS context with files of its own (trusted CAs, client certificates), each once: re-read on change.
    tls: list[TlsContext] = field(default_factory=list)
    # Written off the hot path by its own task (None: SIDECAR_ACCESS_LOG=0).
    access_log: AccessLog | None = None
    # How often the secret and TLS files are looked at (tests look more often).
    watch_interval: float = SECRET_POLL_INTERVAL
    # The other workers of this sidecar (SIDECAR_WORKERS), whose counts a scrape adds to its own.
    peers: WorkerPeers | None = None
    clock: Clock = SYSTEM_CLOCK
    # How the providers were made, for those a reload adds (tests pass a policy).
    policy: RefreshPolicy | None = None
    private_store: bool = False
    # The last requests, for the status page (kept across a reload).
    recent: RecentRequests = field(default_factory=RecentRequests)
    # OpenTelemetry (None: SIDECAR_TRACING off, the SDK not even imported).
    tracing: Tracing | None = None
    # Called when a watched file changed: re-read the secrets, or (with a Reloader) every setting.
    on_files_changed: Callable[[], object] | None = None
    providers: list[TokenProvider] = field(init=False)
    forwarders: list[Forwarder] = field(init=False)
    # A reload's predecessors' forwarders, closed once their requests have ended (or at stop).
    retiring: list[Forwarder] = field(default_factory=list, init=False)
    # Set whenever a re-read brought a new value.
    secrets_changed: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list, init=False)

    async def start(self) -> None:
        """Start serving, in order:

        1. say which secret files other users could read or replace; with tracing, log lines carry trace ids;
        2. open every route's upstream connection pool;
        3. claim each refresh token file (members of one token store share it) and start each credential's refresher,
           which asks for a token at once; look each token endpoint's host up once (a warning if it does not
           resolve: DNS may come later, and the refresher keeps trying);
        4. start the access log's writer;
        5. watch the secret and TLS files for changes;
        6. with workers, answer the other workers' scrapes for this one's counts.
        """
        for warning in self.file_warnings:
            log.warning("%s", warning)
        if self.tracing is not None:
            set_trace_ids(self.tracing.current_ids)
            log.info("tracing on: spans go to %s over OTLP/HTTP", self.settings.tracing_endpoint or "the SDK's default")
        for forwarder in self.forwarders:
            await forwarder.open()
        if self.store is not None:
            log.info("sharing tokens through the token store %s", self.store.name)
        for provider in self.providers:
            provider.grant.claim(provider.shared.identity if provider.shared else "")
            provider.start()
        self._start_tasks()
        hosts = {route.token_url for route in self.settings.effective_routes()}
        self._tasks.append(asyncio.create_task(_look_up(sorted(hosts), self.settings), name="token-hosts"))
        if self.peers is not None:
            await self.peers.start(self.counts)

    def _start_tasks(self) -> None:
        if self.access_log is not None:
            self._tasks.append(asyncio.create_task(self.access_log.run(), name="access-log"))
        files = self.watched_files()
        if files:
            watcher = watch_files(files, self._files_changed, interval=self.watch_interval)
            self._tasks.insert(0, asyncio.create_task(watcher, name="secret-files"))

    def _files_changed(self) -> None:
        if self.on_files_changed is not None:
            self.on_files_changed()
        else:
            self.reload_secrets()

    async def take_over(self, old: Sidecar) -> None:
        """Get ready to serve in place of ``old`` (a reload; the app is swapped over next, then ``carry_on``):

        1. open every route's upstream connection pool, the counts of ``old``'s same routes carried over;
        2. claim and start the providers ``old`` did not have.
        """
        before = {route.prefix: route.forwarder for route in old.routes}
        for route in self.routes:
            await route.forwarder.open()
            if (previous := before.get(route.prefix)) is not None:
                route.forwarder.replays += previous.replays
                route.forwarder.egress_failures.update(previous.egress_failures)
        kept = {id(provider) for provider in old.providers}
        for provider in self.providers:
            if id(provider) not in kept:
                provider.grant.claim(provider.shared.identity if provider.shared else "")
                provider.start()

    async def carry_on(self, old: Sidecar) -> None:
        """Once the app serves new requests with this one: 3. stop ``old``'s tasks (its access log writes its last
        lines: no request records there any more) and start this one's; 4. with workers, the other workers get
        this one's counts."""
        await old._stop_tasks()
        self.on_files_changed = old.on_files_changed
        self._start_tasks()
        if self.peers is not None:
            self.peers.snapshot = self.counts

    async def hand_over(self, successor: Sidecar) -> None:
        """After ``successor.carry_on(self)``: stop the providers it does not use; its forwarders close once the
        requests they are still serving have ended (``successor`` closes them at its stop otherwise)."""
        used = {id(provider) for provider in successor.providers}
        for provider in self.providers:
            if id(provider) not in used:
                await provider.aclose()
                provider.grant.release()
        successor.retiring.extend([*self.forwarders, *self.retiring])
        successor._tasks.append(asyncio.create_task(successor._close_retired(), name="retire-forwarders"))

    async def _close_retired(self) -> None:
        while self.retiring:
            idle = [forwarder for forwarder in self.retiring if not forwarder.in_flight]
            for forwarder in idle:
                self.retiring.remove(forwarder)
                await forwarder.aclose()
                log.info(
                    "the connection pool to %s that a reload replaced is closed: its last request ended",
                    forwarder.host,
                    extra=event("pool_retired", host=forwarder.host),
                )
            if self.retiring:
                await asyncio.sleep(RETIRE_CHECK_INTERVAL)

    async def _stop_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def stop(self) -> None:
        """Stop, in order: 1. readiness says draining, and the other workers no longer get this one's counts;
        2. stop watching files; 3. write the last access lines; 4. stop the refreshers and release the refresh
        token files; 5. close the upstream pools (a reload's predecessors' too); 6. close the token store; 7. close
        the token endpoint's client; 8. export the last spans."""
        self.draining = True
        if self.peers is not None:
            await self.peers.stop()
        await self._stop_tasks()
        for provider in self.providers:
            await provider.aclose()
            provider.grant.release()
        for forwarder in [*self.forwarders, *self.retiring]:
            await forwarder.aclose()
        if self.store is not None:
            await self.store.aclose()
        await self.http.aclose()
        if self.tracing is not None:
            set_trace_ids(None)
            await asyncio.to_thread(self.tracing.shutdown)  # the last spans go out (a blocking HTTP request)

    def watched_files(self) -> list[Path]:
        """Every secret file and TLS file the settings name, and the TOML file they came from, each once."""
        tls_files = (path for context in self.tls for path in context.files.paths())
        config = self.settings.origins.get("config")
        toml = [Path(config.name)] if config is not None else []
        return list(dict.fromkeys([*secret_files(self.settings), *tls_files, *toml]))

    def warnings(self) -> list[str]:
        """What readiness reports while serving: a restart (or a rotation) could lose a credential."""
        return [warning for provider in self.providers for warning in provider.warnings()] + self.file_warnings

    def reload_secrets(self) -> bool:
        """Re-read every secret and TLS file (SIGHUP, or the watcher saw one change); True when a value changed."""
        # Every file is re-read (a list, not any(): no short-circuit).
        results = [context.reload() for context in self.tls]
        results += [forwarder.reload_tls() for forwarder in self.forwarders]
        results += [provider.reload_credentials() for provider in self.providers]
        results += [forwarder.reload_secrets() for forwarder in self.forwarders]
        if self.guard.caller_token is not None:
            results.append(self.guard.caller_token.reload())
        changed = any(results)
        log.info(
            "secret files re-read (%s)",
            "a value changed" if changed else "nothing changed",
            extra=event("secrets_reloaded", changed=changed),
        )
        if changed:
            self.secrets_changed.set()
        return changed

    @functools.cached_property
    def registry(self) -> CollectorRegistry:
        """What /-/metrics shows of this process (of this worker, with workers). Built at the first scrape, which is
        when prometheus-client is imported: 1.3 MiB and 16 ms of start-up that a sidecar nobody scrapes never pays
        (the request path keeps plain counts, ``proxy.stats``)."""
        from proxy.metrics import sidecar_registry

        return sidecar_registry(self, self.clock)

    def counts(self) -> bytes:
        """This process's families now (``proxy.metrics.snapshot``), for another worker's scrape."""
        from proxy.metrics import snapshot

        return snapshot(self.registry)

    @property
    def errors(self) -> Counter[str]:
        """The sidecar's own error answers by code: the app's, and the connections' (``ConnectionLimits``)."""
        return self.limits.errors

    def __post_init__(self) -> None:
        self.providers = list(self.credentials.values())
        self.forwarders = [route.forwarder for route in self.routes]


def build_sidecar(
    settings: Settings,
    *,
    policy: RefreshPolicy | None = None,
    clock: Clock = SYSTEM_CLOCK,
    watch_interval: float = SECRET_POLL_INTERVAL,
    private_store: bool = False,
    peers: WorkerPeers | None = None,
    reuse: Sidecar | None = None,
) -> Sidecar:
    """Assemble the sidecar's parts from settings (no I/O happens here). ``private_store``: the token store is the
    one ``SIDECAR_WORKERS`` made for its workers, removed at exit (rotated refresh tokens must still reach the
    refresh token file). ``peers``: this worker's siblings, with workers. ``reuse``: the running sidecar, on a
    reload: its token endpoint client, token store, counts and the providers of credentials it still has are
    kept (``proxy.reload`` checks first that they may be), and so are its options."""
    routes = settings.effective_routes()
    if not routes:
        raise ConfigError(["SIDECAR_UPSTREAM_URL: is required (or routes in SIDECAR_CONFIG)"])
    egress = settings.egress
    tls = TlsContexts()
    if reuse is None:
        token_context = token_tls(settings)
        http = token_http(settings, token_context)
        store = open_configured_store(settings)
        tracing = _tracing(settings)
    else:  # the token endpoint's client (and its TLS) and the store change only at a restart
        policy, clock, watch_interval = reuse.policy, reuse.clock, reuse.watch_interval
        private_store, peers = reuse.private_store, reuse.peers
        token_files = TlsFiles(reuse.settings.ca_file)
        token_context = next((context for context in reuse.tls if context.files == token_files), None)
        http, store, tracing = reuse.http, reuse.store, reuse.tracing
    if token_context is not None:
        tls.contexts[token_context.files] = token_context
    providers: dict[tuple[str, ...], TokenProvider] = {}
    kinds: dict[tuple[str, ...], set[str]] = {}
    for route in routes:
        kinds.setdefault(route.credential_key(), set()).add(route.token)
    # Shortest prefix first, so the catch-all route's provider (the one-route form's) is providers[0].
    for route in reversed(routes):
        key = route.credential_key()
        if reuse is not None and key in reuse.credentials:
            providers.setdefault(key, reuse.credentials[key])
        if key not in providers:
            providers[key] = provider_for(
                settings,
                route,
                http,
                kinds=kinds[key],
                store=store,
                policy=policy,
                clock=clock,
                durable=not private_store,
            )
            providers[key].tracing = tracing
    upstream_routes = [
        UpstreamRoute(
            route.prefix.encode(),
            Forwarder(
                upstream_url=route.upstream_url,
                tokens=TokenView(providers[route.credential_key()], route.token),
                header=route.header,
                header_prefix=route.header_prefix,
                strip_prefix=route.prefix if route.strip_prefix else "",
                timeouts=settings.timeouts,
                limits=settings.limits,
                api_key=Secret(route.api_key.get_secret_value(), route.api_key_file) if route.api_key else None,
                methods=route.methods,
                paths=route.paths,
                api_id=route.api_id,
                proxy=egress.proxy_for(route.upstream_url),
                tls=tls.for_route(route),
                tracing=tracing,
            ),
        )
        for route in routes
    ]
    caller_token = settings.caller_token
    guard = CallerGuard(
        allowed_hosts=settings.allowed_hosts,
        allowed_origins=settings.allowed_origins,
        allow_from=None if settings.listens_on_loopback else settings.allow_from,
        caller_token=Secret(caller_token.get_secret_value(), settings.caller_token_file) if caller_token else None,
    )
    limits = reuse.limits if reuse is not None else ConnectionLimits()  # the server holds it: changed in place
    limits.max_clients, limits.max_header_bytes = settings.max_clients, settings.max_header_bytes
    limits.allow_from = None if settings.listens_on_loopback else settings.allow_from
    return Sidecar(
        settings,
        http,
        providers,
        upstream_routes,
        store=store,
        guard=guard,
        limits=limits,
        file_warnings=secret_file_warnings(settings),
        tls=list(tls.contexts.values()),
        access_log=AccessLog(
            settings.log_format,
            query=settings.access_log_query,
            exclude=settings.access_log_exclude,
            sample=settings.access_log_sample,
        )
        if settings.access_log
        else None,
        watch_interval=watch_interval,
        peers=peers,
        clock=clock,
        tracing=tracing,
        policy=policy,
        private_store=private_store,
        requests=reuse.requests if reuse is not None else RequestMetrics(),
        recent=reuse.recent if reuse is not None else RecentRequests(),
    )


async def _look_up(urls: list[str], settings: Settings) -> None:
    """Warn about each token endpoint whose host does not resolve (reached directly: a proxy resolves its own)."""
    for url in urls:
        if settings.egress.proxy_for(url) is not None:
            continue
        reason = await unresolved(url, LOOKUP_TIMEOUT)
        if reason is not None:
            host = urlsplit(url).hostname or ""
            log.warning(
                "the token endpoint's host %s does not resolve (%s): check SIDECAR_COGNITO_DOMAIN (or "
                "SIDECAR_TOKEN_URL) and this machine's DNS; the sidecar keeps trying, and serves once it does",
                host,
                reason,
                extra=event("token_host_unresolved", host=host),
            )


def _tracing(settings: Settings) -> Tracing | None:
    if not settings.tracing:
        return None
    try:
        return Tracing(settings.tracing_endpoint)
    except ImportError:
        raise ConfigError(
            [
                "SIDECAR_TRACING: traces need the OpenTelemetry SDK: pip install 'cognito-sidecar[otel]' (the image "
                "has it), or set SIDECAR_TRACING=0"
            ]
        ) from None


class TlsContexts:
    """One ``TlsContext`` per distinct set of TLS files: routes that name the same files share it."""

    def __init__(self) -> None:
        self.contexts: dict[TlsFiles, TlsContext] = {}

    def for_route(self, route: RouteSettings) -> TlsContext | None:
        names = TOP_LEVEL_NAMES
        if route.prefix != "/":
            label = f"route {route.prefix}:"
            names = (f"{label} ca_file", f"{label} client_cert_file", f"{label} client_key_file")
        files = route.tls_files(names)
        if not files.custom:
            return None
        if files not in self.contexts:  # the names only say how messages name the files: not compared
            self.contexts[files] = TlsContext(files)
        return self.contexts[files]
