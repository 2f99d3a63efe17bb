"""A real ``redis-server`` of the tests' own, on an ephemeral loopback port, that a test can stop, restart and empty.

The machine's own Redis on 127.0.0.1:6379 is never touched. Readiness is read from the server's log line, not
polled; nothing is kept on disk, so a restart comes back empty, as a Redis without persistence does.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from proxy.emulator.pki import TestCA

READY = "Ready to accept connections"
START_LIMIT = 20.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """``tls``: TLS only (``rediss://``), with a certificate from a CA of its own (``ca_file``)."""

    def __init__(self, *, password: str | None = None, tls: bool = False) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("redis-server is not installed (.ci/run installs it: apt-get install redis-server)")
        self._executable = executable
        self.port = _free_port()
        self.password = password
        self.tls = tls
        self._directory = tempfile.mkdtemp(prefix="sidecar-redis-")
        self.process: subprocess.Popen[str] | None = None
        if tls:
            authority = TestCA(Path(self._directory))
            self._certificate = authority.server(names=("127.0.0.1",))
            self._ca_file = authority.ca_file

    @property
    def ca_file(self) -> str:
        return str(self._ca_file)

    @property
    def url(self) -> str:
        if self.tls:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.ca_file}"
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (or restart, empty) on the same port; returns once the server says it accepts connections."""
        port = ["--port", "0", "--tls-port", str(self.port)] if self.tls else ["--port", str(self.port)]
        command = [
            self._executable,
            *port,
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self._directory,
            "--protected-mode", "no",
        ]  # fmt: skip
        if self.password:
            command += ["--requirepass", self.password]
        if self.tls:
            command += [
                "--tls-cert-file", str(self._certificate.cert_file),
                "--tls-key-file", str(self._certificate.key_file),
                "--tls-ca-cert-file", self.ca_file,
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + START_LIMIT
        seen = []
        assert self.process.stdout is not None
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError("redis-server exited at start:\n" + "".join(seen))
            seen.append(line)
            if READY in line:
                # The rest of its log is read and dropped, so that a full pipe never blocks the server.
                threading.Thread(target=self.process.stdout.read, daemon=True).start()
                return
        raise RuntimeError("redis-server did not start in time:\n" + "".join(seen))

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)  # as a crash: no save, nothing said
            self.process.wait(timeout=10)
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()
        self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._directory, ignore_errors=True)


@contextlib.contextmanager
def redis_server(*, password: str | None = None, tls: bool = False) -> Iterator[RedisServer]:
    server = RedisServer(password=password, tls=tls)
    try:
        server.start()
        yield server
    finally:
        server.close()


__all__ = ["RedisServer", "redis_server"]
