"""Settings: read once from the environment, *_FILE files and an optional TOML file; validated once.

``load_settings(env)`` takes the environment as a mapping (tests pass a dict) and returns frozen
``Settings`` or raises ``ConfigError`` listing every problem at once, each naming its variable.
Precedence: ``SIDECAR_X`` (or ``SIDECAR_X_FILE``) in the environment, then key ``x`` (or ``x_file``)
in the TOML file named by ``SIDECAR_CONFIG``, then the default. Secret values never appear in a repr
or an error message.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, ValidationInfo, field_validator

from proxy.errors import ConfigError

ENV_PREFIX = "SIDECAR_"

# Keys whose value may come from a file (`SIDECAR_X_FILE` / `x_file`): the secrets.
FILE_KEYS = ("client_secret", "refresh_token", "api_key")

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
# On SIGTERM, in-flight requests get this long to finish (Kubernetes waits 30 s before SIGKILL).
DEFAULT_SHUTDOWN_GRACE = 20

_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
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
    if parts.scheme == "http" and not allow_insecure and not _is_loopback(parts.hostname):
        raise ValueError(
            "plain http:// is accepted only for loopback hosts; use https:// "
            "(or set SIDECAR_ALLOW_INSECURE=1 for a trusted private network such as a compose dev stack)"
        )
    return value.rstrip("/")


def parse_listen(value: str) -> tuple[str, int]:
    """Split ``host:port`` (``[::1]:8080`` for IPv6) and check both parts."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]]+):(\d{1,5})", value.strip())
    if not match:
        raise ValueError("must be host:port, e.g. 127.0.0.1:8080, 0.0.0.0:8080 or [::1]:8080")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if port > 65535:
        raise ValueError("port must be 0-65535")
    return host, port


def _valid_header(value: str) -> str:
    if not _HEADER_NAME.match(value):
        raise ValueError("must be a valid HTTP header name, e.g. Authorization")
    if value.lower() in ("host", "content-length", "transfer-encoding", "connection"):
        raise ValueError(f"{value} is managed by the sidecar and cannot carry the token")
    return value


def _valid_prefix(value: str) -> str:
    if any(ch in value for ch in "\r\n\0"):
        raise ValueError("must not contain line breaks")
    return value


class _Credentialed(BaseModel):
    """What the top level and every route have: the credential, and how the token is sent."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    # First, so the URL validators can see it.
    allow_insecure: bool = False
    token_url: str
    client_id: str = Field(min_length=1)
    client_secret: SecretStr | None = None
    client_secret_file: Path | None = None
    grant: Literal["refresh_token", "client_credentials"] = "refresh_token"
    scopes: str = ""
    refresh_token: SecretStr | None = None
    refresh_token_file: Path | None = None
    token: Literal["id_token", "access_token"] = "id_token"
    api_key: SecretStr | None = None
    api_key_file: Path | None = None
    header: str = "Authorization"
    header_prefix: str = ""

    @field_validator("token_url", "upstream_url", check_fields=False)
    @classmethod
    def _url(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        return _check_url(value, allow_insecure=bool(info.data.get("allow_insecure", False)))

    @field_validator("header")
    @classmethod
    def _header(cls, value: str) -> str:
        return _valid_header(value)

    @field_validator("header_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        return _valid_prefix(value)

    def credential_key(self) -> tuple[str, ...]:
        """Routes with the same key share one token cache and one refresh."""
        source = str(self.refresh_token_file or "")
        if not source and self.refresh_token is not None:
            source = hashlib.sha256(self.refresh_token.get_secret_value().encode()).hexdigest()
        scopes = self.scopes if self.grant == "client_credentials" else ""
        return (self.token_url, self.client_id, self.grant, scopes, source)


class RouteSettings(_Credentialed):
    """One route of a multi-API sidecar: a path prefix, its upstream, and its credential and header options.

    Anything a route leaves out is taken from the top-level settings.
    """

    prefix: str
    upstream_url: str
    strip_prefix: bool = True

    @field_validator("prefix")
    @classmethod
    def _prefix_path(cls, value: str) -> str:
        if not value.startswith("/") or not value.isascii() or "?" in value or "%" in value:
            raise ValueError("must be a plain path starting with /, e.g. /orders")
        if value == "/-" or value.startswith("/-/"):
            raise ValueError("/-/ is reserved for the sidecar's own routes")
        return value.rstrip("/") or "/"


class Settings(_Credentialed):
    """Validated, immutable settings. Build with ``load_settings``; tests may construct it directly."""

    # Required to serve; `login` and `token` work without it (load_settings(purpose=...)).
    upstream_url: str | None = None
    listen: str = "127.0.0.1:8080"
    refresh_margin: float = Field(default=DEFAULT_REFRESH_MARGIN, ge=0)
    connect_timeout: float = Field(default=DEFAULT_CONNECT_TIMEOUT, gt=0)
    read_timeout: float = Field(default=DEFAULT_READ_TIMEOUT, gt=0)
    token_timeout: float = Field(default=DEFAULT_TOKEN_TIMEOUT, gt=0)
    pool_timeout: float = Field(default=DEFAULT_POOL_TIMEOUT, gt=0)
    max_connections: int = Field(default=DEFAULT_MAX_CONNECTIONS, ge=1)
    shutdown_grace: int = Field(default=DEFAULT_SHUTDOWN_GRACE, ge=0)
    access_log: bool = True
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    routes: tuple[RouteSettings, ...] = ()

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        parse_listen(value)
        return value.strip()

    @property
    def listen_address(self) -> tuple[str, int]:
        return parse_listen(self.listen)

    def effective_routes(self) -> tuple[RouteSettings, ...]:
        """Every route, longest prefix first; the top-level upstream (the one-route shorthand) is the ``/`` route."""
        routes = list(self.routes)
        if self.upstream_url and not any(route.prefix == "/" for route in routes):
            inherited = {name: getattr(self, name) for name in _INHERITED}
            routes.append(RouteSettings(prefix="/", upstream_url=self.upstream_url, strip_prefix=False, **inherited))
        return tuple(sorted(routes, key=lambda route: len(route.prefix), reverse=True))


# What a route takes from the top level when it does not say.
_INHERITED = tuple(name for name in _Credentialed.model_fields)
_ROUTE_KEYS = frozenset(RouteSettings.model_fields) | {"cognito_domain"} | {f"{k}_file" for k in FILE_KEYS}
_KNOWN_KEYS = frozenset(Settings.model_fields) | {"cognito_domain", "config"} | {f"{k}_file" for k in FILE_KEYS}


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
    return {key: value for key, value in data.items() if key in _KNOWN_KEYS}


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
        if not name.startswith(ENV_PREFIX):
            continue
        if name[len(ENV_PREFIX) :].lower() not in _KNOWN_KEYS:
            problems.append(f"{name}: unknown setting (check the spelling; see config/example.env)")

    raw: dict[str, Any] = {}
    reported: set[str] = set()  # keys with a problem already listed, so pydantic's "missing" is not repeated
    for key in [*Settings.model_fields, "cognito_domain"]:
        env_name = _env_name(key)
        if env_name in env:
            raw[key] = env[env_name]
        elif key in file_data:
            raw[key] = file_data[key]
        if key not in FILE_KEYS:
            continue
        file_env = _env_name(f"{key}_file")
        file_path = env.get(file_env) or file_data.get(f"{key}_file")
        source = file_env if file_env in env else f"{key}_file in SIDECAR_CONFIG"
        if not file_path:
            continue
        if key in raw:
            problems.append(f"{env_name}: set either {env_name} or {file_env}, not both")
            reported.add(key)
            continue
        try:
            raw[key] = read_secret_file(file_path)
        except FileNotFoundError:
            problems.append(f"{source}: file {file_path} does not exist")
            reported.add(key)
            continue
        except OSError as exc:
            problems.append(f"{source}: cannot read {file_path}: {exc.strerror}")
            reported.add(key)
            continue
        if key in FILE_KEYS:
            raw[f"{key}_file"] = str(file_path)
        if not raw[key]:
            problems.append(f"{source}: file {file_path} is empty")
            reported.add(key)
            del raw[key]

    domain = raw.pop("cognito_domain", None)
    if not raw.get("token_url"):
        if domain:
            allow = str(raw.get("allow_insecure", "")).lower() in ("1", "true", "yes", "on")
            try:
                raw["token_url"] = _check_url(str(domain), allow_insecure=allow, path_allowed=False) + "/oauth2/token"
            except ValueError as exc:
                reported.add("token_url")
                problems.append(f"SIDECAR_COGNITO_DOMAIN: {exc}")
        else:
            reported.add("token_url")
            problems.append(
                "SIDECAR_COGNITO_DOMAIN or SIDECAR_TOKEN_URL: one is required, e.g. "
                "SIDECAR_COGNITO_DOMAIN=https://my-app.auth.us-east-1.amazoncognito.com"
            )
    if raw.get("client_secret") == "":
        raw["client_secret"] = None
    grant = raw.get("grant", "refresh_token")
    if grant == "client_credentials":
        # No user, no id token: the access token is what this grant gives.
        raw.setdefault("token", "access_token")
        if raw.get("token") == "id_token":
            problems.append("SIDECAR_TOKEN: client_credentials gives no id token; use access_token (the default)")
            reported.add("token")
        if not raw.get("client_secret") and "client_secret" not in reported:
            problems.append("SIDECAR_CLIENT_SECRET: required for client_credentials (or SIDECAR_CLIENT_SECRET_FILE)")
            reported.add("client_secret")
    elif (
        grant == "refresh_token"
        and purpose != "login"
        and not raw.get("refresh_token")
        and "refresh_token" not in reported
    ):
        problems.append(
            "SIDECAR_REFRESH_TOKEN: is required (or SIDECAR_REFRESH_TOKEN_FILE); get one with "
            "`cognito-sidecar login`, or use SIDECAR_GRANT=client_credentials for a machine-to-machine app client"
        )
        reported.add("refresh_token")

    if isinstance(file_data.get("routes"), list):
        raw["routes"] = _load_routes(file_data["routes"], raw, problems)
    elif "routes" in file_data:
        problems.append("SIDECAR_CONFIG: routes must be an array of tables ([[routes]])")
    if purpose == "serve" and not raw.get("upstream_url") and not raw.get("routes") and "upstream_url" not in reported:
        problems.append(
            "SIDECAR_UPSTREAM_URL: is required, e.g. https://abc123.execute-api.us-east-1.amazonaws.com/prod"
        )
        reported.add("upstream_url")
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        for error in exc.errors(include_input=False, include_url=False):
            key = str(error["loc"][0]) if error["loc"] else "?"
            if key in reported:
                continue
            missing = error["type"] == "missing"
            message = "is required" if missing else str(error["msg"]).removeprefix("Value error, ")
            problems.append(f"{_env_name(key)}: {message}")
        raise ConfigError(problems) from None
    if problems:
        raise ConfigError(problems)
    return settings


def _load_routes(tables: list[Any], base: Mapping[str, Any], problems: list[str]) -> list[RouteSettings]:
    """Validate ``[[routes]]`` tables from the TOML file; each inherits what it leaves out from ``base``."""
    routes: list[RouteSettings] = []
    seen: set[str] = set()
    for index, table in enumerate(tables):
        label = f"SIDECAR_CONFIG routes[{index}]"
        if not isinstance(table, dict):
            problems.append(f"{label}: must be a table with prefix and upstream_url")
            continue
        label += f" ({table.get('prefix', 'no prefix')})"
        unknown = sorted(set(table) - _ROUTE_KEYS)
        if unknown:
            problems.append(f"{label}: unknown key(s) {', '.join(unknown)}")
            continue
        raw: dict[str, Any] = {key: base[key] for key in _INHERITED if key in base and base[key] is not None}
        if "client_id" in table and "refresh_token" not in table and "refresh_token_file" not in table:
            # Another app client cannot use the top-level client's refresh token.
            raw.pop("refresh_token", None)
            raw.pop("refresh_token_file", None)
        if table.get("grant") == "client_credentials" and "token" not in table:
            raw["token"] = "access_token"
        raw.update(
            {key: value for key, value in table.items() if not key.endswith("_file") and key != "cognito_domain"}
        )
        for key in FILE_KEYS:
            path = table.get(f"{key}_file")
            if path:
                try:
                    raw[key] = read_secret_file(path)
                except OSError as exc:
                    problems.append(f"{label}: {key}_file {path}: {exc.strerror}")
                    continue
                if key in FILE_KEYS:
                    raw[f"{key}_file"] = str(path)
        if table.get("cognito_domain") and "token_url" not in table:
            raw["token_url"] = str(table["cognito_domain"]).rstrip("/") + "/oauth2/token"
        if raw.get("grant", "refresh_token") == "refresh_token" and not raw.get("refresh_token"):
            problems.append(f"{label}: refresh_token (or refresh_token_file) is required for the refresh_token grant")
            continue
        try:
            route = RouteSettings.model_validate(raw)
        except ValidationError as exc:
            for error in exc.errors(include_input=False, include_url=False):
                key = str(error["loc"][0]) if error["loc"] else "?"
                missing = error["type"] == "missing"
                message = "is required" if missing else str(error["msg"]).removeprefix("Value error, ")
                problems.append(f"{label}: {key}: {message}")
            continue
        if route.prefix in seen:
            problems.append(f"{label}: prefix {route.prefix} is declared twice")
        seen.add(route.prefix)
        routes.append(route)
    return routes
