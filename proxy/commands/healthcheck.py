"""``cognito-sidecar healthcheck``: one GET to the running sidecar's ``/-/readyz``, for container healthchecks.

Standard library only and imported before anything else (see ``proxy.entry``), so a probe costs a bare
interpreter start (~20 ms, ~10 MiB) rather than the whole sidecar's imports. It follows
``SIDECAR_LISTEN`` (a wildcard address is probed on loopback; ``unix:/path`` through the socket), so the
image's HEALTHCHECK stays right whatever address the sidecar listens on. ``--url`` probes any other
http:// URL (the emulator's container uses it).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence
from urllib.parse import urlsplit

from proxy.listen import parse_listen

DEFAULT_LISTEN = "127.0.0.1:8080"
# Docker's default healthcheck timeout is 30 s, Kubernetes' probe timeout 1 s: answer well inside both.
PROBE_TIMEOUT = 2.0

Address = str | tuple[str, int]


def probe_target(listen: str) -> tuple[int, Address, str]:
    """(address family, address, Host header) for a ``SIDECAR_LISTEN`` value."""
    if listen.startswith("unix:"):
        return socket.AF_UNIX, listen.removeprefix("unix:"), "localhost"
    try:
        host, port = parse_listen(listen)
    except ValueError as exc:
        raise ValueError(f"SIDECAR_LISTEN={listen!r} {exc}") from None
    if ":" in host:
        return socket.AF_INET6, ("::1" if host == "::" else host, port), "localhost"
    return socket.AF_INET, ("127.0.0.1" if host == "0.0.0.0" else host, port), "localhost"


def probe(family: int, address: Address, host: str, path: str, timeout: float = PROBE_TIMEOUT) -> tuple[int, str]:
    """One ``GET path``; the status and the first line of the body (the reason when not ready)."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[1].isdigit():
        raise OSError("the answer is not HTTP")
    return int(status_line[1]), body.decode("utf-8", "replace").strip()[:300]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cognito-sidecar healthcheck",
        description="Exit 0 when the sidecar (at SIDECAR_LISTEN) answers /-/readyz with 200, else 1.",
    )
    parser.add_argument("--live", action="store_true", help="probe /-/healthz (the process runs) instead of readyz")
    parser.add_argument("--url", default=None, help="probe this http:// URL instead (e.g. the emulator's JWKS)")
    args = parser.parse_args(argv)
    try:
        if args.url:
            parts = urlsplit(args.url)
            if parts.scheme != "http" or not parts.hostname:
                raise ValueError(f"--url {args.url!r} must be an http:// URL")
            family = socket.AF_INET6 if ":" in parts.hostname else socket.AF_INET
            target: tuple[int, Address, str] = (family, (parts.hostname, parts.port or 80), parts.netloc)
            path = parts.path or "/"
        else:
            target = probe_target(os.environ.get("SIDECAR_LISTEN", DEFAULT_LISTEN))
            path = "/-/healthz" if args.live else "/-/readyz"
        status, reason = probe(*target, path)
    except (OSError, ValueError) as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: HTTP {status} {reason}", file=sys.stderr)
        return 1
    return 0


__all__ = ["main", "probe", "probe_target"]
