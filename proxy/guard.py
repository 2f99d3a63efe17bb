"""Who may use the credential: the checks a request passes before the sidecar does anything for it.

The sidecar turns any request that reaches it into one carrying a credential, so it answers only callers it
is meant for (``CallerGuard.check``, first thing for every HTTP request):

- ``Host`` must name the sidecar: an IP literal, ``localhost``, or a name in ``SIDECAR_ALLOWED_HOSTS`` (a
  compose service's name included). A DNS-rebinding page reaches the sidecar under a name the attacker
  controls: a dotted domain, or a single label answered by LLMNR/NBNS poisoning or a shared AD DNS zone, so
  that Host is refused with 421.
- A browser says where a request comes from: an ``Origin`` not in ``SIDECAR_ALLOWED_ORIGINS``, or
  ``Sec-Fetch-Site: cross-site``/``same-site`` without a listed Origin, is refused with 403. curl and
  services send neither header.
- On a non-loopback listener, the peer address must be in ``SIDECAR_ALLOW_FROM`` (403).
- TRACE (echoes the token back) and CONNECT (a tunnel) are refused with 405.
- With ``SIDECAR_CALLER_TOKEN`` set, a forwarded request must carry it in ``X-Sidecar-Caller`` (compared in
  constant time, never forwarded), else 401.

Pure over the ASGI scope; no I/O. Answers of the same Host or address are cached (bounded).
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from collections.abc import Callable, Sequence
from typing import TypeVar

from proxy.errors import CLOSE, Refusal
from proxy.listen import in_networks, peer_ip
from proxy.secrets import Secret
from proxy.types import Scope

# Requests the sidecar never forwards: TRACE echoes the request (token included) back to the client, and
# CONNECT would turn the sidecar into a tunnel.
FORBIDDEN_METHODS = frozenset({"TRACE", "CONNECT"})

CALLER_HEADER = b"x-sidecar-caller"
# Distinct Host values and peer addresses remembered with their answer; a client cycling through more only
# costs the check again.
_CACHE_LIMIT = 512
K = TypeVar("K", bytes, str)
_LABEL = re.compile(rb"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")


_METHOD_REFUSED = Refusal(
    405,
    "method_not_allowed",
    "TRACE and CONNECT are never forwarded (TRACE would echo the token back, CONNECT would open a tunnel)",
    CLOSE,  # after a CONNECT head the parser reads nothing more from the connection
)
_NO_CALLER = Refusal(
    401,
    "caller_unauthenticated",
    "this sidecar wants the caller token in the X-Sidecar-Caller header (SIDECAR_CALLER_TOKEN)",
    CLOSE,  # every refusal of the caller ends its connection: a refused caller holds no client slot
)


def host_name(value: bytes) -> bytes:
    """The name in a Host header value, lower-cased, without the port (``[::1]:8080`` -> ``::1``)."""
    value = value.strip().lower()
    if value.startswith(b"["):
        return value[1 : value.find(b"]")] if b"]" in value else value
    name, _, _ = value.partition(b":")
    return name


def _is_ip(name: bytes) -> bool:
    try:
        ipaddress.ip_address(name.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        return False
    return True


def host_allowed(name: bytes, allowed: Sequence[str]) -> bool:
    """IP literals, ``localhost``, and the ``allowed`` names (exact, or ``*.suffix``)."""
    if _is_ip(name) or name == b"localhost":
        return True
    text = name.decode("ascii", "replace")
    return any(text == entry or (entry.startswith("*.") and text.endswith(entry[1:])) for entry in allowed)


def _host_refused(name: bytes) -> Refusal:
    shown = name.decode("ascii", "replace")[:100]
    fix = "call it by IP or localhost, or list the name in SIDECAR_ALLOWED_HOSTS"
    if _LABEL.fullmatch(name):
        # A compose stack meets this first: say the one-line change.
        fix = (
            f"a single-label name (a compose service) must be listed too: SIDECAR_ALLOWED_HOSTS={shown} in the "
            "sidecar's environment, or call it by IP or localhost"
        )
    return Refusal(
        421,
        "host_not_allowed",
        f"Host {shown!r} is not this sidecar's name; a browser page may be trying to reach it through DNS "
        f"rebinding. Fix: {fix}",
        CLOSE,
    )


class CallerGuard:
    """The checks above, configured once. ``allow_from`` is None when the listener is loopback-only or a Unix
    socket (the address then says nothing more). ``caller_token`` is what callers must present (re-read on SIGHUP)."""

    def __init__(
        self,
        *,
        allowed_hosts: Sequence[str] = (),
        allowed_origins: Sequence[str] = (),
        allow_from: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] | None = None,
        caller_token: Secret | None = None,
    ) -> None:
        self._allowed_hosts = tuple(allowed_hosts)
        self._origins = frozenset(origin.encode() for origin in allowed_origins)
        self._allow_from = tuple(allow_from) if allow_from is not None else None
        self.caller_token = caller_token
        self._hosts: dict[bytes, bool] = {}
        self._peers: dict[str, bool] = {}

    def check(self, scope: Scope) -> Refusal | None:
        """Host, browser origin, peer address and method: None when the request may go on."""
        if scope["method"] in FORBIDDEN_METHODS:
            return _METHOD_REFUSED
        host = origin = fetch_site = None
        for name, value in scope["headers"]:
            if name == b"host":
                host = value
            elif name == b"origin":
                origin = value
            elif name == b"sec-fetch-site":
                fetch_site = value
        # The cache hit inline: this runs for every request, and a call costs more than the look-up.
        if host is not None and not (self._hosts.get(host) or self._host_ok(host)):
            return _host_refused(host_name(host))
        if origin is not None and origin.strip().lower() not in self._origins:
            shown = origin.decode("ascii", "replace")[:100]
            return Refusal(
                403,
                "origin_not_allowed",
                f"requests from web pages are refused (Origin {shown!r}); list trusted origins in "
                "SIDECAR_ALLOWED_ORIGINS",
                CLOSE,
            )
        if fetch_site in (b"cross-site", b"same-site") and origin is None:
            return Refusal(
                403,
                "origin_not_allowed",
                "a browser sent this request from another site (Sec-Fetch-Site); list trusted origins in "
                "SIDECAR_ALLOWED_ORIGINS",
                CLOSE,
            )
        if self._allow_from is not None:
            client = scope.get("client")
            if client and not (self._peers.get(client[0]) or self._peer_ok(client[0])):
                return Refusal(
                    403,
                    "client_not_allowed",
                    f"{client[0]} is not in SIDECAR_ALLOW_FROM; add its network there to let it use the sidecar",
                    CLOSE,
                )
        return None

    def check_caller(self, scope: Scope) -> Refusal | None:
        """The caller token, for a request about to be forwarded: None when it is not required or is right."""
        expected = self.caller_token
        if expected is None:
            return None
        given = next((value for name, value in scope["headers"] if name == CALLER_HEADER), None)
        if given is None or not hmac.compare_digest(given, expected.value.encode()):
            return _NO_CALLER
        return None

    def trusted(self, scope: Scope) -> bool:
        """Whether the caller may see details (file paths, other processes, the token endpoint's words, the route
        prefixes): a peer on this machine (loopback or a Unix socket), or one presenting the caller token."""
        client = scope.get("client")
        if not client or not client[0] or ((ip := peer_ip(client[0])) is not None and ip.is_loopback):
            return True
        return self.caller_token is not None and self.check_caller(scope) is None

    def _host_ok(self, host: bytes) -> bool:
        return _remembered(self._hosts, host, lambda: host_allowed(host_name(host), self._allowed_hosts))

    def _peer_ok(self, address: str) -> bool:
        return _remembered(self._peers, address, lambda: in_networks(address, self._allow_from or ()))


def _remembered(cache: dict[K, bool], key: K, answer: Callable[[], bool]) -> bool:
    """``cache[key]``, computed by ``answer`` the first time; the cache is emptied when it reaches its limit."""
    known = cache.get(key)
    if known is None:
        known = answer()
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()
        cache[key] = known
    return known


__all__ = ["CALLER_HEADER", "CallerGuard", "host_allowed", "host_name"]
