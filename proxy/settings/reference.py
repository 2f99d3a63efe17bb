"""What each setting means, for ``serve --help`` and for docs/configuration.md, read off the fields' own
descriptions (``field(..., description=...)``), so the help and the docs cannot drift from the code."""

from __future__ import annotations

from collections.abc import Iterator

from proxy.settings.model import Settings
from proxy.settings.rules import FILE_KEYS, PATH_KEYS, env_name
from proxy.settings.schema import Field

CONFIG_HELP = "TOML file with these settings (lower-case keys; the environment wins)"
PROXY_NAMES = ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY")
PROXY_VARIABLES = f"{', '.join(PROXY_NAMES)} (or lower case, which wins)"
PROXY_HELP = "the standard proxy variables, read as curl reads them, unless SIDECAR_EGRESS_PROXY is set"


def described() -> Iterator[tuple[str, Field]]:
    """Every setting a user sets, in the order the fields are declared (the credential first)."""
    for key, field in Settings.fields.items():
        if field.description and (not key.endswith("_file") or key in PATH_KEYS):
            yield key, field


def default_of(field: Field) -> str:
    """A field's default as a user would type it; empty when there is none to show."""
    if field.is_required() or field.default in (None, "", ()):
        return ""
    default = field.default
    if isinstance(default, tuple):
        return ",".join(str(item) for item in default)
    if isinstance(default, bool):
        return "1" if default else "0"
    if isinstance(default, float) and default.is_integer():
        return str(int(default))  # 300, as a user writes it, not 300.0
    return str(default)


def variables(key: str) -> str:
    return env_name(key) + (f" / {env_name(key)}_FILE" if key in FILE_KEYS else "")


def settings_help() -> str:
    """Every setting, its variable and its default: the epilog of ``serve --help``."""
    lines = ["settings (environment variables; *_FILE variants read secrets from files):"]
    lines.append(f"  {env_name('config')}\n      {CONFIG_HELP}")
    for key, field in described():
        default = default_of(field)
        shown = f" (default: {default})" if default else ""
        meaning = (field.description or "").replace("`", "")
        lines.append(f"  {variables(key)}\n      {meaning}{shown}")
    lines.append(f"  {PROXY_VARIABLES}\n      {PROXY_HELP}")
    return "\n".join(lines)


def settings_reference() -> str:
    """Every setting as a Markdown table, for docs/configuration.md (``scripts/docs`` writes it there)."""
    rows = ["| Variable | Default | Meaning |", "|---|---|---|", f"| `{env_name('config')}` | | {CONFIG_HELP} |"]
    for key, field in described():
        default = default_of(field)
        names = " ".join(f"`{name}`" for name in variables(key).split(" / "))
        shown = "required" if field.is_required() else f"`{default}`" if default else ""
        rows.append(f"| {names} | {shown} | {field.description} |")
    rows.append(f"| {', '.join(f'`{name}`' for name in PROXY_NAMES)} (lower case wins) | | {PROXY_HELP} |")
    return "\n".join(rows)


__all__ = ["settings_help", "settings_reference"]
