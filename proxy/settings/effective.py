"""The settings a process runs with, as a person reads them: every setting's variable, its value (a secret only
as ``[set]`` or ``[file: path]``, a Redis URL without its password) and where it came from. ``cognito-sidecar
config`` prints it; ``/-/config`` serves it to trusted callers."""

from __future__ import annotations

from typing import Any

from proxy.settings.model import Settings
from proxy.settings.reference import described
from proxy.settings.route import RouteSettings
from proxy.settings.rules import PATH_KEYS, Origin, env_name
from proxy.settings.schema import Model, SecretStr
from proxy.store.redis import RedisTarget

DEFAULT = Origin("default", "")
DERIVED = Origin("derived", "")


def shown(model: Model, key: str) -> str:
    """``model.key`` as a user would write it, with no secret in it."""
    value: Any = getattr(model, key)
    if isinstance(value, SecretStr):
        path = getattr(model, f"{key}_file", None)
        return f"[file: {path}]" if path is not None else "[set]"
    if value is None:
        return ""
    if key == "token_store" and str(value).startswith("redis"):
        return RedisTarget.parse(str(value)).name
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, tuple):
        return ",".join("=".join(item) if isinstance(item, tuple) else str(item) for item in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _row(name: str, value: str, origin: Origin) -> dict[str, str]:
    return {"name": name, "value": value, "source": origin.kind, "from": origin.name}


def _origin(model: Model, key: str, origin: Origin | None) -> Origin:
    if origin is not None:
        return origin
    field = type(model).fields[key]
    return DEFAULT if field.default == getattr(model, key) else DERIVED  # e.g. the token URL, from the domain


def effective(settings: Settings) -> dict[str, Any]:
    """Every setting, the egress proxies and every route, each value with its origin (``Origin``: ``default``
    when it had none, ``derived`` when other settings decided it)."""
    origins = settings.origins
    config = origins.get("config")  # its name is the file's path
    rows = [_row(env_name("config"), config.name if config else "", Origin("environment", "") if config else DEFAULT)]
    rows += [
        _row(env_name(key), shown(settings, key), _origin(settings, key, origins.get(key))) for key, _ in described()
    ]
    egress = settings.egress
    for scheme, proxy in (("https", egress.https), ("http", egress.http)):
        origin = Origin("environment", proxy.source) if proxy is not None else DEFAULT
        rows.append(_row(f"egress proxy for {scheme}://", proxy.display if proxy else "none (direct)", origin))
    if egress.no_proxy.value:
        rows.append(_row("NO_PROXY", egress.no_proxy.value, Origin("environment", "NO_PROXY")))
    keys = [key for key in RouteSettings.fields if not key.endswith("_file") or key in PATH_KEYS]
    routes = [
        {
            "prefix": route.prefix,
            "settings": [
                _row(key, shown(route, key), _origin(route, key, origins.get(f"routes.{index}.{key}"))) for key in keys
            ],
        }
        for index, route in enumerate(settings.routes)
    ]
    return {"settings": rows, "routes": routes}


def effective_text(report: dict[str, Any]) -> str:
    """``effective``'s report as aligned text: ``NAME = value   (source: where)``."""

    def lines(rows: list[dict[str, str]], indent: str) -> list[str]:
        width = max((len(row["name"]) for row in rows), default=0)
        out = []
        for row in rows:
            where = row["source"] + (f": {row['from']}" if row["from"] and row["from"] != row["name"] else "")
            out.append(f"{indent}{row['name']:<{width}} = {row['value']}".rstrip() + f"   ({where})")
        return out

    text = lines(report["settings"], "")
    for route in report["routes"]:
        text.append(f"\n[[routes]] prefix = {route['prefix']}")
        text.extend(lines(route["settings"], "  "))
    return "\n".join(text) + "\n"


__all__ = ["effective", "effective_text", "shown"]
