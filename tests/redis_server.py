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
from typing import IO

from proxy.emulator.pki import TestCA

READY = "Ready to accept connections"
START_LIMIT = 20.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """``tls``: TLS only (``rediss://``), with a certificate from a CA of its own (``ca_file``). ``options``: more
    of redis-server's arguments (a cluster node's, a replica's); ``config``: a configuration file (a Sentinel's);
    ``ready``: the log line that says it is."""

    def __init__(
        self,
        *,
        password: str | None = None,
        tls: bool = False,
        options: tuple[str, ...] = (),
        config: str | None = None,
        ready: str = READY,
    ) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("redis-server is not installed (.ci/run installs it: apt-get install redis-server)")
        self._executable = executable
        self.port = _free_port()
        self.password = password
        self.tls = tls
        self._directory = tempfile.mkdtemp(prefix="sidecar-redis-")
        self.process: subprocess.Popen[str] | None = None
        self.options = options
        self.config = config
        self.ready = ready
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
            *([self.config] if self.config else []),  # first, or redis-server takes it for an option
            *port,
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self._directory,
            "--protected-mode", "no",
        ]  # fmt: skip
        command += [option.replace("{dir}", self._directory) for option in self.options]
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
            if self.ready in line:
                # The rest of its log is read (so that a full pipe never blocks the server) for wait_for.
                self._said = threading.Condition()
                self._lines = seen
                threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True).start()
                return
        raise RuntimeError("redis-server did not start in time:\n" + "".join(seen))

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._said:
                self._lines.append(line)
                self._said.notify_all()

    def wait_for(self, text: str, limit: float = START_LIMIT) -> None:
        """Return once the server's log has a line with ``text`` (read as it comes, not polled)."""
        with self._said:
            if not self._said.wait_for(lambda: any(text in line for line in self._lines), timeout=limit):
                raise RuntimeError(f"redis-server never said {text!r}:\n" + "".join(self._lines[-20:]))

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


@contextlib.contextmanager
def redis_cluster(primaries: int = 3) -> Iterator[list[RedisServer]]:
    """A Redis Cluster of ``primaries`` nodes of the tests' own, every slot covered (``redis-cli --cluster create``
    returns once the nodes agree)."""
    options = (
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "{dir}/nodes.conf",
        "--cluster-node-timeout",
        "2000",
    )
    with contextlib.ExitStack() as stack:
        # The cluster bus on a port of its own (by default it is the data port + 10000, which may be taken or too high).
        nodes = [RedisServer(options=(*options, "--cluster-port", str(_free_port()))) for _ in range(primaries)]
        for node in nodes:
            stack.callback(node.close)
            node.start()
        created = subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{node.port}" for node in nodes), "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=START_LIMIT,
        )
        if "All 16384 slots covered" not in created.stdout:
            raise RuntimeError("redis-cli --cluster create failed:\n" + created.stdout + created.stderr)
        for node in nodes:  # every node must see the others before the cluster answers
            node.wait_for("Cluster state changed: ok")
        yield nodes


class Sentinels:
    """A primary, a replica of it and one Sentinel watching them as ``service``, all of the tests' own."""

    service = "sidecar"

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self.primary = RedisServer()
        stack.callback(self.primary.close)
        self.primary.start()
        self.replica = RedisServer(options=("--replicaof", "127.0.0.1", str(self.primary.port)))
        stack.callback(self.replica.close)
        self.replica.start()
        self._directory = tempfile.mkdtemp(prefix="sidecar-sentinel-")
        stack.callback(shutil.rmtree, self._directory, True)
        config = Path(self._directory) / "sentinel.conf"
        config.write_text(
            f"sentinel monitor {self.service} 127.0.0.1 {self.primary.port} 1\n"
            f"sentinel down-after-milliseconds {self.service} 1000\n"
            f"sentinel failover-timeout {self.service} 5000\n"
        )
        self.sentinel = RedisServer(config=str(config), options=("--sentinel",), ready="+monitor master")
        stack.callback(self.sentinel.close)
        self.sentinel.start()

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel.port}/{self.service}/0"


@contextlib.contextmanager
def redis_sentinels() -> Iterator[Sentinels]:
    with contextlib.ExitStack() as stack:
        yield Sentinels(stack)


__all__ = ["RedisServer", "Sentinels", "redis_cluster", "redis_sentinels", "redis_server"]
