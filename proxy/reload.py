"""Reloading every setting while serving: on SIGHUP, and when the TOML file (``SIDECAR_CONFIG``) or a secret file
changes. ``Reloader.reload`` goes through these phases:

1. **load**: the environment, the files and the TOML file are read and validated as a whole, as at start; an
   invalid configuration is refused with the same report, and the running one keeps serving;
2. **compare**: settings that only a restart can change (``RESTART_ONLY``: the listeners, the workers, the token
   store, the token endpoint's client) keep their running values, and the log names them; a credential a route
   already uses must be the same (new credentials, in new routes, are welcome);
3. **build**: a new sidecar from the new settings, keeping the token endpoint's client, the token store, the
   counts and the provider (with its token) of every credential it still has;
4. **swap**: the new sidecar's pools open, its new credentials start, then the app serves new requests with it
   (``SidecarApp.use``); requests in flight finish on the old routes, whose pools close once they have;
5. **tidy**: the credentials no route uses any more stop; the logging takes its new levels; the secret files
   are re-read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from proxy.errors import ConfigError, SidecarError
from proxy.logs import configure_logging, event
from proxy.settings import RouteSettings, Settings, load_settings
from proxy.settings.rules import FILE_KEYS, env_name
from proxy.settings.schema import Model
from proxy.sidecar import build_sidecar

if TYPE_CHECKING:
    from proxy.app import SidecarApp

log = logging.getLogger("proxy.reload")

# Settings a running sidecar keeps until it restarts: the sockets it listens on and its processes; the token
# store and everything the token endpoint's client was built with (its providers keep their tokens); tracing.
RESTART_ONLY = frozenset(
    {
        "listen",
        "metrics_listen",
        "socket_mode",
        "workers",
        "shutdown_delay",
        "shutdown_grace",
        "token_store",
        "token_store_plaintext",
        "token_store_password",
        "token_store_password_file",
        "token_store_lease",
        "token_store_key",
        "token_store_key_file",
        "refresh_margin",
        "token_timeout",
        "egress_proxy",
        "egress_proxy_file",
        "proxy_environment",
        "tracing",
        "tracing_endpoint",
    }
)
# What the logging is configured from.
_LOGGING = ("log_level", "log_format", "log_levels")
# What a provider was made from: a route that keeps its credential key must keep these too.
_CREDENTIAL = ("client_secret", "refresh_token", "scopes", "grant")


def _value(model: Model, key: str) -> object:
    """What a reload compares of ``model.key``: a secret read from a file by its file (the file's new content is
    the secrets' re-read's business, done without a rebuild), anything else by its value."""
    if key in FILE_KEYS and getattr(model, f"{key}_file", None) is not None:
        return getattr(model, f"{key}_file")
    return getattr(model, key)


def _route(route: RouteSettings) -> dict[str, object]:
    return {key: _value(route, key) for key in RouteSettings.fields}


def changed_settings(old: Settings, new: Settings) -> list[str]:
    """The keys whose values differ (``routes``: any route's, or the routes' list)."""
    keys = [key for key in Settings.fields if key != "routes" and _value(old, key) != _value(new, key)]
    if [_route(route) for route in old.effective_routes()] != [_route(route) for route in new.effective_routes()]:
        keys.append("routes")
    return keys


def _by_credential(settings: Settings) -> dict[tuple[str, ...], list[RouteSettings]]:
    found: dict[tuple[str, ...], list[RouteSettings]] = {}
    for route in settings.effective_routes():
        found.setdefault(route.credential_key(), []).append(route)
    return found


def credential_conflicts(old: Settings, new: Settings) -> list[str]:
    """Why ``new`` cannot keep ``old``'s providers: a credential both use whose secrets or token kinds differ."""
    before, after = _by_credential(old), _by_credential(new)
    problems = []
    for key in before.keys() & after.keys():
        was, now = before[key], after[key]
        same = all(_value(was[0], name) == _value(now[0], name) for name in _CREDENTIAL)
        if not same or {route.token for route in was} != {route.token for route in now}:
            prefix = now[0].prefix
            what = "its client secret or refresh token changed" if not same else "it is asked for other token kinds"
            problems.append(
                f"route {prefix}: {what}; a running credential changes only at a restart (or through its secret "
                "files, which are re-read without one)"
            )
    return sorted(problems)


class Reloader:
    """Reloads ``app``'s settings from ``env`` (the process environment, whose files and TOML file may change);
    ``loaded``: what ``env`` gave at start, if the app runs with settings changed since."""

    def __init__(self, app: SidecarApp, env: Mapping[str, str], loaded: Settings | None = None) -> None:
        self._app = app
        self._env = env
        # What ``env`` gave last: what a reload compares with. The running settings may differ from what ``env``
        # gave at start (``loaded``) where the process set a value itself, as the workers' private token store.
        self._loaded = loaded or app.sidecar.settings
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[bool]] = set()
        app.sidecar.on_files_changed = self.reload_soon

    def reload_soon(self) -> None:
        """``reload`` in a task of its own (from a signal handler, or the file watcher)."""
        task = asyncio.get_running_loop().create_task(self.reload(), name="reload")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self) -> bool:
        """Re-read every setting and take up what changed; True if the app now serves with new settings."""
        async with self._lock:  # a second SIGHUP waits for the first reload
            return await self._reload()

    async def _reload(self) -> bool:
        old = self._app.sidecar
        if old.draining:
            return False
        try:
            settings = load_settings(self._env)
        except ConfigError as exc:
            self._refused(exc.problems)
            return False
        changed = changed_settings(self._loaded, settings)
        later = sorted(key for key in changed if key in RESTART_ONLY)
        if later:
            log.warning(
                "%s changed: taken up at the next restart; the running values stay until then",
                ", ".join(env_name(key) for key in later),
                extra=event("config_needs_restart", settings=[env_name(key) for key in later]),
            )
        loaded = settings
        settings = settings.copy_with(**{key: getattr(old.settings, key) for key in RESTART_ONLY})
        now = [key for key in changed if key not in RESTART_ONLY]
        if not now:
            self._loaded = loaded
            old.reload_secrets()
            log.info("configuration re-read: no setting that can change while serving changed")
            return False
        problems = credential_conflicts(old.settings, settings)
        if problems:
            self._refused(problems)
            return False
        try:
            sidecar = build_sidecar(settings, reuse=old)
        except (ConfigError, SidecarError) as exc:
            self._refused(exc.problems if isinstance(exc, ConfigError) else [str(exc)])
            return False
        self._loaded = loaded  # a refused configuration is compared with the running one again next time
        await sidecar.take_over(old)
        self._app.use(sidecar)
        await sidecar.carry_on(old)
        await old.hand_over(sidecar)
        if any(key in now for key in _LOGGING):
            configure_logging(settings.log_level, settings.log_format, settings.log_levels)
        sidecar.reload_secrets()
        names = ["routes" if key == "routes" else env_name(key) for key in now]
        log.info(
            "configuration reloaded: %s changed; new requests use it",
            ", ".join(names),
            extra=event("config_reloaded", settings=names),
        )
        return True

    def _refused(self, problems: Sequence[str]) -> None:
        report = str(ConfigError(list(problems))).rsplit("\n", 1)[0]  # the report as at start, less its last line
        log.error(
            "the new configuration is refused, and the running one keeps serving: %s\nFix these settings, then send "
            "SIGHUP again (a change of the SIDECAR_CONFIG file is seen by itself).",
            report,
            extra=event("config_refused", problems=len(problems)),
        )


__all__ = ["RESTART_ONLY", "Reloader", "changed_settings", "credential_conflicts"]
