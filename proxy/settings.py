"""Settings: read once from the environment, *_FILE files and an optional TOML file; validated once.

``load_settings(env)`` takes the environment as a mapping (tests pass a dict) and returns frozen
``Settings`` or raises ``ConfigError`` listing every problem at once, each naming its variable (or its
place in the TOML file). Two steps:

1. ``_merge`` reads the sources into one plain dict: ``SIDECAR_X`` (or ``SIDECAR_X_FILE``) in the
   environment, then key ``x`` (or ``x_file``) in the TOML file named by ``SIDECAR_CONFIG``; each route
   table over what it inherits from the top level (``_inherit``). Reading a file is done here, once.
2. The models validate that dict: every rule (a token URL from the domain, what each grant needs, the
   defaults that depend on other values) is a validator on the field it concerns.

Secret values never appear in a repr or an error message.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import tomllib
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from proxy.egress.route import Egress, ProxyEnvironment
from proxy.egress.tls import TOP_LEVEL_NAMES, TlsFiles
from proxy.errors import ConfigError
from proxy.listen import parse_listen

ENV_PREFIX = "SIDECAR_"

# Keys whose value may come from a file (`SIDECAR_X_FILE` / `x_file`): the secrets.
FILE_KEYS = (
    "client_secret",
    "refresh_token",
    "api_key",
    "caller_token",
    "token_store_key",
    "token_store_password",
    "client_key_password",
    "egress_proxy",
)
# Of those, the ones a route may set for itself.
ROUTE_FILE_KEYS = ("client_secret", "refresh_token", "api_key", "client_key_password")
# Settings whose value is a path (not a secret read from one): the TLS files.
PATH_KEYS = ("ca_file", "client_cert_file", "client_key_file")

# Default safety margin before expiry: AWS's own SDKs refresh when less than 5 minutes remain.
DEFAULT_REFRESH_MARGIN = 300.0
# API Gateway gives up on an integration after 29 s; waiting a little longer lets its own 504 reach the client.
DEFAULT_READ_TIMEOUT = 30.0
# A TCP connect on a healthy network takes milliseconds; a few seconds means the upstream is unreachable.
DEFAULT_CONNECT_TIMEOUT = 5.0
# The token endpoint answers in well under a second; longer means trouble worth reporting.
DEFAULT_TOKEN_TIMEOUT = 10.0
# Upstream connections kept and opened at once; one legacy host rarely needs more.
DEFAULT_MAX_CONNECTIONS = 100
# How long a request may wait for a free upstream connection: a slow upstream then turns into quick 504s
# instead of an ever-growing queue.
DEFAULT_POOL_TIMEOUT = 5.0
# How long one shared-store refresh lease lasts unless renewed (it is renewed every third of this while the refresh
# runs): a sidecar killed mid-refresh holds the others up at most this long.
DEFAULT_STORE_LEASE = 5.0
# Serving processes on one host (SIDECAR_WORKERS): a few per core at most is ever useful.
MAX_WORKERS = 64
# On SIGTERM, new requests are still served this long while /-/readyz says draining: Kubernetes takes a few
# seconds to remove a terminating pod from its Service's endpoints (and a service shutting down beside the
# sidecar may still call it), so closing the listener at once would refuse requests that are on their way.
DEFAULT_SHUTDOWN_DELAY = 5.0
# Then in-flight requests get this long to finish (Kubernetes waits 30 s in all before SIGKILL: 5 + 20 < 30).
DEFAULT_SHUTDOWN_GRACE = 20
# A request head (request line and headers) larger than this gets 431. API Gateway's own limit is 10 KiB,
# so a larger head could never be served anyway; 16 KiB leaves room for the headers the sidecar removes.
DEFAULT_MAX_HEADER_BYTES = 16 * 1024
# A request body larger than this gets 413: API Gateway's payload limit is 10 MB.
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
# Client connections open at once; beyond it new ones are refused at once. Enough for any one legacy host
# (each holds ~10 KiB), few enough that a flood cannot exhaust file descriptors or memory.
DEFAULT_MAX_CLIENTS = 1000
# Who may call when the sidecar listens on a non-loopback address: loopback and the private ranges
# (a compose or Kubernetes network), never the internet.
DEFAULT_ALLOW_FROM = ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
# Who may use a Unix socket: its owner and group (docker and kubernetes share a group between containers).
DEFAULT_SOCKET_MODE = "0660"

_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# A route prefix: RFC 3986 path characters, no percent-encoding, no query (logs and metrics carry it as it is).
_PREFIX = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@/-]*")
_METHOD = re.compile(r"^[A-Z]+$")
# An API Gateway API id (the first label of its execute-api host): ten lower-case letters and digits.
_API_ID = re.compile(r"[a-z0-9]{10}")
# Requests the sidecar never forwards: TRACE echoes the request (token included) back to the client, and
# CONNECT would turn the sidecar into a tunnel.
FORBIDDEN_METHODS = frozenset({"TRACE", "CONNECT"})


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and the name ``localhost``: nothing else (``x.localhost`` may go to DNS)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_url(value: str, *, allow_insecure: bool, path_allowed: bool = True) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        raise ValueError("must be an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError("must name a host")
    if parts.username or parts.password:
        raise ValueError("must not carry credentials (user:password@); use the secret settings instead")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query string or fragment")
    if not path_allowed and parts.path not in ("", "/"):
        raise ValueError("must be the domain only, without a path")
    if parts.scheme == "http" and not allow_insecure and not is_loopback(parts.hostname):
        raise ValueError(
            "plain http:// is accepted only for loopback hosts; use https:// "
            "(or set SIDECAR_ALLOW_INSECURE=1 for a trusted private network such as a compose dev stack)"
        )
    return value.rstrip("/")


def _words(value: Any) -> Any:
    """A list setting from the environment: comma- or space-separated words."""
    if isinstance(value, str):
        return tuple(word for word in re.split(r"[,\s]+", value) if word)
    return value


class _Credentialed(BaseModel):
    """What the top level and every route have: the credential, and how the token is sent."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    # Fields are validated in this order: a validator sees the ones above it in ``info.data``.
    allow_insecure: bool = False
    cognito_domain: str | None = None
    # None: the domain's /oauth2/token (see _token_url).
    token_url: str = Field(default=None, validate_default=True)
    client_id: str = Field(min_length=1)
    grant: Literal["refresh_token", "client_credentials"] = "refresh_token"
    client_secret: SecretStr | None = Field(default=None, validate_default=True)
    client_secret_file: Path | None = None
    scopes: str = ""
    refresh_token: SecretStr | None = Field(default=None, validate_default=True)
    refresh_token_file: Path | None = None
    # None: what the grant gives (see _token).
    token: Literal["id_token", "access_token"] = Field(default=None, validate_default=True)
    api_key: SecretStr | None = None
    api_key_file: Path | None = None
    header: str = "Authorization"
    header_prefix: str = ""
    # TLS to the upstream: a CA bundle trusted besides the default store, and a client certificate (mutual TLS).
    ca_file: Path | None = None
    client_cert_file: Path | None = None
    client_key_file: Path | None = Field(default=None, validate_default=True)
    client_key_password: SecretStr | None = None
    client_key_password_file: Path | None = None
    # A private REST API reached through an interface VPC endpoint's DNS name: sent as x-apigw-api-id.
    api_id: str | None = None

    @field_validator("api_id")
    @classmethod
    def _api_id(cls, value: str | None) -> str | None:
        if value is not None and not _API_ID.fullmatch(value):
            raise ValueError(
                "must be an API Gateway API id: ten lower-case letters and digits, the first label of the API's "
                "execute-api host (e.g. a1b2c3d4e5)"
            )
        return value

    @field_validator("client_key_file")
    @classmethod
    def _client_pair(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if (value is None) != (info.data.get("client_cert_file") is None):
            raise ValueError("the client certificate and its key go together: set both files, or neither")
        return value

    def tls_files(self, names: tuple[str, str, str] | None = None) -> TlsFiles:
        """The TLS files this route (or the top level) uses for its upstream."""
        password = self.client_key_password
        return TlsFiles(
            self.ca_file,
            self.client_cert_file,
            self.client_key_file,
            password.get_secret_value() if password else None,
            names=names or TOP_LEVEL_NAMES,
        )

    @field_validator("cognito_domain")
    @classmethod
    def _domain(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        allow = bool(info.data.get("allow_insecure", False))
        return _check_url(value, allow_insecure=allow, path_allowed=False)

    @field_validator("token_url", mode="before")
    @classmethod
    def _token_url(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            if "cognito_domain" not in info.data:
                return ""  # the domain itself was wrong, and said so: the model fails on that
            domain = info.data["cognito_domain"]
            if domain is None:
                raise ValueError(
                    "is required: set SIDECAR_COGNITO_DOMAIN (e.g. https://my-app.auth.us-east-1.amazoncognito.com) "
                    "or SIDECAR_TOKEN_URL"
                )
            return f"{domain}/oauth2/token"
        if not isinstance(value, str):
            raise ValueError("must be a URL")
        return _check_url(value, allow_insecure=bool(info.data.get("allow_insecure", False)))

    @field_validator("client_secret", mode="before")
    @classmethod
    def _secret(cls, value: Any, info: ValidationInfo) -> Any:
        if value == "":
            value = None  # an empty secret: a public client
        if value is None and info.data.get("grant") == "client_credentials":
            raise ValueError("is required for client_credentials (or its _FILE variant)")
        return value

    @field_validator("refresh_token")
    @classmethod
    def _refresh_token(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        purpose = (info.context or {}).get("purpose", "serve")
        if value is None and info.data.get("grant", "refresh_token") == "refresh_token" and purpose != "login":
            raise ValueError(
                "is required (or its _FILE variant); get one with `cognito-sidecar login`, or use "
                "grant client_credentials for a machine-to-machine app client"
            )
        return value

    @field_validator("token", mode="before")
    @classmethod
    def _token(cls, value: Any, info: ValidationInfo) -> Any:
        machine = info.data.get("grant") == "client_credentials"
        if value is None:
            return "access_token" if machine else "id_token"  # no user, no id token
        if machine and value == "id_token":
            raise ValueError("client_credentials gives no id token; use access_token (the default)")
        return value

    @field_validator("header")
    @classmethod
    def _header(cls, value: str) -> str:
        if not _HEADER_NAME.match(value):
            raise ValueError("must be a valid HTTP header name, e.g. Authorization")
        if value.lower() in ("host", "content-length", "transfer-encoding", "connection"):
            raise ValueError(f"{value} is managed by the sidecar and cannot carry the token")
        return value

    @field_validator("header_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if any(ch in value for ch in "\r\n\0"):
            raise ValueError("must not contain line breaks")
        return value

    def credential_key(self) -> tuple[str, ...]:
        """Routes with the same key share one token cache and one refresh."""
        source = str(self.refresh_token_file or "")
        if not source and self.refresh_token is not None:
            source = hashlib.sha256(self.refresh_token.get_secret_value().encode()).hexdigest()
        scopes = self.scopes if self.grant == "client_credentials" else ""
        return (self.token_url, self.client_id, self.grant, scopes, source)


class RouteSettings(_Credentialed):
    """One route of a multi-API sidecar: a path prefix, its upstream, and its credential and header options.

    Anything a route leaves out is taken from the top-level settings (see ``_inherit``). ``methods`` and
    ``paths``, when given, are allowlists: any other method gets 405, any other path 403.
    """

    prefix: str
    upstream_url: str
    strip_prefix: bool = True
    methods: tuple[str, ...] | None = None
    paths: tuple[str, ...] | None = None

    @field_validator("upstream_url")
    @classmethod
    def _url(cls, value: str, info: ValidationInfo) -> str:
        return _check_url(value, allow_insecure=bool(info.data.get("allow_insecure", False)))

    @field_validator("prefix")
    @classmethod
    def _prefix_path(cls, value: str) -> str:
        if not _PREFIX.fullmatch(value):
            raise ValueError("must be a plain path starting with /, e.g. /orders")
        if value == "/-" or value.startswith("/-/"):
            raise ValueError("/-/ is reserved for the sidecar's own routes")
        if any(segment in (".", "..") for segment in value.split("/")):
            raise ValueError("must not contain . or .. segments")
        return value.rstrip("/") or "/"

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        methods = tuple(method.upper() for method in value)
        for method in methods:
            if not _METHOD.match(method):
                raise ValueError(f"{method!r} is not an HTTP method")
            if method in FORBIDDEN_METHODS:
                raise ValueError(f"{method} is never forwarded")
        return methods

    @field_validator("paths")
    @classmethod
    def _paths(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for pattern in value or ():
            if not pattern.startswith("/"):
                raise ValueError(f"{pattern!r} must start with / (a path as the client sends it, * matches anything)")
        return value


class Settings(_Credentialed):
    """Validated, immutable settings. Build with ``load_settings``; tests may construct it directly."""

    # Before upstream_url, whose validator looks at them.
    routes: tuple[RouteSettings, ...] = ()
    # Required to serve; `login` and `token` work without it (load_settings(purpose=...)).
    upstream_url: str | None = Field(default=None, validate_default=True)
    listen: str = "127.0.0.1:8080"
    # A second listener that serves the /-/ routes only (metrics, health), e.g. for Prometheus in Kubernetes while
    # the forwarding listener stays on the pod's loopback.
    metrics_listen: str | None = None
    refresh_margin: float = Field(default=DEFAULT_REFRESH_MARGIN, ge=0)
    connect_timeout: float = Field(default=DEFAULT_CONNECT_TIMEOUT, gt=0)
    read_timeout: float = Field(default=DEFAULT_READ_TIMEOUT, gt=0)
    token_timeout: float = Field(default=DEFAULT_TOKEN_TIMEOUT, gt=0)
    pool_timeout: float = Field(default=DEFAULT_POOL_TIMEOUT, gt=0)
    max_connections: int = Field(default=DEFAULT_MAX_CONNECTIONS, ge=1)
    shutdown_delay: float = Field(default=DEFAULT_SHUTDOWN_DELAY, ge=0)
    shutdown_grace: int = Field(default=DEFAULT_SHUTDOWN_GRACE, ge=0)
    access_log: bool = True
    access_log_query: bool = False
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    # Who may use the credential (see the README's Security section).
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    allow_from: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = Field(
        default=tuple(ipaddress.ip_network(net) for net in DEFAULT_ALLOW_FROM)
    )
    caller_token: SecretStr | None = None
    caller_token_file: Path | None = None
    socket_mode: str = DEFAULT_SOCKET_MODE
    max_header_bytes: int = Field(default=DEFAULT_MAX_HEADER_BYTES, ge=1024)
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, ge=0)
    max_clients: int = Field(default=DEFAULT_MAX_CLIENTS, ge=1)
    # Serving processes on this host; more than one share the credential through the token store.
    workers: int = Field(default=1, ge=1, le=MAX_WORKERS)
    # Where sidecars sharing a credential keep it (see proxy.store): memory, file:/dir, redis:// or rediss://. Not in
    # reprs: a Redis URL may carry a password.
    token_store: str = Field(default="memory", repr=False)
    token_store_plaintext: bool = False
    token_store_password: SecretStr | None = None
    token_store_password_file: Path | None = None
    token_store_lease: float = Field(default=DEFAULT_STORE_LEASE, gt=0)
    # Last of the store's settings: its validator checks them together.
    token_store_key: SecretStr | None = Field(default=None, validate_default=True)
    token_store_key_file: Path | None = None
    # The egress proxy for every outbound HTTP request (not Redis), over the standard variables; "none" ignores them.
    # A secret: the URL may carry the proxy's password.
    egress_proxy: SecretStr | None = None
    egress_proxy_file: Path | None = None
    # HTTPS_PROXY, HTTP_PROXY and NO_PROXY as load_settings found them in the environment (not SIDECAR_ settings).
    proxy_environment: ProxyEnvironment = ProxyEnvironment()

    @cached_property
    def egress(self) -> Egress:
        """The proxies for outbound requests (worked out once); raises ``ConfigError`` naming the variable of an
        unusable proxy URL."""
        override = self.egress_proxy.get_secret_value() if self.egress_proxy else None
        try:
            return Egress.resolve(override, self.proxy_environment)
        except ValueError as exc:
            raise ConfigError([str(exc)]) from None

    @field_validator("token_store")
    @classmethod
    def _token_store(cls, value: str) -> str:
        value = value.strip()
        if value in ("", "memory"):
            return "memory"
        if value.startswith("file:"):
            if not value.removeprefix("file:").startswith("/"):
                raise ValueError("a file store needs an absolute directory, e.g. file:/var/lib/cognito-sidecar")
            return value
        if value.startswith(("redis://", "rediss://")):
            try:
                parts = urlsplit(value)
                parts.port  # noqa: B018 - raises on a bad port
            except ValueError as exc:
                raise ValueError(f"is not a valid Redis URL ({exc})") from None
            if not parts.hostname:
                raise ValueError("a Redis URL needs a host, e.g. redis://redis:6379/0")
            return value
        raise ValueError("must be memory, file:/absolute/dir, redis://host:6379/0 or rediss://host:6380/0")

    @field_validator("token_store_key")
    @classmethod
    def _store_sealing(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
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

    @field_validator("upstream_url")
    @classmethod
    def _upstream(cls, value: str | None, info: ValidationInfo) -> str | None:
        purpose = (info.context or {}).get("purpose", "serve")
        if value is None:
            if purpose == "serve" and "routes" in info.data and not info.data["routes"]:
                raise ValueError("is required, e.g. https://abc123.execute-api.us-east-1.amazonaws.com/prod")
            return None
        return _check_url(value, allow_insecure=bool(info.data.get("allow_insecure", False)))

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        value = value.strip()
        if value.startswith("unix:"):
            if not value.removeprefix("unix:").startswith("/"):
                raise ValueError("a Unix socket needs an absolute path, e.g. unix:/run/sidecar/sidecar.sock")
            return value
        parse_listen(value)
        return value

    @field_validator("metrics_listen")
    @classmethod
    def _metrics_listen(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip()
        _, port = parse_listen(value)  # TCP only: a scraper comes over the network
        listen = info.data.get("listen", "")
        if port and not listen.startswith("unix:") and listen and parse_listen(listen)[1] == port:
            raise ValueError("must use another port than SIDECAR_LISTEN")
        return value

    @field_validator("allowed_hosts", "allowed_origins", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return tuple(word.lower() for word in _words(value))

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for host in value:
            name = host.removeprefix("*.")
            if not name or "*" in name or "/" in name or ":" in name.strip("[]").replace("::", ""):
                raise ValueError(f"{host!r} must be a host name without port (exact, or *.suffix)")
        return value

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for origin in value:
            if not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ValueError(f"{origin!r} must be an origin: scheme://host[:port], no path")
        return value

    @field_validator("allow_from", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> Any:
        try:
            return tuple(ipaddress.ip_network(str(net), strict=False) for net in _words(value))
        except ValueError as exc:
            raise ValueError(f"must be CIDRs such as 10.0.0.0/8, fc00::/7 ({exc})") from None

    @field_validator("socket_mode")
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
            inherited = {name: getattr(self, name) for name in _INHERITED}
            routes.append(RouteSettings(prefix="/", upstream_url=self.upstream_url, strip_prefix=False, **inherited))
        return tuple(sorted(routes, key=lambda route: len(route.prefix), reverse=True))


# What a route takes from the top level when it does not say.
_INHERITED = tuple(_Credentialed.model_fields)
# What a route does not take when it talks to another token endpoint or app client: its secrets are not
# the top level's to send there.
_CREDENTIALS = ("client_secret", "client_secret_file", "refresh_token", "refresh_token_file")
_ROUTE_KEYS = frozenset(RouteSettings.model_fields) | {f"{k}_file" for k in ROUTE_FILE_KEYS}
# Read from the standard variables (HTTPS_PROXY, ...), never from a SIDECAR_ setting or the TOML file.
_FROM_ENVIRONMENT = frozenset({"proxy_environment"})
_KNOWN_KEYS = (frozenset(Settings.model_fields) - _FROM_ENVIRONMENT) | {"config"}


# One line per setting, for `serve --help` (the README's table says more).
SETTING_HELP = {
    "upstream_url": "API Gateway base URL, stage included",
    "cognito_domain": "user pool domain; the token URL is this plus /oauth2/token",
    "token_url": "full token endpoint URL (instead of the domain)",
    "client_id": "app client id",
    "client_secret": "app client secret (absent for a public client)",
    "refresh_token": "the machine credential's refresh token",
    "grant": "refresh_token, or client_credentials (machine to machine)",
    "scopes": "scopes for client_credentials, space-separated",
    "token": "id_token or access_token (default: what the grant gives)",
    "api_key": "sent as x-api-key (usage plans)",
    "header": "header that carries the token",
    "header_prefix": "text before the token, e.g. 'Bearer '",
    "listen": "host:port, or unix:/path/to.sock",
    "metrics_listen": "host:port of a second listener serving /-/metrics, /-/healthz and /-/readyz only",
    "config": "TOML file with these settings (lower-case keys; the environment wins)",
    "allow_insecure": "1: accept plain http:// for non-loopback hosts",
    "refresh_margin": "seconds before expiry at which a token is refreshed",
    "connect_timeout": "upstream connect timeout, seconds",
    "read_timeout": "upstream read timeout (and request body stall limit), seconds",
    "token_timeout": "token endpoint timeout per attempt, seconds",
    "pool_timeout": "wait for a free upstream connection, seconds",
    "max_connections": "upstream connection pool size",
    "shutdown_delay": "after SIGTERM: seconds new requests are still served while readiness says draining",
    "shutdown_grace": "then: seconds in-flight requests may take to finish",
    "access_log": "access log on (1) or off (0)",
    "access_log_query": "1: the access log shows query strings (they can carry personal data)",
    "log_level": "debug, info, warning or error",
    "log_format": "text, or json (one object per line; fields in the README)",
    "allowed_hosts": "more Host names it answers to (exact or *.suffix), comma-separated",
    "allowed_origins": "browser origins allowed to call it, comma-separated",
    "allow_from": "CIDRs that may call a non-loopback listener, comma-separated",
    "caller_token": "a value every forwarded request must carry in X-Sidecar-Caller",
    "socket_mode": "file mode of the Unix socket",
    "max_header_bytes": "largest request head, bytes",
    "max_body_bytes": "largest request body, bytes (0: no limit)",
    "max_clients": "client connections open at once",
    "workers": "serving processes on this host (more than one share the token through the token store)",
    "token_store": "where sidecars sharing a credential keep it: memory, file:/dir, redis://host:6379/0, rediss://...",
    "token_store_key": "key material that seals the store's contents (default: the client secret)",
    "token_store_password": "Redis AUTH password (or put it in the URL)",
    "token_store_lease": "seconds one refresh lease lasts unless renewed (a killed holder delays others this long)",
    "token_store_plaintext": "1: a public client with no store key keeps refresh tokens in Redis in clear",
    "egress_proxy": "forward proxy for outbound HTTP(S), http://[user:password@]host:port (over HTTPS_PROXY, "
    "HTTP_PROXY; NO_PROXY applies); none: ignore those",
    "ca_file": "PEM bundle of CAs trusted besides the default store (token endpoint, upstream, rediss://)",
    "client_cert_file": "client certificate (PEM) presented to the upstream: mutual TLS",
    "client_key_file": "the client certificate's private key (PEM)",
    "client_key_password": "password of an encrypted client key",
    "api_id": "private REST API id, sent as x-apigw-api-id (upstream URL: the VPC endpoint's DNS name)",
}


def settings_help() -> str:
    """Every setting, its variable and its default: the epilog of ``serve --help``."""
    lines = ["settings (environment variables; *_FILE variants read secrets from files):"]
    for key, meaning in SETTING_HELP.items():
        field = Settings.model_fields.get(key)
        default = "" if field is None or field.default is None or field.is_required() else field.default
        if isinstance(default, tuple):
            default = ",".join(str(item) for item in default)
        name = _env_name(key) + (f" / {_env_name(key)}_FILE" if key in FILE_KEYS else "")
        shown = f" (default: {default})" if default not in ("", ()) else ""
        lines.append(f"  {name}\n      {meaning}{shown}")
    lines.append(
        "  HTTPS_PROXY, HTTP_PROXY, NO_PROXY (or lower case, which wins)\n      the standard proxy variables, read as "
        "curl reads them, unless SIDECAR_EGRESS_PROXY is set"
    )
    return "\n".join(lines)


def _env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


def read_secret_file(path: str | Path) -> str:
    """A secret from a file; Docker and Kubernetes secrets often end with one newline, a token never does."""
    return Path(path).read_text(encoding="utf-8").removesuffix("\n").removesuffix("\r")


def _load_toml(path: str, problems: list[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        problems.append(f"SIDECAR_CONFIG: file {path} does not exist")
        return {}
    except OSError as exc:
        problems.append(f"SIDECAR_CONFIG: cannot read {path}: {exc.strerror}")
        return {}
    except tomllib.TOMLDecodeError as exc:
        problems.append(f"SIDECAR_CONFIG: {path} is not valid TOML: {exc}")
        return {}
    for key in sorted(set(data) - _KNOWN_KEYS):
        problems.append(f"SIDECAR_CONFIG: unknown key {key!r} in {path}")
    return {key: value for key, value in data.items() if key in _KNOWN_KEYS and key != "config"}


class _Layer:
    """One source of values (the environment, the TOML file, a route table) and how it names a key."""

    def __init__(self, values: Mapping[str, Any], name: Any) -> None:
        self.values = values
        self.name = name


def _merge(
    layers: Sequence[_Layer],
    keys: Sequence[str],
    problems: list[str],
    failed: set[str],
    unread: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """One dict from ``layers`` (first wins), with every ``*_file`` read; a failed read is a problem and its
    key goes into ``failed`` (so that no "is required" follows for it). Files of ``unread`` keys are only
    named, not read (``login`` writes the refresh token file; it need not exist yet)."""
    raw: dict[str, Any] = {}
    for key in keys:
        for layer in layers:
            if key in layer.values:
                raw[key] = layer.values[key]
                break
    for key in FILE_KEYS:
        if key not in keys:
            continue
        found = next((layer for layer in layers if layer.values.get(f"{key}_file")), None)
        if found is None:
            continue
        path, label = found.values[f"{key}_file"], found.name(f"{key}_file")
        if key in unread:
            raw[f"{key}_file"] = str(path)
            continue
        if key in raw:
            holder = next(layer for layer in layers if key in layer.values)
            problems.append(f"{holder.name(key)}: set either {holder.name(key)} or {label}, not both")
            failed.add(key)
            continue
        try:
            value = read_secret_file(path)
        except FileNotFoundError:
            problems.append(f"{label}: file {path} does not exist")
        except OSError as exc:
            problems.append(f"{label}: cannot read {path}: {exc.strerror}")
        else:
            if value:
                raw[key] = value
                raw[f"{key}_file"] = str(path)
                continue
            problems.append(f"{label}: file {path} is empty")
        failed.add(key)
    return raw


def _token_url_of(values: Mapping[str, Any]) -> str | None:
    if values.get("token_url"):
        return str(values["token_url"]).rstrip("/")
    domain = values.get("cognito_domain")
    return f"{str(domain).rstrip('/')}/oauth2/token" if domain else None


def _inherit(base: Mapping[str, Any], table: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """What a route table starts from: the top level's values, less the secrets that belong to another token
    endpoint or app client when the route names its own. Also says whether the token endpoint is another."""
    inherited = {key: base[key] for key in _INHERITED if base.get(key) is not None}
    own_url = _token_url_of(table)
    other_endpoint = own_url is not None and own_url != _token_url_of(base)
    if other_endpoint or table.get("client_id", base.get("client_id")) != base.get("client_id"):
        for key in _CREDENTIALS:
            inherited.pop(key, None)
    if own_url is not None:
        inherited.pop("token_url", None)
    if "grant" in table and "token" not in table:
        inherited.pop("token", None)  # the kind follows the route's own grant
    return inherited, other_endpoint


Purpose = Literal["serve", "token", "login"]


def load_settings(env: Mapping[str, str], *, purpose: Purpose = "serve") -> Settings:
    """Build ``Settings`` from an environment mapping, or raise ``ConfigError`` listing every problem.

    ``purpose`` relaxes what is required: ``token`` needs no upstream, ``login`` no upstream and no refresh
    token (it is what login obtains).
    """
    problems: list[str] = []
    file_data: dict[str, Any] = {}
    config_path = env.get(_env_name("config"))
    if config_path:
        file_data = _load_toml(config_path, problems)
    for name in sorted(env):
        if name.startswith(ENV_PREFIX) and name[len(ENV_PREFIX) :].lower() not in _KNOWN_KEYS - {"routes"}:
            problems.append(f"{name}: unknown setting (check the spelling; see config/example.env)")

    environment = {key[len(ENV_PREFIX) :].lower(): value for key, value in env.items() if key.startswith(ENV_PREFIX)}
    layers = [_Layer(environment, _env_name), _Layer(file_data, lambda key: f"{key} in SIDECAR_CONFIG")]
    failed: set[str] = set()
    keys = [
        key
        for key in Settings.model_fields
        if key not in ("routes", *_FROM_ENVIRONMENT) and (not key.endswith("_file") or key in PATH_KEYS)
    ]
    raw = _merge(layers, keys, problems, failed, frozenset({"refresh_token"} if purpose == "login" else ()))

    tables = file_data.get("routes", [])
    labels: list[str] = []
    if not isinstance(tables, list) or not all(isinstance(table, dict) for table in tables):
        problems.append("SIDECAR_CONFIG: routes must be an array of tables ([[routes]]) with prefix and upstream_url")
        tables = []
    route_dicts: list[dict[str, Any]] = []
    for index, table in enumerate(tables):
        label = f"SIDECAR_CONFIG routes[{index}] ({table.get('prefix', 'no prefix')})"
        labels.append(label)
        for key in sorted(set(table) - _ROUTE_KEYS):
            problems.append(f"{label}: unknown key {key!r}")
        known = {key: value for key, value in table.items() if key in _ROUTE_KEYS}
        route_failed: set[str] = set()
        layer = _Layer(known, lambda key, label=label: f"{label}: {key}")
        inherited, other_endpoint = _inherit(raw, known)
        route = {**inherited, **_merge([layer], [*_ROUTE_KEYS], problems, route_failed)}
        if other_endpoint and raw.get("client_secret") and "client_secret" not in route:
            problems.append(
                f"{label}: client_secret: this route's token endpoint is not the top level's, so the top-level "
                'client secret is not sent there; set client_secret_file for this route (client_secret = "" for a '
                "public client)"
            )
            route_failed.add("client_secret")
        if route_failed:
            failed.update(f"routes.{index}.{key}" for key in route_failed)
        route_dicts.append(route)
    if route_dicts:
        raw["routes"] = route_dicts
    raw["proxy_environment"] = ProxyEnvironment.from_env(env)
    try:
        settings = Settings.model_validate(raw, context={"purpose": purpose})
    except ValidationError as exc:
        for error in exc.errors(include_input=False, include_url=False):
            place = _place(error["loc"], labels)
            if place[1] in failed:
                continue
            message = str(error["msg"]).removeprefix("Value error, ")
            if error["type"] == "missing":
                message = "is required"
            elif error["type"] == "extra_forbidden":
                message = "unknown setting"
            problems.append(f"{place[0]}: {message}")
        raise ConfigError(problems) from None
    try:
        settings.egress  # noqa: B018 - works out the proxies, raising on an unusable proxy URL
    except ConfigError as exc:
        problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return settings


def _place(loc: tuple[int | str, ...], labels: Sequence[str]) -> tuple[str, str]:
    """How an error location reads in a message, and the key used to skip problems already reported."""
    if len(loc) >= 3 and loc[0] == "routes" and isinstance(loc[1], int) and loc[1] < len(labels):
        return f"{labels[loc[1]]}: {loc[2]}", f"routes.{loc[1]}.{loc[2]}"
    key = str(loc[0]) if loc else "?"
    return _env_name(key), key


__all__ = [
    "FILE_KEYS",
    "FORBIDDEN_METHODS",
    "PATH_KEYS",
    "ConfigError",
    "RouteSettings",
    "Settings",
    "is_loopback",
    "load_settings",
    "parse_listen",
    "read_secret_file",
]
