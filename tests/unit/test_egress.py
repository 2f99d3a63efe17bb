"""Choosing the egress proxy (curl's rules for the proxy variables and NO_PROXY), and the settings that name it:
pure logic, table-driven."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from proxy.egress.failures import describe_failure, proxy_refusal
from proxy.egress.route import Egress, EgressProxy, NoProxy, ProxyEnvironment
from proxy.egress.tls import bundle_deferred, default_context
from proxy.egress.transport import EgressTransport
from proxy.errors import ConfigError
from proxy.forward import Forwarder
from proxy.settings import load_settings
from proxy.upstream import Limits, Timeouts
from tests.conftest import assert_hidden

BASE = {
    "SIDECAR_UPSTREAM_URL": "https://abc1234567.execute-api.eu-west-1.amazonaws.com/prod",
    "SIDECAR_COGNITO_DOMAIN": "https://my-app.auth.eu-west-1.amazoncognito.com",
    "SIDECAR_CLIENT_ID": "client",
    "SIDECAR_REFRESH_TOKEN": "refresh",
}


@pytest.mark.parametrize(
    ("no_proxy", "host", "port", "direct"),
    [
        ("", "example.com", 443, False),
        ("*", "anything.example", 443, True),
        ("example.com", "example.com", 443, True),
        ("example.com", "api.example.com", 443, True),  # a name covers its subdomains
        ("example.com", "badexample.com", 443, False),  # ... not another name ending alike
        (".example.com", "api.example.com", 443, True),
        (".example.com", "example.com", 443, True),  # curl ignores the leading dot
        ("EXAMPLE.com", "Api.Example.COM", 443, True),  # case-insensitive
        ("example.com.", "api.example.com", 443, True),
        ("example.com:8443", "example.com", 8443, True),  # with a port: that port only
        ("example.com:8443", "example.com", 443, False),
        ("10.0.0.0/8", "10.1.2.3", 443, True),  # CIDR ranges
        ("10.0.0.0/8", "11.1.2.3", 443, False),
        ("10.0.0.0/8", "10.example.com", 443, False),  # names are never resolved
        ("127.0.0.1", "127.0.0.1", 80, True),
        ("", "127.0.0.1", 80, False),  # loopback is proxied unless named, as in curl and urllib
        ("localhost", "127.0.0.1", 80, False),  # ... and a name does not cover an address
        ("::1", "::1", 443, True),
        ("[::1]", "[::1]", 443, True),
        ("[::1]:9000", "::1", 9000, True),
        ("[::1]:9000", "::1", 9001, False),
        ("fd00::/8", "fd12::1", 443, True),
        (" a.com , b.com ", "b.com", 443, True),  # spaces around entries
        ("a.com b.com", "b.com", 443, True),
        (",,", "b.com", 443, False),
    ],
)
def test_no_proxy_matches_as_curl_does(no_proxy: str, host: str, port: int, direct: bool):
    assert NoProxy(no_proxy).matches(host, port) is direct


def test_lower_case_variables_win_and_each_scheme_has_its_own():
    env = ProxyEnvironment.from_env(
        {"HTTPS_PROXY": "http://upper:3128", "https_proxy": "http://lower:3128", "HTTP_PROXY": "http://plain:8080"}
    )
    egress = Egress.resolve(None, env)
    assert egress.proxy_for("https://x.example/a") == EgressProxy("http://lower:3128", "https_proxy")
    assert egress.proxy_for("http://x.example/a") == EgressProxy("http://plain:8080", "HTTP_PROXY")
    assert Egress.resolve(None, ProxyEnvironment.from_env({"HTTP_PROXY": "p:1"})).proxy_for("https://x/") is None


def test_the_sidecar_setting_wins_and_none_ignores_the_environment():
    env = ProxyEnvironment.from_env({"https_proxy": "http://env:3128", "no_proxy": "internal.example"})
    chosen = Egress.resolve("http://corp:8080", env)
    assert chosen.proxy_for("https://x.example/") == chosen.proxy_for("http://x.example/")
    assert chosen.proxy_for("https://x.example/").url == "http://corp:8080"  # type: ignore[union-attr]
    assert chosen.proxy_for("https://api.internal.example/") is None  # NO_PROXY still applies
    assert Egress.resolve("none", env).proxy_for("https://x.example/") is None


@pytest.mark.parametrize(
    ("value", "url"),
    [
        ("proxy.corp:3128", "http://proxy.corp:3128"),  # bare host:port, as curl reads it
        ("http://proxy.corp", "http://proxy.corp:3128"),
        ("https://proxy.corp", "https://proxy.corp:443"),
        ("http://[fd00::1]:3128/", "http://[fd00::1]:3128"),
    ],
)
def test_proxy_urls(value: str, url: str):
    assert EgressProxy.parse(value, "X").url == url


def test_proxy_credentials_are_kept_apart_and_never_shown():
    proxy = EgressProxy.parse("http://svc%40corp:p%3Ass@proxy:3128", "HTTPS_PROXY")
    assert (proxy.username, proxy.password) == ("svc@corp", "p:ss")
    assert proxy.authorization() == "Basic c3ZjQGNvcnA6cDpzcw=="
    for shown in (repr(proxy), proxy.display, str(proxy_refusal(proxy, 407, "h:443"))):
        assert_hidden(shown, "p:ss", "p%3Ass")
    assert proxy.display == "http://proxy:3128 (with credentials)"


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("socks5://u:secret@proxy:1080", "scheme socks5:// is not supported"),
        ("http://u:secret@proxy:99999", "not a valid proxy URL"),
        ("http://u:secret@proxy:3128/path", "without a path"),
    ],
)
def test_an_unusable_proxy_url_is_named_by_its_variable_without_its_password(value: str, said: str):
    with pytest.raises(ConfigError) as caught:
        load_settings({**BASE, "HTTPS_PROXY": value})
    assert said in str(caught.value) and "HTTPS_PROXY" in str(caught.value)
    assert_hidden(str(caught.value), "secret")


def test_the_proxy_url_can_come_from_a_file(tmp_path: Path):
    path = tmp_path / "proxy"
    path.write_text("http://svc:hunter2xyz@proxy.corp:3128\n")
    path.chmod(0o600)
    settings = load_settings({**BASE, "SIDECAR_EGRESS_PROXY_FILE": str(path), "https_proxy": "http://other:1"})
    proxy = settings.egress.proxy_for("https://my-app.auth.eu-west-1.amazoncognito.com/oauth2/token")
    assert proxy is not None and proxy.url == "http://proxy.corp:3128" and proxy.password == "hunter2xyz"
    assert_hidden(repr(settings), "hunter2xyz")


def test_proxy_variables_are_not_sidecar_settings():
    with pytest.raises(ConfigError, match="SIDECAR_PROXY_ENVIRONMENT: unknown setting"):
        load_settings({**BASE, "SIDECAR_PROXY_ENVIRONMENT": "x"})


def test_tls_and_private_api_settings_are_checked(tmp_path: Path):
    with pytest.raises(ConfigError) as caught:
        load_settings({**BASE, "SIDECAR_CLIENT_CERT_FILE": str(tmp_path / "c.pem"), "SIDECAR_API_ID": "Not-An-Id"})
    text = str(caught.value)
    assert "SIDECAR_CLIENT_KEY_FILE: the client certificate and its key go together" in text
    assert "SIDECAR_API_ID: must be an API Gateway API id" in text
    settings = load_settings({**BASE, "SIDECAR_API_ID": "a1b2c3d4e5", "SIDECAR_CA_FILE": str(tmp_path / "ca.pem")})
    assert settings.api_id == "a1b2c3d4e5" and settings.ca_file == tmp_path / "ca.pem"


def test_failures_that_are_not_on_the_way_out_are_left_to_the_caller():
    proxy = EgressProxy.parse("http://proxy:3128", "HTTPS_PROXY")
    assert describe_failure(ConnectionRefusedError(), target="h:443", what="upstream", proxy=None) is None
    unreachable = describe_failure(
        ConnectionRefusedError(), target="h:443", what="upstream", proxy=proxy, connect_error=True
    )
    assert unreachable is not None and unreachable.code == "egress_proxy_unreachable"
    codes = {status: proxy_refusal(proxy, status, "h:443").code for status in (403, 407, 502, 504)}
    assert codes == {
        403: "egress_proxy_refused",
        407: "egress_proxy_auth_required",
        502: "egress_proxy_cannot_reach",
        504: "egress_proxy_cannot_reach",
    }
    assert "*.amazoncognito.com" in proxy_refusal(proxy, 403, "h:443").fix


def test_bundle_deferred_points_openssl_s_default_file_at_nothing_and_puts_it_back(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SSL_CERT_FILE", "/etc/company/bundle.pem")
    with bundle_deferred():
        assert os.environ["SSL_CERT_FILE"] == os.devnull
    assert os.environ["SSL_CERT_FILE"] == "/etc/company/bundle.pem"
    monkeypatch.delenv("SSL_CERT_FILE")
    with pytest.raises(RuntimeError), bundle_deferred():
        raise RuntimeError("an import that fails")
    assert "SSL_CERT_FILE" not in os.environ


def test_clients_without_tls_files_share_one_default_context():
    # One parse of the trust store per process, however many routes and token endpoints.
    def forwarder(url: str, proxy: EgressProxy | None = None) -> Forwarder:
        return Forwarder(
            upstream_url=url, tokens=None, header="Authorization", timeouts=Timeouts(), limits=Limits(), proxy=proxy
        )  # type: ignore[arg-type]

    assert forwarder("https://api.example/prod").ssl_context is default_context()
    assert (
        forwarder("http://api.example/prod", EgressProxy.parse("https://proxy.example:3128", "HTTPS_PROXY")).ssl_context
        is default_context()
    )
    assert forwarder("http://api.example/prod").ssl_context is True  # no TLS on the way: no trust store loaded
    assert EgressTransport(Egress())._context() is default_context()
