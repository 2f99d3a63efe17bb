"""An HTTPS upstream that requires a client certificate, on stdlib ``ssl`` sockets in a thread of its own.

asyncio and uvloop servers end a refused TLS handshake by closing the connection without a word; a real TLS
terminator (API Gateway's custom domains, a load balancer) sends the TLS alert that says why (certificate required,
unknown CA, expired). OpenSSL's blocking server sends it, so the sidecar is tested against what it will meet.
Every request that completes the handshake is answered 200 with the client certificate's subject.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        certificate: Any = self.connection.getpeercert()  # type: ignore[attr-defined]
        subject = dict(pair[0] for pair in certificate.get("subject", ())) if certificate else {}
        body = json.dumps({"client": subject.get("commonName")}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    refusals: list[str]

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a refused handshake is what the tests are about

    def get_request(self) -> tuple[Any, Any]:
        sock, address = self.socket.accept()
        # The handshake runs in the request's thread, so one slow or refused client holds up no other.
        return sock, address

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            request.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            self.refusals.append(getattr(exc, "reason", None) or type(exc).__name__)
            _linger(request)
            return
        super().finish_request(request, client_address)


def _linger(request: ssl.SSLSocket) -> None:
    """Close as TLS terminators do after an alert: stop writing, read what the client sent until it closes. Closing
    with the client's request unread would reset the connection, and a reset can overtake the alert."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(request, socket.SHUT_WR)
        request.settimeout(5)
        while socket.socket.recv(request, 65536):
            pass


@contextlib.contextmanager
def mtls_upstream(cert_file: Path, key_file: Path, client_ca_file: Path) -> Iterator[tuple[str, list[str]]]:
    """Serve on an ephemeral loopback port; yields the base URL and the list of refused handshakes' reasons."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(client_ca_file))
    context.load_cert_chain(cert_file, key_file)
    context.verify_mode = ssl.CERT_REQUIRED
    server = _Server(("127.0.0.1", 0), _Handler, bind_and_activate=False)
    server.refusals = []
    server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    server.server_bind()
    server.server_activate()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", server.refusals
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


__all__ = ["mtls_upstream"]
