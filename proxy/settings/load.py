"""Loading settings: read once from the environment, *_FILE files and an optional TOML file; validated once.

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

import tomllib
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from proxy import tracing
from proxy.egress.route import ProxyEnvironment
from proxy.errors import ConfigError
from proxy.secrets import read_secret_file
from proxy.settings.model import Settings
from proxy.settings.route import INHERITED, RouteSettings
from proxy.settings.rules import ENV_PREFIX, FILE_KEYS, PATH_KEYS, ROUTE_FILE_KEYS, Origin, Origins, env_name
from proxy.settings.schema import Invalid

# What a route does not take when it talks to another token endpoint or app client: its secrets are not
# the top level's to send there.
_CREDENTIALS = ("client_secret", "client_secret_file", "refresh_token", "refresh_token_file")
_ROUTE_KEYS = frozenset(RouteSettings.fields) | {f"{k}_file" for k in ROUTE_FILE_KEYS}
# Read from the standard variables (HTTPS_PROXY, ...), never from a SIDECAR_ setting or the TOML file.
_FROM_ENVIRONMENT = frozenset({"proxy_environment", "tracing_endpoint"})
_KNOWN_KEYS = (frozenset(Settings.fields) - _FROM_ENVIRONMENT) | {"config"}


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
    """One source of values (the environment, the TOML file, a route table), how it names a key, and what kind of
    source it is (``Origin.kind``)."""

    def __init__(self, values: Mapping[str, Any], name: Any, kind: str = "toml") -> None:
        self.values = values
        self.name = name
        self.kind = kind


def _merge(
    layers: Sequence[_Layer],
    keys: Sequence[str],
    problems: list[str],
    failed: set[str],
    unread: frozenset[str] = frozenset(),
    origins: Origins | None = None,
) -> dict[str, Any]:
    """One dict from ``layers`` (first wins), with every ``*_file`` read; a failed read is a problem and its
    key goes into ``failed`` (so that no "is required" follows for it). Files of ``unread`` keys are only
    named, not read (``login`` writes the refresh token file; it need not exist yet). ``origins``, if given,
    gets where each value came from."""
    raw: dict[str, Any] = {}
    origins = {} if origins is None else origins
    for key in keys:
        for layer in layers:
            if key in layer.values:
                raw[key] = layer.values[key]
                origins[key] = Origin(layer.kind, layer.name(key))
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
                origins[key] = Origin("file", label)
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
    inherited = {key: base[key] for key in INHERITED if base.get(key) is not None}
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
    """Build ``Settings`` from an environment mapping, or raise ``ConfigError`` listing every problem. The settings
    know where each value came from (``Settings.origins``).

    ``purpose`` relaxes what is required: ``token`` needs no upstream, ``login`` no upstream and no refresh
    token (it is what login obtains).
    """
    origins: Origins = {}
    problems: list[str] = []
    file_data: dict[str, Any] = {}
    config_path = env.get(env_name("config"))
    if config_path:
        file_data = _load_toml(config_path, problems)
        origins["config"] = Origin("environment", config_path)
    for name in sorted(env):
        if name.startswith(ENV_PREFIX) and name[len(ENV_PREFIX) :].lower() not in _KNOWN_KEYS - {"routes"}:
            problems.append(f"{name}: unknown setting (check the spelling; see config/example.env)")

    environment = {key[len(ENV_PREFIX) :].lower(): value for key, value in env.items() if key.startswith(ENV_PREFIX)}
    layers = [
        _Layer(environment, env_name, "environment"),
        _Layer(file_data, lambda key: f"{key} in SIDECAR_CONFIG"),
    ]
    failed: set[str] = set()
    keys = [
        key
        for key in Settings.fields
        if key not in ("routes", *_FROM_ENVIRONMENT) and (not key.endswith("_file") or key in PATH_KEYS)
    ]
    raw = _merge(layers, keys, problems, failed, frozenset({"refresh_token"} if purpose == "login" else ()), origins)

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
        own: Origins = {}
        route = {**inherited, **_merge([layer], [*_ROUTE_KEYS], problems, route_failed, origins=own)}
        for key in route:
            origin = own.get(key) or Origin("inherited", origins[key].name if key in origins else key)
            origins[f"routes.{index}.{key}"] = origin
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
    raw["tracing_endpoint"] = tracing.endpoint_of(env)
    if "tracing" not in raw and tracing.wanted(env):
        raw["tracing"] = True
        origins["tracing"] = Origin("environment", next(name for name in tracing.ENDPOINT_VARIABLES if env.get(name)))
    try:
        settings = Settings.validate(raw, context={"purpose": purpose})
    except Invalid as exc:
        for problem in exc.problems:
            place = _place(problem.loc, labels)
            if place[1] in failed:
                continue
            message = problem.msg
            if problem.type == "missing":
                message = "is required"
            elif problem.type == "extra_forbidden":
                message = "unknown setting"
            problems.append(f"{place[0]}: {message}")
        raise ConfigError(problems) from None
    try:
        settings.egress  # noqa: B018 - works out the proxies, raising on an unusable proxy URL
    except ConfigError as exc:
        problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    settings.origins.update(origins)
    return settings


def _place(loc: tuple[int | str, ...], labels: Sequence[str]) -> tuple[str, str]:
    """How an error location reads in a message, and the key used to skip problems already reported."""
    if len(loc) >= 3 and loc[0] == "routes" and isinstance(loc[1], int) and loc[1] < len(labels):
        return f"{labels[loc[1]]}: {loc[2]}", f"routes.{loc[1]}.{loc[2]}"
    key = str(loc[0]) if loc else "?"
    return env_name(key), key
