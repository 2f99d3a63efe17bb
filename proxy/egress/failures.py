"""What a failure on the way out means: ``describe_failure`` names each way a request can fail before it
reaches its target (the proxy refused or cannot be reached, a certificate that does not verify, a client
certificate the server refused) with a code, what happened and what to do."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from dataclasses import dataclass

from proxy.egress.route import DEFAULT_PROXY_PORT, EgressProxy

# Hosts a Cognito sidecar must reach, for the message that asks a proxy's owners to allow them.
COGNITO_HOSTS = "*.amazoncognito.com"


@dataclass(frozen=True)
class EgressFailure:
    """A failure on the way to a target, before any answer of the target's: ``code`` for ``X-Sidecar-Error`` and
    metrics, ``summary`` what happened, ``fix`` what to do."""

    code: str
    summary: str
    fix: str

    def __str__(self) -> str:
        return f"{self.summary}; {self.fix}"


# TLS alerts a server sends when it refuses the client certificate, and what each means.
_CLIENT_CERT_ALERTS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "it requires a client certificate and none was presented",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "it refused the handshake (often: a client certificate is required)",
    "TLSV1_ALERT_UNKNOWN_CA": "it does not trust the CA that issued the client certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the client certificate has expired",
    "SSLV3_ALERT_BAD_CERTIFICATE": "it refused the client certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "it refused the client certificate",
    "TLSV1_ALERT_ACCESS_DENIED": "it refused the client certificate (access denied)",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "the client certificate is revoked",
}


# Where exceptions keep the error they wrap: Python's chaining, and aiohttp's connector errors.
_WRAPPED = ("__cause__", "__context__", "os_error", "certificate_error", "_os_error", "_certificate_error")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps: causes, contexts, and the attributes client libraries keep them in."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        for attribute in (
            "__cause__",
            "__context__",
            "os_error",
            "certificate_error",
            "_os_error",
            "_certificate_error",
        ):
            inner = getattr(current, attribute, None)
            if isinstance(inner, BaseException):
                todo.append(inner)
        todo.extend(arg for arg in getattr(current, "args", ()) if isinstance(arg, BaseException))


def tls_cause(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error under ``exc``, if any: the one the ``ssl`` module raised (client libraries' own subclasses wrap
    it without its fields)."""
    found = [inner for inner in _chain(exc) if isinstance(inner, ssl.SSLError)]
    return next((inner for inner in found if type(inner).__module__ == "ssl"), found[0] if found else None)


def describe_failure(
    exc: BaseException,
    *,
    target: str,
    what: str,
    proxy: EgressProxy | None,
    proxy_status: int | None = None,
    connect_error: bool = False,
    trust_setting: str = "SIDECAR_CA_FILE",
) -> EgressFailure | None:
    """What ``exc`` (raised on the way to ``target``, a ``host:port``) means, or None when it is none of the egress
    failures (a plain refused connection, a timeout, a broken answer: the caller's own words fit those).

    ``what`` names the target for codes and messages: ``upstream`` or ``token_endpoint``. ``proxy_status`` is the
    proxy's answer to ``CONNECT`` when the client library reported one; ``connect_error``: no connection was made
    (with a proxy, the connection that failed is the one to the proxy).
    """
    if proxy is not None and proxy_status is not None:
        return proxy_refusal(proxy, proxy_status, target)
    cause = tls_cause(exc)
    if isinstance(cause, ssl.SSLCertVerificationError):
        reason = getattr(cause, "verify_message", None) or cause.reason or "certificate verify failed"
        via = f" (through the egress proxy {proxy.display}, which may inspect TLS)" if proxy is not None else ""
        return EgressFailure(
            f"{what}_tls_untrusted",
            f"the certificate {target} presented{via} does not verify: {reason}",
            f"if a company CA (a TLS-inspecting proxy or a private CA) issued it, add that CA's PEM bundle with "
            f"{trust_setting}; `cognito-sidecar check` shows who issued the certificate. Verification is never "
            "switched off",
        )
    if cause is not None and cause.reason in _CLIENT_CERT_ALERTS:
        return EgressFailure(
            f"{what}_tls_refused",
            f"{target} refused the TLS handshake: {_CLIENT_CERT_ALERTS[cause.reason]} ({cause.reason})",
            "present a client certificate the server trusts with SIDECAR_CLIENT_CERT_FILE and SIDECAR_CLIENT_KEY_FILE "
            "(per route: client_cert_file, client_key_file); `cognito-sidecar check` shows the certificate in use",
        )
    if proxy is not None and connect_error:
        return EgressFailure(
            "egress_proxy_unreachable",
            f"could not connect to the egress proxy {proxy.display} (from {proxy.source}) on the way to {target}",
            f"check the proxy's host and port in {proxy.source}, and that the proxy is up; set NO_PROXY to reach "
            "a host directly",
        )
    return None


def proxy_refusal(proxy: EgressProxy, status: int, target: str) -> EgressFailure:
    """What the proxy's refusal (its answer ``status`` to a request for ``target``) means."""
    if status in (401, 407):  # 407 is the standard answer; some proxies (tinyproxy) answer 401
        return EgressFailure(
            "egress_proxy_auth_required",
            f"the egress proxy {proxy.display} asked for credentials ({status}) to reach {target}: "
            + ("the ones in the proxy URL were refused" if proxy.has_credentials else "the proxy URL carries none"),
            f"put the proxy's user and password in the URL, in a file named by SIDECAR_EGRESS_PROXY_FILE "
            f"(http://user:password@proxy:{DEFAULT_PROXY_PORT}), never on a command line",
        )
    if status >= 500:
        return EgressFailure(
            "egress_proxy_cannot_reach",
            f"the egress proxy {proxy.display} could not reach {target} (it answered {status})",
            "the proxy's own route or DNS to that host fails: check the host name, and ask the proxy's owners "
            "whether it can reach it",
        )
    return EgressFailure(
        "egress_proxy_refused",
        f"the egress proxy {proxy.display} refused the connection to {target} ({status})",
        f"the proxy's allowlist does not include that host: ask its owners to allow {COGNITO_HOSTS} and the API's "
        "host (e.g. *.execute-api.<region>.amazonaws.com), port 443",
    )
