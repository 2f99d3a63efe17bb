"""The rules single values follow, and the defaults that need a reason: checks of URLs, hosts and names,
shared by the top level and the routes. Imports nothing from the package but the listen address parser."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

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
# The token endpoint answers in well under a second; longer means trouble worth reporting.
DEFAULT_TOKEN_TIMEOUT = 10.0
# Serving processes on one host (SIDECAR_WORKERS): a few per core at most is ever useful.
MAX_WORKERS = 64
# On SIGTERM, new requests are still served this long while /-/readyz says draining: Kubernetes takes a few
# seconds to remove a terminating pod from its Service's endpoints (and a service shutting down beside the
# sidecar may still call it), so closing the listener at once would refuse requests that are on their way.
DEFAULT_SHUTDOWN_DELAY = 5.0
# Then in-flight requests get this long to finish (Kubernetes waits 30 s in all before SIGKILL: 5 + 20 < 30).
DEFAULT_SHUTDOWN_GRACE = 20
# Who may call when the sidecar listens on a non-loopback address: loopback and the private ranges
# (a compose or Kubernetes network), never the internet.
DEFAULT_ALLOW_FROM = ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
# Access lines the default leaves out: answered probes and scrapes of the sidecar's own routes (every few seconds
# from a kubelet or compose, and saying nothing an operator acts on).
DEFAULT_ACCESS_LOG_EXCLUDE = ("/-/",)
# The levels SIDECAR_LOG_LEVEL and SIDECAR_LOG_LEVELS accept.
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# Who may use a Unix socket: its owner and group (docker and kubernetes share a group between containers).
DEFAULT_SOCKET_MODE = "0660"

HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# A route prefix: RFC 3986 path characters, no percent-encoding, no query (logs and metrics carry it as it is).
ROUTE_PREFIX = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@/-]*")
METHOD = re.compile(r"^[A-Z]+$")
# An API Gateway API id (the first label of its execute-api host): ten lower-case letters and digits.
API_ID = re.compile(r"[a-z0-9]{10}")


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and the name ``localhost``: nothing else (``x.localhost`` may go to DNS)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_url(value: str, *, allow_insecure: bool, path_allowed: bool = True) -> str:
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


def words(value: Any) -> tuple[Any, ...]:
    """A list setting: comma- or space-separated words from the environment, or an array from the TOML file."""
    if isinstance(value, str):
        return tuple(word for word in re.split(r"[,\s]+", value) if word)
    if isinstance(value, list | tuple):
        return tuple(value)
    raise ValueError("must be a list: words separated by commas, or an array in the TOML file")


def env_name(key: str) -> str:
    """The environment variable of a setting: ``client_id`` -> ``SIDECAR_CLIENT_ID``."""
    return ENV_PREFIX + key.upper()


@dataclass(frozen=True)
class Origin:
    """Where a setting's value came from: ``kind`` is ``environment``, ``toml``, ``file`` (a secret read from the
    file the ``_FILE`` setting names) or ``inherited`` (a route's, from the top level); ``name`` is the variable
    or the place in the TOML file. A setting with no origin has its default."""

    kind: str
    name: str


# Where each value came from, by key: "listen", or "routes.0.upstream_url" for a route's.
Origins = dict[str, Origin]
