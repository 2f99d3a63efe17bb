"""``worker_listeners``: with ``SIDECAR_WORKERS``, a TCP listener becomes one socket per worker on one address (each
worker accepts from its own queue), and a Unix socket stays one queue for all."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from proxy.server.serving import ListenError, bind, bind_unix, worker_listeners


def test_a_tcp_listener_becomes_one_socket_per_worker_on_the_same_port() -> None:
    first = bind("127.0.0.1", 0, reuse_port=True)
    listeners = worker_listeners(first, 3)
    try:
        assert listeners[0] is first
        assert len({sock.fileno() for sock in listeners}) == 3
        assert {sock.getsockname() for sock in listeners} == {first.getsockname()}
        assert all(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1 for sock in listeners)
        # Every connection lands in one of the queues, whichever: none is refused or lost.
        port = first.getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(30)]
        accepted = 0
        for sock in listeners:
            sock.setblocking(False)
            while True:
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    break
                conn.close()
                accepted += 1
        assert accepted == 30
        for client in clients:
            client.close()
    finally:
        for sock in listeners:
            sock.close()


def test_one_worker_or_a_unix_socket_keeps_one_queue(tmp_path: Path) -> None:
    unix = bind_unix(str(tmp_path / "sidecar.sock"), 0o600)
    tcp = bind("127.0.0.1", 0)
    try:
        assert worker_listeners(unix, 3) == [unix, unix, unix]
        assert worker_listeners(tcp, 1) == [tcp]
        assert tcp.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0  # nobody else may join a lone listener
    finally:
        unix.close()
        tcp.close()


def test_workers_never_share_a_port_with_something_already_listening_there() -> None:
    # SO_REUSEPORT would let the workers' sockets join another process's group on the same port (a sidecar left
    # running there, sharing its requests without a word): the first one must find the port free, as a plain bind.
    for theirs in (bind("127.0.0.1", 0), bind("127.0.0.1", 0, reuse_port=True)):
        port = theirs.getsockname()[1]
        try:
            with pytest.raises(ListenError, match="address already in use"):
                bind("127.0.0.1", port, reuse_port=True)
        finally:
            theirs.close()
