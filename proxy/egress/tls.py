"""TLS on the way out: whom to trust (the default store plus ``SIDECAR_CA_FILE``) and which client certificate to
present (mutual TLS), re-read when the files change.

``TlsFiles`` names the files; ``TlsContext`` holds the ``ssl.SSLContext`` built from them. ``reload`` builds a new
context from the files as they are now and swaps it in only when that works: a certificate renewed while its key is
still being written (a pair that does not match) is refused with a warning, and the pair in use stays. Connections
already open keep the context they were made with; new ones take the new context. Verification is never switched
off.

``default_context`` is the one context of every client with no files of its own (the token endpoints' and the
upstreams'): OpenSSL 3 parses the whole system bundle for each context it loads it into, about 235 million
instructions (50 ms here, a tenth of the sidecar's start) and 1-2 MiB each. ``bundle_deferred`` keeps aiohttp's own
two import-time contexts from loading it too; the sidecar never uses them.

Imports nothing from the package but the error tree.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from proxy.errors import ConfigError

if TYPE_CHECKING:
    from cryptography import x509

log = logging.getLogger("proxy.tls")

# `check` warns when the client certificate expires within this many days: cert-manager renews at two thirds of a
# 90-day life (30 days left), so 14 days left means renewal has failed for two weeks.
EXPIRY_WARNING_DAYS = 14


# How the top-level settings name the files (a route's messages name its own keys).
TOP_LEVEL_NAMES = ("SIDECAR_CA_FILE", "SIDECAR_CLIENT_CERT_FILE", "SIDECAR_CLIENT_KEY_FILE")


@dataclass(frozen=True)
class TlsFiles:
    """The files of one TLS configuration; ``key_password`` decrypts an encrypted key (never shown)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    key_password: str | None = field(default=None, repr=False)
    # Settings names for messages (the route's keys, or the top-level variables).
    names: tuple[str, str, str] = field(default=TOP_LEVEL_NAMES, compare=False)

    @property
    def custom(self) -> bool:
        """Whether anything differs from the default trust store and no client certificate."""
        return self.ca_file is not None or self.cert_file is not None

    def paths(self) -> tuple[Path, ...]:
        return tuple(path for path in (self.ca_file, self.cert_file, self.key_file) if path is not None)


@dataclass(frozen=True)
class CertificateInfo:
    """What a person needs to know of a certificate: who it names, who issued it, when it ends."""

    subject: str
    issuer: str
    not_after: datetime.datetime

    @classmethod
    def of(cls, certificate: x509.Certificate) -> CertificateInfo:
        return cls(
            certificate.subject.rfc4514_string(),
            certificate.issuer.rfc4514_string(),
            certificate.not_valid_after_utc,
        )

    @classmethod
    def from_der(cls, der: bytes) -> CertificateInfo:
        from cryptography import x509  # only with a client certificate or `check`: 10 MiB a process otherwise

        return cls.of(x509.load_der_x509_certificate(der))

    @property
    def expires_at(self) -> float:
        """The end of validity as a Unix time."""
        return self.not_after.timestamp()

    def days_left(self, now: float) -> float:
        return (self.expires_at - now) / 86400

    def describe(self, now: float) -> str:
        return (
            f"subject {self.subject}, issuer {self.issuer}, expires {self.not_after:%Y-%m-%d %H:%M} UTC "
            f"({self.days_left(now):.0f} days left)"
        )


@functools.cache
def default_context() -> ssl.SSLContext:
    """The default trust store's client context, built once per process and shared by every client that names no TLS
    files (a context's settings are fixed once built; its connections are its own)."""
    return ssl.create_default_context()


@contextlib.contextmanager
def bundle_deferred() -> Iterator[None]:
    """Around the import of aiohttp, which builds two default contexts as it is imported: OpenSSL's default CA file
    (``SSL_CERT_FILE``) names an empty file meanwhile, so they skip parsing the bundle. They still look certificates
    up in the default directory, as every context does; the sidecar passes its own context to every TLS connection
    anyway (``default_context``, or a ``TlsContext``). The variable is as it was afterwards, for every context the
    sidecar builds."""
    saved = os.environ.get("SSL_CERT_FILE")
    os.environ["SSL_CERT_FILE"] = os.devnull
    try:
        yield
    finally:
        if saved is None:
            del os.environ["SSL_CERT_FILE"]
        else:
            os.environ["SSL_CERT_FILE"] = saved


def build_context(files: TlsFiles) -> tuple[ssl.SSLContext, CertificateInfo | None]:
    """A client context: the default trust store, plus ``files.ca_file``, presenting ``files``'s client certificate.
    Raises ``ConfigError`` naming the setting whose file cannot be used."""
    ca_name, cert_name, key_name = files.names
    context = ssl.create_default_context()
    if files.ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(files.ca_file))
        except FileNotFoundError:
            raise ConfigError([f"{ca_name}: file {files.ca_file} does not exist"]) from None
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigError(
                [f"{ca_name}: {files.ca_file} holds no usable certificate ({_reason(exc)}); it must be a PEM bundle"]
            ) from None
    info = None
    if files.cert_file is not None:
        if files.key_file is None:
            raise ConfigError([f"{key_name}: is required with {cert_name} (the client certificate's private key)"])
        try:
            context.load_cert_chain(str(files.cert_file), str(files.key_file), password=files.key_password)
        except FileNotFoundError as exc:
            raise ConfigError([f"{cert_name}/{key_name}: file {exc.filename or ''} does not exist"]) from None
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigError(
                [
                    f"{cert_name}/{key_name}: the client certificate {files.cert_file} and key {files.key_file} "
                    f"cannot be used together ({_reason(exc)}): they must be PEM files of one pair, and an "
                    "encrypted key needs SIDECAR_CLIENT_KEY_PASSWORD_FILE"
                ]
            ) from None
        info = certificate_info(files.cert_file)
    elif files.key_file is not None:
        raise ConfigError([f"{cert_name}: is required with {key_name}"])
    return context, info


def certificate_info(path: Path) -> CertificateInfo:
    """The first certificate in a PEM file (the leaf)."""
    from cryptography import x509  # only with a client certificate or `check`: 10 MiB a process otherwise

    try:
        return CertificateInfo.of(x509.load_pem_x509_certificate(path.read_bytes()))
    except (OSError, ValueError) as exc:
        raise ConfigError([f"{path}: not a PEM certificate ({_reason(exc)})"]) from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.replace("_", " ").lower()
    return str(exc) or type(exc).__name__


class TlsContext:
    """The current client context of one TLS configuration; ``reload`` re-reads its files."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self.context, self.certificate = build_context(files)
        self.reloads = 0  # contexts swapped in after the first
        self.refused = 0  # re-reads that could not be used (the old context stayed)

    def __repr__(self) -> str:
        return f"TlsContext({self.files!r})"

    def reload(self) -> bool:
        """Build a context from the files as they are now; True when it was swapped in. A failure keeps the
        current context and logs why (a renewal half written: the next change of the files tries again)."""
        try:
            context, certificate = build_context(self.files)
        except ConfigError as exc:
            self.refused += 1
            log.warning(
                "TLS files changed but cannot be used; the current ones stay in use: %s",
                "; ".join(exc.problems),
            )
            return False
        self.context, self.certificate = context, certificate
        self.reloads += 1
        if certificate is not None:
            now = datetime.datetime.now(datetime.UTC).timestamp()
            log.info("client certificate re-read: %s", certificate.describe(now))
        else:
            log.info("trusted CA file re-read")
        return True


__all__ = [
    "EXPIRY_WARNING_DAYS",
    "TOP_LEVEL_NAMES",
    "CertificateInfo",
    "TlsContext",
    "TlsFiles",
    "build_context",
    "bundle_deferred",
    "certificate_info",
    "default_context",
]
