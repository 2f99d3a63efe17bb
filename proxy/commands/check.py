"""``cognito-sidecar check``: a doctor for the configuration, as a short pass/fail list.

Validates the settings, checks that the token endpoint's host resolves and answers, performs a real
refresh, shows the token's claims (never the token), warns when the token kind does not fit how API
Gateway will read it, and with ``--path`` sends one request upstream and explains a 401/403.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal
from urllib.parse import urlsplit

import httpx2

from proxy.egress.failures import describe_failure
from proxy.egress.route import EgressProxy, target_of, unresolved
from proxy.egress.tls import EXPIRY_WARNING_DAYS, CertificateInfo, TlsContext
from proxy.egress.transport import proxy_status, token_client
from proxy.errors import EXIT_CONFIG, EXIT_FAILURE, ConfigError, EgressError, TokenEndpointError, TokenError
from proxy.secrets import secret_file_warnings
from proxy.settings import RouteSettings, Settings, load_settings
from proxy.tokens.build import one_shot, token_http
from proxy.tokens.fleet import SharedRefresh
from proxy.tokens.token import Token

Status = Literal["PASS", "WARN", "FAIL"]

# Answers of API Gateway and what they most often mean.
GATEWAY_HINTS = {
    "Unauthorized": "the authorizer refused the token: check that the authorizer's user pool and app client match "
    "SIDECAR_CLIENT_ID, that the header is the one the authorizer reads (SIDECAR_HEADER), and the token kind "
    "(SIDECAR_TOKEN: methods with OAuth scopes need an access token)",
    "The incoming token has expired": "the token expired before it arrived: check this machine's clock",
    "Missing Authentication Token": "no such resource or method: usually a wrong stage or path in "
    "SIDECAR_UPSTREAM_URL or --path (the stage belongs in the URL, e.g. .../prod)",
    "Forbidden": "an API key is required or wrong (SIDECAR_API_KEY), or a resource policy denies this caller",
}


# The title of a finding about the settings themselves: ``check`` then exits 2, as every command does.
CONFIGURATION = "setting"


@dataclass(frozen=True)
class Finding:
    status: Status
    title: str
    detail: str = ""

    def render(self) -> str:
        return f"{self.status}  {self.title}" + (f"\n      {self.detail}" if self.detail else "")


def format_epoch(epoch: object) -> str:
    """A claim's epoch seconds as UTC time and how far away it is."""
    if not isinstance(epoch, int | float):
        return "?"
    moment = datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    delta = epoch - time.time()
    relative = f"in {delta / 60:.0f} min" if delta >= 0 else f"{-delta / 60:.0f} min ago"
    return f"{moment} ({relative})"


def describe_token(token: Token) -> str:
    claims = token.claims
    parts = [f"token_use={claims.get('token_use', '?')}", f"iss={claims.get('iss', '?')}"]
    if "aud" in claims:
        parts.append(f"aud={claims['aud']}")
    if "client_id" in claims:
        parts.append(f"client_id={claims['client_id']}")
    if "scope" in claims:
        parts.append(f"scope={claims['scope']!r}")
    parts.append(f"exp={format_epoch(claims.get('exp'))}")
    parts.append(f"auth_time={format_epoch(claims.get('auth_time'))}")
    return ", ".join(parts)


def store_finding(shared: SharedRefresh) -> Finding:
    """What the check saw of the shared token store."""
    if shared.problem is not None:
        return Finding("WARN", f"the token store {shared.store.name} is out of reach", shared.problem)
    if shared.key_check.problem is not None:
        return Finding("FAIL", "another store key is in use for this credential", shared.key_check.problem)
    how = (
        "the token came from it (another sidecar refreshed it)"
        if shared.adopted
        else "this check refreshed under its lease and stored the answer for the others"
    )
    return Finding("PASS", f"the token store {shared.store.name} answers", how)


def rotation_advice(settings: Settings, *, shared: bool = False) -> Finding:
    """Cognito rotates the refresh token: say what rotation needs."""
    if shared:
        return Finding(
            "PASS",
            "Cognito rotates this app client's refresh tokens; the token store keeps the newest",
            "with Redis, run it with persistence (appendonly): the store holds the only copy of the current "
            "refresh token. Set the app client's grace period (RetryGracePeriodSeconds) above the store's lease "
            "(SIDECAR_TOKEN_STORE_LEASE) plus one refresh.",
        )
    where = (
        f"the new one is in {settings.refresh_token_file}"
        if settings.refresh_token_file
        else "the new one was NOT saved (the old one came from SIDECAR_REFRESH_TOKEN, not a file): "
        "use SIDECAR_REFRESH_TOKEN_FILE, or the next start fails with invalid_grant once the old one expires"
    )
    return Finding(
        "WARN",
        "Cognito rotates this app client's refresh tokens",
        f"{where}. A crash between Cognito's answer and the file write loses the new token, so set the app "
        "client's grace period (RetryGracePeriodSeconds) above the sidecar's restart time: the old token then "
        "still works on restart. Run one sidecar per refresh token file.",
    )


def kind_advice(settings: Settings, token: Token) -> Finding:
    use = token.claims.get("token_use")
    if use == "id":
        return Finding(
            "PASS" if settings.header.lower() == "authorization" else "WARN",
            "an id token suits a REST API Cognito authorizer on methods without OAuth scopes",
            "an id token carries no scopes: if the method requires scopes, set SIDECAR_TOKEN=access_token",
        )
    scopes = str(token.claims.get("scope", "")).split()
    custom = [scope for scope in scopes if "/" in scope]
    if not custom:
        return Finding(
            "WARN",
            "the access token carries no custom scope",
            f"scopes: {' '.join(scopes) or 'none'}. A method with an authorizer and OAuth scopes accepts an access "
            "token only with one of its scopes (e.g. api/read); without scopes on the method, send the id token",
        )
    return Finding("PASS", f"the access token carries scopes {' '.join(custom)}")


def egress_findings(settings: Settings) -> list[Finding]:
    """How the token endpoint and each upstream are reached: directly or through which proxy (never its password)."""
    egress = settings.egress
    targets = [("the token endpoint", settings.token_url)]
    targets += [(f"the upstream of route {route.prefix}", route.upstream_url) for route in settings.effective_routes()]
    findings: list[Finding] = []
    for name, url in targets:
        proxy = egress.proxy_for(url)
        how = f"through the egress proxy {proxy.display} (from {proxy.source})" if proxy else "directly (no proxy)"
        findings.append(Finding("PASS", f"{name} {urlsplit(url).netloc} is reached {how}"))
    return findings


def tls_findings(settings: Settings, now: float) -> list[Finding]:
    """Each route's trusted CA file and client certificate: readable, a matching pair, and how long it has left."""
    findings: list[Finding] = []
    seen: set[object] = set()
    for route in settings.effective_routes():
        files = route.tls_files()
        if not files.custom or files in seen:
            continue
        seen.add(files)
        try:
            context = TlsContext(files)
        except ConfigError as exc:
            findings.extend(Finding("FAIL", "a TLS file cannot be used", problem) for problem in exc.problems)
            continue
        if files.ca_file is not None:
            findings.append(Finding("PASS", f"the CA file {files.ca_file} is trusted besides the default store"))
        info = context.certificate
        if info is not None:
            findings.append(certificate_finding(info, now, route))
    return findings


def certificate_finding(info: CertificateInfo, now: float, route: RouteSettings) -> Finding:
    days = info.days_left(now)
    title = f"the client certificate for route {route.prefix}"
    if days <= 0:
        return Finding("FAIL", f"{title} has expired", info.describe(now) + ": renew it (the upstream refuses it)")
    if days < EXPIRY_WARNING_DAYS:
        return Finding(
            "WARN",
            f"{title} expires in {days:.0f} days",
            info.describe(now) + ": renew it (with cert-manager, check the Certificate's status); the sidecar "
            "takes up the renewed files without a restart",
        )
    return Finding("PASS", f"{title} is valid", info.describe(now))


async def presented_certificate(url: str, proxy: EgressProxy | None, *, limit: float) -> CertificateInfo | None:
    """The certificate the server at ``url`` presents (through ``proxy`` when one is in the way), read without
    verifying it and with nothing sent after the handshake: to tell a person who issued it. None when it cannot be
    had."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 443
    try:
        async with asyncio.timeout(limit):
            if proxy is not None:
                proxy_parts = urlsplit(proxy.url)
                reader, writer = await asyncio.open_connection(proxy_parts.hostname, proxy_parts.port)
                target = target_of(url)
                authorization = proxy.authorization()
                head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
                head += f"Proxy-Authorization: {authorization}\r\n" if authorization else ""
                writer.write((head + "\r\n").encode())
                answer = await reader.readuntil(b"\r\n\r\n")
                if answer.split(b" ", 2)[1:2] != [b"200"]:
                    writer.close()
                    return None
            else:
                reader, writer = await asyncio.open_connection(host, port)
            # Only to read the certificate for the person: never used to send anything.
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            await writer.start_tls(context, server_hostname=host)
            ssl_object = writer.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            writer.close()
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return None
    return CertificateInfo.from_der(der) if der else None


async def _untrusted_finding(url: str, proxy: EgressProxy | None, limit: float, setting: str) -> Finding:
    info = await presented_certificate(url, proxy, limit=limit)
    host = urlsplit(url).netloc
    if info is None:
        return Finding("WARN", f"the certificate {host} presented could not be read for a closer look")
    return Finding(
        "FAIL",
        f"{host} presented a certificate issued by {info.issuer}, which this machine does not trust",
        f"subject {info.subject}. If that issuer is your company's CA (a TLS-inspecting proxy re-signs every "
        f"certificate with it), put its CA certificate (PEM) in a file and set {setting} to it.",
    )


async def _reachable(url: str) -> Finding:
    host = urlsplit(url).hostname or ""
    reason = await unresolved(url)
    if reason is not None:
        return Finding("FAIL", f"the token endpoint's host {host} does not resolve", reason)
    return Finding("PASS", f"the token endpoint's host {host} resolves")


async def run_checks(env: Mapping[str, str], *, path: str | None) -> list[Finding]:
    findings: list[Finding] = []
    try:
        settings = load_settings(env, purpose="serve" if path else "token")
    except ConfigError as exc:
        findings.extend(Finding("FAIL", CONFIGURATION, problem) for problem in exc.problems)
        return findings
    findings.append(Finding("PASS", "settings are valid", f"token endpoint {settings.token_url}"))
    findings.extend(Finding("WARN", "a secret file is open to other users", w) for w in secret_file_warnings(settings))
    try:
        findings.extend(egress_findings(settings))
    except ConfigError as exc:
        findings.extend(Finding("FAIL", CONFIGURATION, problem) for problem in exc.problems)
        return findings
    tls = tls_findings(settings, time.time())
    findings.extend(tls)
    token_proxy = settings.egress.proxy_for(settings.token_url)
    if token_proxy is None:  # through a proxy, the proxy resolves the name
        findings.append(await _reachable(settings.token_url))
        if findings[-1].status == "FAIL":
            return findings
    flow = settings.grant.replace("_token", "")  # refresh, client_credentials
    async with token_http(settings) as http:
        try:
            # Through the token store when the fleet shares one: a refresh outside it would rotate the shared
            # refresh token out from under the other sidecars.
            async with one_shot(settings, http, {settings.token}) as provider:
                token = (await provider.get())[settings.token]
        except TokenEndpointError as exc:
            reached = exc.status is not None
            if reached:
                findings.append(Finding("PASS", "the token endpoint answers HTTP"))
            findings.append(Finding("FAIL", f"a real {flow} failed ({exc.code})", str(exc)))
            if isinstance(exc, EgressError) and exc.code.endswith("_tls_untrusted"):
                timeout = settings.connect_timeout
                findings.append(await _untrusted_finding(settings.token_url, token_proxy, timeout, "SIDECAR_CA_FILE"))
            return findings
        except TokenError as exc:
            findings.append(Finding("FAIL", f"a real {flow} gave no usable token", str(exc)))
            return findings
        if provider.shared is not None:
            findings.append(store_finding(provider.shared))
        findings.append(Finding("PASS", f"a real {flow} worked: {settings.token}", describe_token(token)))
        findings.append(kind_advice(settings, token))
        if provider.grant.rotations or (provider.shared is not None and provider.shared.rotates):
            findings.append(rotation_advice(settings, shared=provider.shared is not None))
    if path is not None and settings.upstream_url and not any(f.status == "FAIL" for f in tls):
        files = settings.tls_files()
        upstream_tls = TlsContext(files) if files.custom else None
        async with token_client(settings.egress, upstream_tls, timeout=settings.read_timeout) as upstream:
            findings.extend(await _probe(upstream, settings, token, path))
    return findings


async def _probe(http: httpx2.AsyncClient, settings: Settings, token: Token, path: str) -> list[Finding]:
    url = (settings.upstream_url or "").rstrip("/") + "/" + path.lstrip("/")
    headers = {settings.header: settings.header_prefix + token.value}
    if settings.api_key:
        headers["x-api-key"] = settings.api_key.get_secret_value()
    if settings.api_id:
        headers["x-apigw-api-id"] = settings.api_id
    try:
        response = await http.get(url, headers=headers, timeout=settings.read_timeout)
    except httpx2.HTTPError as exc:
        proxy = settings.egress.proxy_for(url)
        failure = describe_failure(
            exc,
            target=target_of(url),
            what="upstream",
            proxy=proxy,
            proxy_status=proxy_status(exc),
            connect_error=isinstance(exc, httpx2.ConnectError),
        )
        if failure is None:
            return [Finding("FAIL", f"GET {url} did not get an answer", f"{type(exc).__name__}: {exc}")]
        found = [Finding("FAIL", f"GET {url} did not get an answer ({failure.code})", str(failure))]
        if failure.code.endswith("_tls_untrusted"):
            found.append(await _untrusted_finding(url, proxy, settings.connect_timeout, "SIDECAR_CA_FILE"))
        return found
    return [_answer_finding(url, response)]


def _answer_finding(url: str, response: httpx2.Response) -> Finding:
    if response.status_code < 400:
        return Finding("PASS", f"GET {url} answered {response.status_code} with the token")
    try:
        message = str(json.loads(response.content).get("message", ""))
    except (ValueError, AttributeError):
        message = ""
    hint = GATEWAY_HINTS.get(message, "")
    body = response.text[:200]
    detail = (f"{hint}. " if hint else "") + f"API Gateway said HTTP {response.status_code}: {body}"
    if response.status_code in (401, 403):
        return Finding("FAIL", f"GET {url} was refused ({message or response.status_code})", detail)
    return Finding("WARN", f"GET {url} answered {response.status_code}", detail)


async def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    findings = await run_checks(env, path=args.path)
    for finding in findings:
        print(finding.render())
    failed = sum(1 for f in findings if f.status == "FAIL")
    print(f"\n{'all checks passed' if not failed else f'{failed} check(s) failed'}")
    if any(f.status == "FAIL" and f.title == CONFIGURATION for f in findings):
        return EXIT_CONFIG  # as every command says a configuration problem
    return 0 if not failed else EXIT_FAILURE
