"""``Settings``: the whole sidecar's validated, immutable settings, routes included."""

from __future__ import annotations

import importlib.util
import ipaddress
import re
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from proxy.egress.route import Egress, ProxyEnvironment
from proxy.errors import ConfigError
from proxy.listen import parse_listen
from proxy.server.limits import DEFAULT_MAX_CLIENTS, DEFAULT_MAX_HEADER_BYTES
from proxy.settings.route import INHERITED, Credentialed, RouteSettings
from proxy.settings.rules import (
    DEFAULT_ACCESS_LOG_EXCLUDE,
    DEFAULT_ALLOW_FROM,
    DEFAULT_REFRESH_MARGIN,
    DEFAULT_SHUTDOWN_DELAY,
    DEFAULT_SHUTDOWN_GRACE,
    DEFAULT_SOCKET_MODE,
    DEFAULT_TOKEN_TIMEOUT,
    LOG_LEVELS,
    MAX_WORKERS,
    Origins,
    check_url,
    is_loopback,
    words,
)
from proxy.settings.schema import (
    BOOL,
    FLOAT,
    INT,
    PATH,
    SECRET,
    STR,
    Info,
    Models,
    SecretStr,
    field,
    instance_of,
    literal,
    optional,
    tuple_of,
    validates,
)
from proxy.store.base import DEFAULT_STORE_LEASE
from proxy.store.redis import RedisTarget
from proxy.upstream import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_POOL_TIMEOUT,
    DEFAULT_READ_TIMEOUT,
    Limits,
    Timeouts,
)

Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
_DEFAULT_NETWORKS: Networks = tuple(ipaddress.ip_network(net) for net in DEFAULT_ALLOW_FROM)
NETWORKS = tuple_of(instance_of(ipaddress.IPv4Network, ipaddress.IPv6Network))


class Settings(Credentialed):
    """Validated, immutable settings. Build with ``load_settings``; tests may construct it directly."""

    # Before upstream_url, whose validator looks at them.
    routes: tuple[RouteSettings, ...] = field(Models(RouteSettings), ())
    # Required to serve; `login` and `token` work without it (load_settings(purpose=...)).
    upstream_url: str | None = field(
        optional(STR),
        default=None,
        validate_default=True,
        description=(
            "API Gateway base URL, stage included, e.g. `https://abc123.execute-api.us-east-1.amazonaws.com/prod`"
        ),
    )
    listen: str = field(
        STR,
        default="127.0.0.1:8080",
        description="`host:port` to listen on (`:0` picks a free port, logged at start), or `unix:/path/to.sock`",
    )
    # A second listener that serves the /-/ routes only (metrics, health), e.g. for Prometheus in Kubernetes while
    # the forwarding listener stays on the pod's loopback.
    metrics_listen: str | None = field(
        optional(STR),
        default=None,
        description=(
            "`host:port` of a second listener that serves `/-/metrics`, `/-/healthz` and `/-/readyz` only, "
            "never forwarding (for a scraper while `SIDECAR_LISTEN` stays on loopback)"
        ),
    )
    refresh_margin: float = field(
        FLOAT,
        default=DEFAULT_REFRESH_MARGIN,
        ge=0,
        description="seconds before `exp` at which a token is refreshed (capped at half its life)",
    )
    connect_timeout: float = field(
        FLOAT, default=DEFAULT_CONNECT_TIMEOUT, gt=0, description="upstream connect timeout, seconds"
    )
    read_timeout: float = field(
        FLOAT,
        default=DEFAULT_READ_TIMEOUT,
        gt=0,
        description="upstream read timeout (and request body stall limit), seconds",
    )
    token_timeout: float = field(
        FLOAT, default=DEFAULT_TOKEN_TIMEOUT, gt=0, description="token endpoint timeout per attempt, seconds"
    )
    pool_timeout: float = field(
        FLOAT,
        default=DEFAULT_POOL_TIMEOUT,
        gt=0,
        description=(
            "how long a request may wait for an upstream connection (a free pooled one, or a new one whose "
            "handshake is also bounded by the connect timeout) before a 504, seconds"
        ),
    )
    max_connections: int = field(
        INT, default=DEFAULT_MAX_CONNECTIONS, ge=1, description="upstream connection pool size"
    )
    shutdown_delay: float = field(
        FLOAT,
        default=DEFAULT_SHUTDOWN_DELAY,
        ge=0,
        description="on SIGTERM, how long new requests are still served while `/-/readyz` says `draining`, seconds",
    )
    shutdown_grace: int = field(
        INT,
        default=DEFAULT_SHUTDOWN_GRACE,
        ge=0,
        description="then, how long in-flight requests may finish before exit, seconds",
    )
    access_log: bool = field(BOOL, default=True, description="access log on (1) or off (0)")
    access_log_query: bool = field(
        BOOL, default=False, description="`1`: the access log shows query strings, which can carry personal data"
    )
    access_log_exclude: tuple[str, ...] = field(
        tuple_of(STR),
        default=DEFAULT_ACCESS_LOG_EXCLUDE,
        description=(
            "path prefixes whose 1xx-3xx answers get no access line, comma-separated; the default `/-/` leaves out "
            "passing health probes and scrapes (errors are still logged); empty: a line for every request"
        ),
    )
    access_log_sample: float = field(
        FLOAT,
        default=1.0,
        ge=0,
        le=1,
        description="share of 1xx-3xx answers that get an access line, from 0 to 1; errors always get one",
    )
    log_level: Literal["debug", "info", "warning", "error"] = field(
        literal("debug", "info", "warning", "error"), default="info", description="debug, info, warning or error"
    )
    log_levels: tuple[tuple[str, str], ...] = field(
        tuple_of(tuple_of(STR)),
        default=(),
        description=(
            "levels of single loggers, `logger=level` comma-separated, e.g. `httpx2=info,proxy.shared=debug`; "
            "httpx2's line per token request is at `warning` unless set here (`token_refreshed` says more)"
        ),
    )
    log_format: Literal["text", "json"] = field(
        literal("text", "json"),
        default="text",
        description="`text` or `json` (one object per line), for every log line (see Observability)",
    )
    tracing: bool = field(
        BOOL,
        default=False,
        description=(
            "`1`: OpenTelemetry traces over OTLP/HTTP (the `otel` extra); on by itself when "
            "`OTEL_EXPORTER_OTLP_ENDPOINT` is set, `0` keeps it off (see Operations)"
        ),
    )
    # Where spans go: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, or OTEL_EXPORTER_OTLP_ENDPOINT's /v1/traces (not SIDECAR_).
    tracing_endpoint: str | None = field(optional(STR), None)
    ready_when: Literal["token", "process"] = field(
        literal("token", "process"),
        default="token",
        description=(
            "when `/-/readyz` answers 200: `token` (a valid token is held) or `process` (whenever it serves; "
            "the token's state stays in the body, the metrics and the alerts; see Operations)"
        ),
    )
    # Who may use the credential (see docs/security.md).
    allowed_hosts: tuple[str, ...] = field(
        tuple_of(STR),
        default=(),
        description="more `Host` names the sidecar answers to, exact or `*.suffix`, comma-separated (see Security)",
    )
    allowed_origins: tuple[str, ...] = field(
        tuple_of(STR), default=(), description="browser origins allowed to call it, e.g. `https://tool.internal`"
    )
    allow_from: Networks = field(
        NETWORKS,
        default=_DEFAULT_NETWORKS,
        description="CIDRs that may call it when it listens on a non-loopback address",
    )
    metrics_allow_from: Networks = field(
        NETWORKS,
        default=_DEFAULT_NETWORKS,
        description="CIDRs that may reach the `SIDECAR_METRICS_LISTEN` listener (scrapers, probes)",
    )
    caller_token: SecretStr | None = field(
        optional(SECRET), default=None, description="a value every forwarded request must carry in `X-Sidecar-Caller`"
    )
    caller_token_file: Path | None = field(optional(PATH), None)
    socket_mode: str = field(
        STR, default=DEFAULT_SOCKET_MODE, description="file mode of the Unix socket (`SIDECAR_LISTEN=unix:/path`)"
    )
    max_header_bytes: int = field(
        INT,
        default=DEFAULT_MAX_HEADER_BYTES,
        ge=1024,
        description="largest request head (request line and headers), bytes",
    )
    max_body_bytes: int = field(
        INT, default=DEFAULT_MAX_BODY_BYTES, ge=0, description="largest request body, bytes; `0` for no limit"
    )
    max_clients: int = field(
        INT, default=DEFAULT_MAX_CLIENTS, ge=1, description="client connections open at once; more are refused at once"
    )
    # Serving processes on this host; more than one share the credential through the token store.
    workers: int = field(
        INT,
        default=1,
        ge=1,
        le=MAX_WORKERS,
        description="serving processes on this host, on one listening socket, sharing one token (see Fleet)",
    )
    # Where sidecars sharing a credential keep it (see proxy.store): memory, file:/dir, or a Redis URL (one server,
    # Sentinel or Cluster). Not in reprs: a Redis URL may carry a password.
    token_store: str = field(
        STR,
        default="memory",
        repr=False,
        description=(
            "where sidecars sharing a credential keep it: `memory` (each on its own), `file:/dir` (one host "
            "or a shared local volume), `redis://host:6379/0`, `redis+sentinel://sentinel:26379/service/0` or "
            "`redis+cluster://node:6379` (`rediss` for TLS; see Fleet)"
        ),
    )
    token_store_plaintext: bool = field(
        BOOL,
        default=False,
        description="`1`: a public client with no store key keeps its refresh token in Redis in clear",
    )
    token_store_password: SecretStr | None = field(
        optional(SECRET), default=None, description="Redis `AUTH` password (or in the URL, `redis://:password@host`)"
    )
    token_store_password_file: Path | None = field(optional(PATH), None)
    token_store_lease: float = field(
        FLOAT,
        default=DEFAULT_STORE_LEASE,
        gt=0,
        description=(
            "seconds one refresh lease lasts unless renewed; a holder killed mid-refresh holds the others up this long"
        ),
    )
    # Last of the store's settings: its validator checks them together.
    token_store_key: SecretStr | None = field(
        optional(SECRET),
        default=None,
        validate_default=True,
        description="key material that seals what the store holds; the same for every sidecar sharing it",
    )
    token_store_key_file: Path | None = field(optional(PATH), None)
    # The egress proxy for every outbound HTTP request (not Redis), over the standard variables; "none" ignores them.
    # A secret: the URL may carry the proxy's password.
    egress_proxy: SecretStr | None = field(
        optional(SECRET),
        default=None,
        description=(
            "forward proxy for every outbound HTTP(S) request, `http://[user:password@]host:port`, over the "
            "standard variables; `none` ignores them (see Corporate networks)"
        ),
    )
    egress_proxy_file: Path | None = field(optional(PATH), None)
    # HTTPS_PROXY, HTTP_PROXY and NO_PROXY as load_settings found them in the environment (not SIDECAR_ settings).
    proxy_environment: ProxyEnvironment = field(instance_of(ProxyEnvironment), ProxyEnvironment())

    @property
    def origins(self) -> Origins:
        """Where each value came from, by key (``listen``, ``routes.0.upstream_url``); none: its default. Filled by
        ``load_settings``; empty for settings built directly."""
        origins: Origins = self.__dict__.setdefault("_origins", {})
        return origins

    @property
    def timeouts(self) -> Timeouts:
        """The upstream timeouts, as one value."""
        return Timeouts(connect=self.connect_timeout, read=self.read_timeout, pool=self.pool_timeout)

    @property
    def limits(self) -> Limits:
        """The upstream limits, as one value."""
        return Limits(max_connections=self.max_connections, max_body_bytes=self.max_body_bytes)

    @cached_property
    def egress(self) -> Egress:
        """The proxies for outbound requests (worked out once); raises ``ConfigError`` naming the variable of an
        unusable proxy URL."""
        override = self.egress_proxy.get_secret_value() if self.egress_proxy else None
        try:
            return Egress.resolve(override, self.proxy_environment)
        except ValueError as exc:
            raise ConfigError([str(exc)]) from None

    @validates("token_store")
    @classmethod
    def _token_store(cls, value: str) -> str:
        value = value.strip()
        if value in ("", "memory"):
            return "memory"
        if value.startswith("file:"):
            if not value.removeprefix("file:").startswith("/"):
                raise ValueError("a file store needs an absolute directory, e.g. file:/var/lib/cognito-sidecar")
            return value
        if value.startswith(("redis://", "rediss://", "redis+", "rediss+")):
            try:
                RedisTarget.parse(value)
            except ValueError as exc:
                raise ValueError(f"is not a valid Redis URL: {exc}") from None
            if importlib.util.find_spec("redis") is None:
                raise ValueError(
                    "a Redis store needs redis-py, which this installation lacks: pip install 'cognito-sidecar[redis]' "
                    "(the image includes it)"
                )
            return value
        raise ValueError(
            "must be memory, file:/absolute/dir, redis://host:6379/0, redis+sentinel://sentinel:26379/service/0 or "
            "redis+cluster://node:6379 (rediss for TLS)"
        )

    @validates("token_store_key")
    @classmethod
    def _store_sealing(cls, value: SecretStr | None, info: Info) -> SecretStr | None:
        store = info.data.get("token_store", "memory")
        if value is not None or not store.startswith("redis") or info.data.get("token_store_plaintext"):
            return value
        routes = info.data.get("routes") or ()
        top_level = info.data.get("upstream_url") is not None and info.data.get("client_secret") is None
        if top_level or any(route.client_secret is None for route in routes):
            raise ValueError(
                "a Redis token store seals what it holds with a key derived from the client secret, and a public "
                "client has none: set SIDECAR_TOKEN_STORE_KEY_FILE (any long random value, the same for every "
                "sidecar sharing the store), or SIDECAR_TOKEN_STORE_PLAINTEXT=1 to keep refresh tokens in clear"
            )
        return value

    @validates("upstream_url")
    @classmethod
    def _upstream(cls, value: str | None, info: Info) -> str | None:
        purpose = (info.context or {}).get("purpose", "serve")
        if value is None:
            if purpose == "serve" and "routes" in info.data and not info.data["routes"]:
                raise ValueError("is required, e.g. https://abc123.execute-api.us-east-1.amazonaws.com/prod")
            return None
        return check_url(value, allow_insecure=bool(info.data.get("allow_insecure", False)))

    @validates("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        value = value.strip()
        if value.startswith("unix:"):
            if not value.removeprefix("unix:").startswith("/"):
                raise ValueError("a Unix socket needs an absolute path, e.g. unix:/run/sidecar/sidecar.sock")
            return value
        parse_listen(value)
        return value

    @validates("metrics_listen")
    @classmethod
    def _metrics_listen(cls, value: str | None, info: Info) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip()
        _, port = parse_listen(value)  # TCP only: a scraper comes over the network
        listen = info.data.get("listen", "")
        if port and not listen.startswith("unix:") and listen and parse_listen(listen)[1] == port:
            raise ValueError("must use another port than SIDECAR_LISTEN")
        return value

    @validates("access_log_exclude", mode="before")
    @classmethod
    def _prefixes(cls, value: Any) -> Any:
        prefixes = tuple(words(value))
        for prefix in prefixes:
            if not isinstance(prefix, str) or not prefix.startswith("/"):
                raise ValueError(f"{prefix!r} must be a path prefix starting with /, e.g. /-/ or /health")
        return prefixes

    @validates("log_levels", mode="before")
    @classmethod
    def _log_levels(cls, value: Any) -> Any:
        pairs = list(value.items()) if isinstance(value, dict) else [str(w).partition("=")[::2] for w in words(value)]
        levels = []
        for logger, level in pairs:
            level = str(level).strip().lower()
            if not logger or level not in LOG_LEVELS:
                raise ValueError(
                    f"{logger or '(no logger)'}={level}: each must be logger=level with a level among "
                    f"{', '.join(LOG_LEVELS)}, e.g. httpx2=info,proxy.shared=debug"
                )
            levels.append((str(logger).strip(), level))
        return tuple(levels)

    @validates("allowed_hosts", "allowed_origins", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return tuple(word.lower() if isinstance(word, str) else word for word in words(value))

    @validates("allowed_hosts")
    @classmethod
    def _hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for host in value:
            name = host.removeprefix("*.")
            if not name or "*" in name or "/" in name or ":" in name.strip("[]").replace("::", ""):
                raise ValueError(f"{host!r} must be a host name without port (exact, or *.suffix)")
        return value

    @validates("allowed_origins")
    @classmethod
    def _origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for origin in value:
            if not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ValueError(f"{origin!r} must be an origin: scheme://host[:port], no path")
        return value

    @validates("allow_from", "metrics_allow_from", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> Any:
        try:
            return tuple(ipaddress.ip_network(str(net), strict=False) for net in words(value))
        except ValueError as exc:
            raise ValueError(f"must be CIDRs such as 10.0.0.0/8, fc00::/7 ({exc})") from None

    @validates("socket_mode")
    @classmethod
    def _mode(cls, value: str) -> str:
        if not re.fullmatch(r"0?[0-7]{3}", value.strip()):
            raise ValueError("must be an octal file mode such as 0660")
        if int(value, 8) & 0o007:
            raise ValueError("must give others no access (e.g. 0660): anyone who can connect uses the credential")
        return value.strip()

    @property
    def unix_socket(self) -> str | None:
        return self.listen.removeprefix("unix:") if self.listen.startswith("unix:") else None

    @property
    def listen_address(self) -> tuple[str, int]:
        return parse_listen(self.listen)

    @property
    def listens_on_loopback(self) -> bool:
        """A Unix socket, or a loopback address: only this machine can reach it."""
        return self.unix_socket is not None or is_loopback(self.listen_address[0])

    def effective_routes(self) -> tuple[RouteSettings, ...]:
        """Every route, longest prefix first; the top-level upstream (the one-route shorthand) is the ``/`` route."""
        routes = list(self.routes)
        if self.upstream_url and not any(route.prefix == "/" for route in routes):
            inherited = {name: getattr(self, name) for name in INHERITED}
            routes.append(RouteSettings(prefix="/", upstream_url=self.upstream_url, strip_prefix=False, **inherited))
        return tuple(sorted(routes, key=lambda route: len(route.prefix), reverse=True))
