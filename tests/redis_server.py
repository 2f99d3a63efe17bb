"""A real ``redis-server`` of the tests' own, on an ephemeral loopback port, that a test can stop, restart and empty.

The machine's own Redis on 127.0.0.1:6379 is never touched. Readiness is read from the server's log line, not
polled; nothing is kept on disk, so a restart comes back empty, as a Redis without persistence does.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

READY = "Ready to accept connections"
START_LIMIT = 20.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _self_signed(directory: Path) -> None:
    """A CA and a server certificate for 127.0.0.1 signed by it, as PEM files in ``directory``."""
    now = datetime.datetime.now(datetime.UTC)

    def certificate(
        subject: str,
        key: ec.EllipticCurvePrivateKey,
        issuer: x509.Name,
        signer: ec.EllipticCurvePrivateKey,
        *,
        ca: bool,
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=not ca,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=ca,
                    crl_sign=ca,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
            ).add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = certificate("test CA", ca_key, ca_name, ca_key, ca=True)
    server = certificate("127.0.0.1", server_key, ca_name, ca_key, ca=False)
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    (directory / "server.pem").write_bytes(server.public_bytes(pem))
    (directory / "server.key").write_bytes(
        server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


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
            _self_signed(Path(self._directory))

    @property
    def ca_file(self) -> str:
        return str(Path(self._directory) / "ca.pem")

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
            folder = Path(self._directory)
            command += [
                "--tls-cert-file", str(folder / "server.pem"),
                "--tls-key-file", str(folder / "server.key"),
                "--tls-ca-cert-file", str(folder / "ca.pem"),
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
