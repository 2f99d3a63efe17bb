"""Settings: read once from the environment, *_FILE files and an optional TOML file; validated once.

``load_settings(env)`` (``load``) returns frozen ``Settings`` (``model``, with its ``RouteSettings``, ``route``) or
raises ``ConfigError`` listing every problem at once. Each field carries its own description, which ``serve --help``
and docs/configuration.md read (``reference``). ``schema`` is how fields, validators and models are declared.
"""

from proxy.settings.load import load_settings
from proxy.settings.model import Settings
from proxy.settings.reference import settings_help
from proxy.settings.route import RouteSettings
from proxy.settings.rules import FILE_KEYS, PATH_KEYS, is_loopback
from proxy.settings.schema import SecretStr

__all__ = [
    "FILE_KEYS",
    "PATH_KEYS",
    "RouteSettings",
    "SecretStr",
    "Settings",
    "is_loopback",
    "load_settings",
    "settings_help",
]
