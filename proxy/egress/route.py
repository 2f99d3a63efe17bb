"""The way out: which egress proxy a request to a URL goes through.

Corporate networks let traffic out only through a forward proxy. The proxy is chosen as curl chooses it:

- ``SIDECAR_EGRESS_PROXY`` (or its ``_FILE``) names one proxy for every scheme and wins over the environment;
  ``none`` ignores the environment;
- otherwise ``https_proxy`` for https:// targets and ``http_proxy`` for http:// targets, the lower-case name
  winning over ``HTTPS_PROXY``/``HTTP_PROXY`` where both are set;
- ``no_proxy``/``NO_PROXY`` exempts hosts (``NoProxy``): names, ``.suffix`` or ``suffix``, IP addresses, CIDR
  ranges, each with an optional ``:port``, or ``*`` for all. Loopback is proxied like any other host unless named.

The proxy's credentials (the URL's ``user:password@``, sent as Basic) never appear in a repr, a log line or a
message: ``EgressProxy.display`` is the URL without them. Imports nothing from the package.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

# The proxy variables, lower case first: curl takes the lower-case one where both are set.
HTTPS_PROXY_NAMES = ("https_proxy", "HTTPS_PROXY")
HTTP_PROXY_NAMES = ("http_proxy", "HTTP_PROXY")
NO_PROXY_NAMES = ("no_proxy", "NO_PROXY")
# SIDECAR_EGRESS_PROXY's value that ignores the proxy variables.
NO_EGRESS_PROXY = "none"
# A forward proxy's usual port when its URL names none (Squid's default).
DEFAULT_PROXY_PORT = 3128


@dataclass(frozen=True)
class ProxyEnvironment:
    """The standard proxy variables as the process found them (tests pass their own), and their names."""

    https_proxy: str | None = field(default=None, repr=False)
    http_proxy: str | None = field(default=None, repr=False)
    no_proxy: str = ""
    https_name: str = "HTTPS_PROXY"
    http_name: str = "HTTP_PROXY"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ProxyEnvironment:
        def first(names: tuple[str, ...]) -> tuple[str | None, str]:
            for name in names:
                if env.get(name, "").strip():
                    return env[name].strip(), name
            return None, names[1]

        https, https_name = first(HTTPS_PROXY_NAMES)
        http, http_name = first(HTTP_PROXY_NAMES)
        no_proxy, _ = first(NO_PROXY_NAMES)
        return cls(https, http, no_proxy or "", https_name, http_name)


async def unresolved(url: str, within: float | None = None) -> str | None:
    """Why ``url``'s host does not resolve here (the resolver's words, or no answer ``within`` seconds); None when
    it does."""
    parts = urlsplit(url)
    try:
        async with asyncio.timeout(within):
            await asyncio.get_running_loop().getaddrinfo(
                parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80), type=socket.SOCK_STREAM
            )
    except TimeoutError:
        return f"no answer within {within:g} s"
    except OSError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class EgressProxy:
    """One forward proxy: its URL without credentials, and the credentials (Basic) kept apart."""

    url: str
    source: str  # the setting or variable it came from, for messages
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, value: str, source: str) -> EgressProxy:
        """Raises ``ValueError`` with a message that never quotes the value (it may hold a password)."""
        text = value.strip()
        if "://" not in text:
            text = "http://" + text  # curl's reading of a bare host:port
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError:
            raise ValueError(
                f"{source}: is not a valid proxy URL (expected http://[user:password@]host:port)"
            ) from None
        if parts.scheme not in ("http", "https"):
            raise ValueError(
                f"{source}: proxy scheme {parts.scheme}:// is not supported; use http://host:port (https:// to "
                "reach the proxy itself over TLS)"
            )
        if not parts.hostname:
            raise ValueError(f"{source}: the proxy URL names no host (expected http://[user:password@]host:port)")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"{source}: the proxy URL must be scheme://host:port, without a path or query")
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        port = port or (443 if parts.scheme == "https" else DEFAULT_PROXY_PORT)
        username = unquote(parts.username) if parts.username is not None else None
        password = unquote(parts.password) if parts.password is not None else None
        return cls(f"{parts.scheme}://{host}:{port}", source, username, password)

    @property
    def has_credentials(self) -> bool:
        return self.username is not None

    @property
    def display(self) -> str:
        """The proxy as logs, errors and ``check`` show it: never its password."""
        return self.url + (" (with credentials)" if self.has_credentials else "")

    def authorization(self) -> str | None:
        """The ``Proxy-Authorization`` value (Basic), or None without credentials."""
        if self.username is None:
            return None
        pair = f"{self.username}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")


def _split_host_port(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest.removeprefix(":")
        return host, int(port) if port.isdigit() else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        if port.isdigit():
            return host, int(port)
    return entry, None  # a bare IPv6 address or a host without a port


class NoProxy:
    """``NO_PROXY`` as curl reads it; ``matches(host, port)`` says whether a target goes direct."""

    def __init__(self, value: str) -> None:
        self.value = value
        self.everything = False
        self._names: list[tuple[str, int | None]] = []
        self._networks: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int | None]] = []
        for raw in value.replace(" ", ",").split(","):
            entry = raw.strip().lower()
            if not entry:
                continue
            if entry == "*":
                self.everything = True
                continue
            host, port = _split_host_port(entry)
            host = host.strip("[]")
            try:
                self._networks.append((ipaddress.ip_network(host, strict=False), port))
                continue
            except ValueError:
                pass
            name = host.lstrip(".").rstrip(".")
            if name:
                self._names.append((name, port))

    def __repr__(self) -> str:
        return f"NoProxy({self.value!r})"

    def matches(self, host: str, port: int) -> bool:
        if self.everything:
            return True
        host = host.strip("[]").lower().rstrip(".")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            address = None
        if address is not None:
            return any(address in network and want in (None, port) for network, want in self._networks)
        return any((host == name or host.endswith("." + name)) and want in (None, port) for name, want in self._names)


def target_of(url: str) -> str:
    """``host:port`` of ``url`` as messages name a target (an IPv6 literal in brackets, the scheme's default port)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{parts.port or (443 if parts.scheme == 'https' else 80)}"


@dataclass(frozen=True)
class Egress:
    """The proxies for https:// and http:// targets (None: direct) and the exemptions."""

    https: EgressProxy | None = None
    http: EgressProxy | None = None
    no_proxy: NoProxy = field(default_factory=lambda: NoProxy(""))

    @classmethod
    def resolve(cls, override: str | None, environment: ProxyEnvironment) -> Egress:
        """From ``SIDECAR_EGRESS_PROXY`` (``override``; ``none`` to ignore the environment) or the environment.
        Raises ``ValueError`` naming the variable when a proxy URL is unusable."""
        no_proxy = NoProxy(environment.no_proxy)
        if override is not None and override.strip():
            if override.strip().lower() == NO_EGRESS_PROXY:
                return cls(None, None, no_proxy)
            proxy = EgressProxy.parse(override, "SIDECAR_EGRESS_PROXY")
            return cls(proxy, proxy, no_proxy)
        https = EgressProxy.parse(environment.https_proxy, environment.https_name) if environment.https_proxy else None
        http = EgressProxy.parse(environment.http_proxy, environment.http_name) if environment.http_proxy else None
        return cls(https, http, no_proxy)

    def proxy_for(self, url: str) -> EgressProxy | None:
        """The proxy a request to ``url`` goes through, or None for a direct connection."""
        parts = urlsplit(url)
        proxy = self.https if parts.scheme == "https" else self.http
        if proxy is None:
            return None
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return None if self.no_proxy.matches(parts.hostname or "", port) else proxy

    def proxies(self) -> Iterator[EgressProxy]:
        """Each distinct proxy configured."""
        seen: set[str] = set()
        for proxy in (self.https, self.http):
            if proxy is not None and proxy.url not in seen:
                seen.add(proxy.url)
                yield proxy
