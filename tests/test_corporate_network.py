"""The sidecar in a corporate network, against real servers on loopback: a forward proxy (tinyproxy, with Basic
authentication and an allowlist; its own log proves what went through it), the emulator over HTTPS from a company
CA, an upstream that requires a client certificate (mutual TLS), a private API behind a VPC endpoint, and IPv6."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import httpx2
import pytest

from proxy.egress.route import ProxyEnvironment
from proxy.emulator.pki import TestCA
from proxy.errors import TokenError
from proxy.server.serving import ServerTls
from proxy.settings import SecretStr
from tests.conftest import assert_hidden, metric, run_cli, run_sidecar, run_stack, sidecar_process, stack_env
from tests.forward_proxy import tinyproxy
from tests.redis_server import _free_port
from tests.tls_upstream import mtls_upstream

PROXY_PASSWORD = "pr0xy-pa55word-7f3a"


@pytest.fixture
def company_ca(tmp_path: Path) -> TestCA:
    """The company CA a TLS-inspecting proxy or a private endpoint's certificate comes from."""
    return TestCA(tmp_path, "Example Corp Issuing CA")


@pytest.fixture
def server_tls(company_ca: TestCA) -> ServerTls:
    issued = company_ca.server()
    return ServerTls(issued.cert_file, issued.key_file)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


async def get(client: httpx2.AsyncClient, url: str) -> httpx2.Response:
    return await client.get(url, timeout=30)


async def test_https_through_an_authenticating_proxy_with_a_company_ca(
    client: httpx2.AsyncClient, company_ca: TestCA, server_tls: ServerTls, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.DEBUG)
    with tinyproxy(user="svc-sidecar", password=PROXY_PASSWORD, allow=("127.0.0.1",)) as proxy:
        async with run_stack(tls=server_tls) as stack:
            settings = stack.settings(egress_proxy=SecretStr(proxy.url), ca_file=company_ca.ca_file)
            async with run_sidecar(settings) as sidecar:
                answers = [await get(client, f"{sidecar.url}/orders/{n}") for n in range(20)]
                assert [answer.status_code for answer in answers] == [200] * 20
                assert answers[0].json()["path"] == "/orders/0"
                shown = [
                    (await get(client, f"{sidecar.url}/-/readyz")).text,
                    (await get(client, f"{sidecar.url}/-/metrics")).text,
                ]
        # Both went through the proxy, each as one CONNECT tunnel: kept alive and reused like a direct connection.
        connects = proxy.requests("CONNECT")
        assert connects.count(f"CONNECT 127.0.0.1:{port_of(stack.cognito_url)} HTTP/1.1") == 1
        assert connects.count(f"CONNECT 127.0.0.1:{port_of(stack.api_url)} HTTP/1.1") == 1
        assert stack.emulator.apigw.authorized == 20
    assert_hidden("\n".join([*shown, caplog.text]), PROXY_PASSWORD)


async def test_plain_http_proxy_from_the_environment_with_no_proxy_by_port(client: httpx2.AsyncClient):
    with tinyproxy() as proxy:
        async with run_stack() as stack:
            cognito_port, api_port = port_of(stack.cognito_url), port_of(stack.api_url)
            environment = ProxyEnvironment(http_proxy=proxy.url, no_proxy=f"example.com, 127.0.0.1:{cognito_port}")
            async with run_sidecar(stack.settings(proxy_environment=environment)) as sidecar:
                answer = await get(client, f"{sidecar.url}/hello?x=1")
        assert answer.status_code == 200
        # The upstream request went through the proxy; the token endpoint, named in NO_PROXY, did not.
        assert proxy.requests("GET") == [f"GET http://127.0.0.1:{api_port}/prod/hello?x=1 HTTP/1.1"]
        assert stack.token_requests == 1


async def test_a_proxy_that_wants_credentials_is_explained(client: httpx2.AsyncClient, server_tls: ServerTls):
    with tinyproxy(user="svc-sidecar", password=PROXY_PASSWORD) as proxy:
        async with run_stack(tls=server_tls) as stack:
            bare = f"http://127.0.0.1:{proxy.port}"
            wrong = f"http://svc-sidecar:not-{PROXY_PASSWORD}@127.0.0.1:{proxy.port}"
            for url, said in ((bare, "the proxy URL carries none"), (wrong, "the ones in the proxy URL were refused")):
                settings = stack.settings(egress_proxy=SecretStr(url))
                async with run_sidecar(settings) as sidecar:
                    answer = await get(client, f"{sidecar.url}/hello")
                    metrics = (await get(client, f"{sidecar.url}/-/metrics")).text
                assert answer.status_code == 503
                assert answer.headers["x-sidecar-error"] == "egress_proxy_auth_required"
                assert said in answer.json()["detail"] and "SIDECAR_EGRESS_PROXY_FILE" in answer.json()["detail"]
                assert_hidden(answer.text, PROXY_PASSWORD)
                count = metric(
                    metrics,
                    "sidecar_egress_failures_total",
                    target="token_endpoint",
                    code=answer.headers["x-sidecar-error"],
                )
                assert count >= 1
            assert stack.token_requests == 0


async def test_a_proxy_allowlist_refusal_names_the_hosts_to_allow(client: httpx2.AsyncClient, server_tls: ServerTls):
    with tinyproxy(allow=("localhost",)) as proxy:
        async with run_stack(tls=server_tls) as stack:
            environment = ProxyEnvironment(https_proxy=proxy.url)
            async with run_sidecar(stack.settings(proxy_environment=environment)) as sidecar:
                answer = await get(client, f"{sidecar.url}/hello")
    assert answer.status_code == 503 and answer.headers["x-sidecar-error"] == "egress_proxy_refused"
    detail = answer.json()["detail"]
    assert "allowlist" in detail and "*.amazoncognito.com" in detail and "execute-api" in detail
    assert f"the egress proxy http://127.0.0.1:{proxy.port} refused the connection to 127.0.0.1:" in detail
    assert proxy.requests("CONNECT")  # the proxy saw, and refused, the tunnel


async def test_a_proxy_that_cannot_be_reached_or_cannot_reach_the_target(
    client: httpx2.AsyncClient, company_ca: TestCA, server_tls: ServerTls
):
    closed = _free_port()
    async with run_stack(tls=server_tls) as stack:
        settings = stack.settings(egress_proxy=SecretStr(f"http://127.0.0.1:{closed}"), ca_file=company_ca.ca_file)
        async with run_sidecar(settings) as sidecar:
            unreachable = await get(client, f"{sidecar.url}/hello")
        assert unreachable.status_code == 503
        assert unreachable.headers["x-sidecar-error"] == "egress_proxy_unreachable"
        assert f"127.0.0.1:{closed}" in unreachable.json()["detail"]
        with tinyproxy() as proxy:
            # The token endpoint goes direct; the upstream, through the proxy, is a port where nothing listens.
            environment = ProxyEnvironment(https_proxy=proxy.url, no_proxy=f"127.0.0.1:{port_of(stack.cognito_url)}")
            settings = stack.settings(
                proxy_environment=environment, ca_file=company_ca.ca_file, upstream_url=f"https://127.0.0.1:{closed}/s"
            )
            async with run_sidecar(settings) as sidecar:
                cannot = await get(client, f"{sidecar.url}/hello")
                metrics = (await get(client, f"{sidecar.url}/-/metrics")).text
        assert cannot.status_code == 502 and cannot.headers["x-sidecar-error"] == "egress_proxy_cannot_reach"
        assert (
            metric(metrics, "sidecar_egress_failures_total", target="upstream", code="egress_proxy_cannot_reach") == 1
        )


# The sidecar stops while its refresher retries a handshake that fails; a stop that cancels httpcore2 inside
async def test_serve_trusts_the_default_store_it_is_started_with(
    client: httpx2.AsyncClient, company_ca: TestCA, server_tls: ServerTls
):
    # The company CA as the machine's trust store (SSL_CERT_FILE), no SIDECAR_CA_FILE: the token endpoint and the
    # upstream are trusted through the one default context. `serve` imports aiohttp with that variable pointed at an
    # empty file (its own two contexts skip the bundle); had the variable stayed so, the token request would fail
    # as untrusted (503), and had the forwarder used aiohttp's context, the upstream would (502).
    async with run_stack(tls=server_tls) as stack:
        env = stack_env(
            stack, SSL_CERT_FILE=str(company_ca.ca_file), SIDECAR_REFRESH_TOKEN=stack.emulator.refresh_token or ""
        )
        async with sidecar_process(env) as sidecar:
            answers = [await get(client, f"{sidecar.url}/orders/{n}") for n in range(3)]
            code, said = await sidecar.stop()
    assert [answer.status_code for answer in answers] == [200] * 3, answers[0].text
    assert answers[0].json()["path"] == "/orders/0"
    assert stack.token_requests == 1 and stack.emulator.apigw.authorized == 3
    assert code == 0, said


# start_tls leaves that TCP socket to the garbage collector (httpcore2 closes it on errors, not on cancellation),
# and pytest reports the ResourceWarning whenever the collector runs.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_certificate_from_an_unknown_ca_is_refused_until_the_ca_file_names_it(
    client: httpx2.AsyncClient, company_ca: TestCA, server_tls: ServerTls, tmp_path: Path
):
    ca_file = tmp_path / "trusted.pem"
    ca_file.write_text("")
    async with run_stack(tls=server_tls) as stack:
        async with run_sidecar(stack.settings()) as sidecar:
            untrusted = await get(client, f"{sidecar.url}/hello")
        assert untrusted.status_code == 503
        assert untrusted.headers["x-sidecar-error"] == "token_endpoint_tls_untrusted"
        assert "SIDECAR_CA_FILE" in untrusted.json()["detail"]
        assert stack.token_requests == 0  # nothing was sent to a server that could not prove who it is
        # Another CA's bundle first; then the company's, written while the sidecar runs: re-read without a restart.
        other = TestCA(tmp_path, "Some Other CA")
        ca_file.write_bytes(other.ca_file.read_bytes())
        async with run_sidecar(stack.settings(ca_file=ca_file)) as sidecar:
            still = await get(client, f"{sidecar.url}/hello")
            assert still.headers["x-sidecar-error"] == "token_endpoint_tls_untrusted"
            sidecar.parts.secrets_changed.clear()
            replacement = tmp_path / "trusted.pem.new"
            replacement.write_bytes(company_ca.ca_file.read_bytes())
            os.replace(replacement, ca_file)
            async with asyncio.timeout(30):
                await sidecar.parts.secrets_changed.wait()
            # A token request already on its way with the old trust fails, and requests during its backoff are answered
            # with that failure at once; the refresher's next try, with the new trust, gets through.
            async with asyncio.timeout(20):
                while (trusted := await get(client, f"{sidecar.url}/hello")).status_code != 200:
                    with contextlib.suppress(TokenError):
                        await sidecar.tokens.get()  # waits for the refresher's next try
        assert trusted.status_code == 200, trusted.text


async def test_mutual_tls_to_the_upstream(client: httpx2.AsyncClient, company_ca: TestCA, tmp_path: Path):
    clients_dir = tmp_path / "clients"
    clients_dir.mkdir()
    client_ca = TestCA(clients_dir, "Example Corp Client CA")
    stranger = TestCA(tmp_path, "Stranger CA").client("stranger")
    expired = client_ca.client("expired", days=-2)
    good = client_ca.client("good", "legacy-service")
    server = company_ca.server("upstream")
    async with run_stack() as stack:
        with mtls_upstream(server.cert_file, server.key_file, client_ca.ca_file) as (url, refusals):
            cases: list[tuple[Any, str]] = [
                (None, "it requires a client certificate and none was presented"),
                (stranger, "it does not trust the CA that issued the client certificate"),
                (expired, "the client certificate has expired"),
            ]
            for issued, said in cases:
                files = {"client_cert_file": issued.cert_file, "client_key_file": issued.key_file} if issued else {}
                settings = stack.settings(upstream_url=url, ca_file=company_ca.ca_file, **files)
                async with run_sidecar(settings) as sidecar:
                    answer = await get(client, f"{sidecar.url}/x")
                assert answer.status_code == 502 and answer.headers["x-sidecar-error"] == "upstream_tls_refused"
                assert said in answer.json()["detail"]
            assert refusals
            # Without the company CA, the upstream's own certificate is what fails.
            async with run_sidecar(stack.settings(upstream_url=url)) as sidecar:
                answer = await get(client, f"{sidecar.url}/x")
            assert answer.headers["x-sidecar-error"] == "upstream_tls_untrusted"
            settings = stack.settings(
                upstream_url=url,
                ca_file=company_ca.ca_file,
                client_cert_file=good.cert_file,
                client_key_file=good.key_file,
            )
            async with run_sidecar(settings) as sidecar:
                answer = await get(client, f"{sidecar.url}/x")
                metrics = (await get(client, f"{sidecar.url}/-/metrics")).text
            assert answer.status_code == 200 and answer.json() == {"client": "legacy-service"}
            expiry = metric(metrics, "sidecar_client_certificate_expiry_timestamp_seconds", route="/")
            assert abs(expiry - good_expiry(good.cert_file)) < 1


class LogWaiter(logging.Handler):
    """``seen`` is set once a log line containing ``text`` is written (while entered)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()

    async def __aenter__(self) -> LogWaiter:
        logging.getLogger().addHandler(self)
        return self

    async def __aexit__(self, *exc: object) -> None:
        logging.getLogger().removeHandler(self)


def good_expiry(path: Path) -> float:
    from cryptography import x509

    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc.timestamp()


async def test_a_renewed_client_certificate_is_taken_up_while_requests_flow(
    client: httpx2.AsyncClient, company_ca: TestCA, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    clients_dir = tmp_path / "clients"
    clients_dir.mkdir()
    client_ca = TestCA(clients_dir, "Example Corp Client CA")
    first = client_ca.client("first", "legacy-service-2026", password=b"key-pa55")
    renewed = client_ca.client("renewed", "legacy-service-2027", days=90, password=b"key-pa55")
    live = tmp_path / "live"
    live.mkdir(mode=0o700)
    cert_file, key_file, password_file = live / "tls.crt", live / "tls.key", live / "key-password"
    cert_file.write_bytes(first.cert_file.read_bytes())
    key_file.write_bytes(first.key_file.read_bytes())
    password_file.write_text("key-pa55\n")
    for path in (key_file, password_file):
        path.chmod(0o600)
    server = company_ca.server("upstream")
    async with run_stack() as stack:
        with mtls_upstream(server.cert_file, server.key_file, client_ca.ca_file) as (url, _):
            settings = stack.settings(
                upstream_url=url,
                ca_file=company_ca.ca_file,
                client_cert_file=cert_file,
                client_key_file=key_file,
                client_key_password=SecretStr("key-pa55"),
                client_key_password_file=password_file,
            )
            async with run_sidecar(settings) as sidecar:
                seen: list[str] = []
                stop = asyncio.Event()
                renewed_seen = asyncio.Event()
                answered = asyncio.Event()

                async def traffic() -> None:
                    while not stop.is_set():
                        answer = await get(client, f"{sidecar.url}/x")
                        assert answer.status_code == 200, answer.text
                        seen.append(answer.json()["client"])
                        answered.set()
                        if seen[-1] == "legacy-service-2027":
                            renewed_seen.set()

                flowing = asyncio.create_task(traffic())
                async with asyncio.timeout(30):
                    await answered.wait()
                # cert-manager's renewal, caught half way: the new certificate beside the old key.
                refusal = LogWaiter("cannot be used; the current ones stay in use")
                cert_file.write_bytes(renewed.cert_file.read_bytes())
                async with asyncio.timeout(30), refusal:
                    await refusal.seen.wait()
                assert set(seen) == {"legacy-service-2026"}
                sidecar.parts.secrets_changed.clear()
                key_file.write_bytes(renewed.key_file.read_bytes())
                async with asyncio.timeout(30):
                    await sidecar.parts.secrets_changed.wait()
                    await renewed_seen.wait()
                stop.set()
                await flowing
                metrics = (await get(client, f"{sidecar.url}/-/metrics")).text
    assert (
        abs(
            metric(metrics, "sidecar_client_certificate_expiry_timestamp_seconds", route="/")
            - good_expiry(renewed.cert_file)
        )
        < 1
    )
    assert_hidden(caplog.text, "key-pa55")


async def test_a_private_api_through_a_vpc_endpoint(client: httpx2.AsyncClient):
    async with run_stack(api_id="a1b2c3d4e5") as stack:
        async with run_sidecar(stack.settings()) as sidecar:
            forbidden = await get(client, f"{sidecar.url}/hello")
        assert forbidden.status_code == 403 and forbidden.json() == {"message": "Forbidden"}
        async with run_sidecar(stack.settings(api_id="a1b2c3d4e5")) as sidecar:
            # A client cannot name another API: the sidecar's value replaces any it sends.
            answer = await client.get(f"{sidecar.url}/hello", headers={"x-apigw-api-id": "zzzzzzzzzz"})
        assert answer.status_code == 200
        sent = [value for name, value in answer.json()["headers"] if name == "x-apigw-api-id"]
        assert sent == ["a1b2c3d4e5"]


async def test_ipv6_token_endpoint_upstream_and_listener(client: httpx2.AsyncClient):
    async with run_stack(host="::1") as stack:
        assert stack.api_url.startswith("http://[::1]:")
        async with run_sidecar(stack.settings(listen="[::1]:0"), host="::1") as sidecar:
            assert sidecar.url.startswith("http://[::1]:")
            answer = await get(client, f"{sidecar.url}/hello")
    assert answer.status_code == 200 and answer.json()["path"] == "/hello"


async def test_check_explains_the_corporate_path(company_ca: TestCA, server_tls: ServerTls, tmp_path: Path):
    (tmp_path / "clients").mkdir()
    client_ca = TestCA(tmp_path / "clients", "Client CA")
    soon = client_ca.client("soon", "legacy-service", days=5)
    proxy_file = tmp_path / "proxy-url"
    async with run_stack(tls=server_tls) as stack:
        with tinyproxy(user="svc-sidecar", password=PROXY_PASSWORD) as proxy:
            proxy_file.write_text(proxy.url + "\n")
            proxy_file.chmod(0o600)
            env = stack_env(stack, SIDECAR_REFRESH_TOKEN=stack.emulator.refresh_token)
            env["SIDECAR_EGRESS_PROXY_FILE"] = str(proxy_file)
            # No company CA yet: the check says who issued the certificate it was shown, and which setting to use.
            code, out, err = await run_cli("check", env=env)
            assert code == 1, out + err
            assert "through the egress proxy http://127.0.0.1:" in out and "(with credentials)" in out
            assert "token_endpoint_tls_untrusted" in out
            assert "issued by CN=Example Corp Issuing CA" in out and "SIDECAR_CA_FILE" in out
            env |= {
                "SIDECAR_CA_FILE": str(company_ca.ca_file),
                "SIDECAR_CLIENT_CERT_FILE": str(soon.cert_file),
                "SIDECAR_CLIENT_KEY_FILE": str(soon.key_file),
            }
            code, out, err = await run_cli("check", env=env)
            assert code == 0, out + err
            assert "WARN  the client certificate for route / expires in 5 days" in out
            assert "issuer CN=Client CA" in out
            assert_hidden(out + err, PROXY_PASSWORD)
            # A proxy that wants other credentials: one line with the code and the fix.
            proxy_file.write_text(f"http://svc-sidecar:wrong@127.0.0.1:{proxy.port}\n")
            code, out, _ = await run_cli("check", env=env)
            assert code == 1 and "egress_proxy_auth_required" in out and "SIDECAR_EGRESS_PROXY_FILE" in out
