"""A throwaway certificate authority for the emulator and the tests: a CA, server certificates for loopback names, and
client certificates for mutual TLS, as PEM files.

Certificates carry what Python 3.13's strict verification asks for (key identifiers, key usage, an extended key
usage), so they verify as a real company CA's would. Nothing here is meant for production.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# The names a loopback server answers to.
LOOPBACK_NAMES = ("127.0.0.1", "::1", "localhost")

_PEM = serialization.Encoding.PEM


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as PEM files."""

    cert_file: Path
    key_file: Path


class TestCA:
    """A CA whose certificate is ``ca_file`` in ``directory``; ``server`` and ``client`` issue certificates."""

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(self, directory: Path, name: str = "cognito-sidecar test CA") -> None:
        self.directory = directory
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.certificate = self._build(self.name, self._key.public_key(), ca=True, days=30, names=())
        self.ca_file = directory / f"{_slug(name)}.pem"
        self.ca_file.write_bytes(self.certificate.public_bytes(_PEM))

    def server(self, stem: str = "server", names: tuple[str, ...] = LOOPBACK_NAMES) -> Issued:
        """A server certificate for ``names`` (IP addresses and DNS names)."""
        return self._issue(stem, names[0], names, usage=ExtendedKeyUsageOID.SERVER_AUTH, days=30)

    def client(
        self,
        stem: str = "client",
        common_name: str = "legacy-service",
        *,
        days: float = 30,
        password: bytes | None = None,
    ) -> Issued:
        """A client certificate (mutual TLS) valid for ``days`` (negative: expired); ``password`` encrypts its key."""
        return self._issue(stem, common_name, (), usage=ExtendedKeyUsageOID.CLIENT_AUTH, days=days, password=password)

    def _issue(
        self,
        stem: str,
        common_name: str,
        names: tuple[str, ...],
        *,
        usage: x509.ObjectIdentifier,
        days: float,
        password: bytes | None = None,
    ) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        certificate = self._build(subject, key.public_key(), ca=False, days=days, names=names, usage=usage)
        cert_file, key_file = self.directory / f"{stem}.pem", self.directory / f"{stem}.key"
        cert_file.write_bytes(certificate.public_bytes(_PEM))
        encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
        key_file.write_bytes(key.private_bytes(_PEM, serialization.PrivateFormat.PKCS8, encryption))
        key_file.chmod(0o600)
        return Issued(cert_file, key_file)

    def _build(
        self,
        subject: x509.Name,
        public_key: ec.EllipticCurvePublicKey,
        *,
        ca: bool,
        days: float,
        names: tuple[str, ...],
        usage: x509.ObjectIdentifier | None = None,
    ) -> x509.Certificate:
        now = datetime.datetime.now(datetime.UTC)
        start = now - datetime.timedelta(minutes=5)
        end = now + datetime.timedelta(days=days)
        if end <= start:  # an expired certificate: valid for a while, a while ago
            start = end - datetime.timedelta(days=1)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
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
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), False)
        if usage is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return builder.sign(self._key, hashes.SHA256())


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name.lower())


__all__ = ["LOOPBACK_NAMES", "Issued", "TestCA"]
