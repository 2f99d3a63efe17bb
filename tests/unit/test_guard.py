"""The caller checks over plain ASGI scopes: no server, no event loop."""

from __future__ import annotations

import ipaddress

import pytest

from proxy.guard import CallerGuard, host_allowed, host_name
from proxy.secrets import Secret
from proxy.types import Scope


def scope(method: str = "GET", client: str = "127.0.0.1", **headers: str) -> Scope:
    raw = [(name.replace("_", "-").encode(), value.encode()) for name, value in headers.items()]
    return {"type": "http", "method": method, "headers": raw, "client": (client, 40000)}


@pytest.mark.parametrize(
    ("value", "name"),
    [(b"LocalHost:8080", b"localhost"), (b"[::1]:8080", b"::1"), (b"[::1", b"[::1"), (b" sidecar ", b"sidecar")],
)
def test_host_name_drops_the_port_and_case(value: bytes, name: bytes):
    assert host_name(value) == name


@pytest.mark.parametrize(
    ("name", "allowed", "ok"),
    [
        (b"127.0.0.1", (), True),
        (b"::1", (), True),
        (b"localhost", (), True),
        (b"sidecar", (), False),  # a single label: LLMNR/NBNS poisoning answers one
        (b"sidecar", ("sidecar",), True),  # a compose service, listed
        (b"attacker.example", (), False),  # DNS rebinding comes under a dotted name
        (b"api.internal.corp", ("api.internal.corp",), True),
        (b"a.svc.cluster.local", ("*.svc.cluster.local",), True),
        (b"svc.cluster.local", ("*.svc.cluster.local",), False),  # the suffix rule needs a label before it
    ],
)
def test_host_allowed(name: bytes, allowed: tuple[str, ...], ok: bool):
    assert host_allowed(name, allowed) is ok


def test_a_request_from_a_local_caller_passes():
    assert CallerGuard().check(scope(host="localhost:8080")) is None


@pytest.mark.parametrize("method", ["TRACE", "CONNECT"])
def test_trace_and_connect_are_refused_and_close_the_connection(method: str):
    refusal = CallerGuard().check(scope(method, host="localhost"))
    assert refusal is not None
    assert (refusal.status, refusal.code) == (405, "method_not_allowed")
    assert (b"connection", b"close") in refusal.headers


def test_a_dotted_host_is_a_421_that_names_the_setting():
    refusal = CallerGuard().check(scope(host="rebind.attacker.example"))
    assert refusal is not None
    assert (refusal.status, refusal.code) == (421, "host_not_allowed")
    assert "SIDECAR_ALLOWED_HOSTS" in refusal.detail


def test_browser_origins_are_refused_unless_listed():
    guard = CallerGuard(allowed_origins=["https://app.corp"])
    assert guard.check(scope(host="localhost", origin="https://app.corp")) is None
    refused = guard.check(scope(host="localhost", origin="https://evil.example"))
    assert refused is not None and (refused.status, refused.code) == (403, "origin_not_allowed")
    no_origin = guard.check(scope(host="localhost", sec_fetch_site="cross-site"))
    assert no_origin is not None and no_origin.code == "origin_not_allowed"
    assert guard.check(scope(host="localhost", sec_fetch_site="same-origin")) is None


def test_peers_outside_allow_from_are_refused_and_ipv4_mapped_addresses_count_as_ipv4():
    guard = CallerGuard(allow_from=[ipaddress.ip_network("10.0.0.0/8")])
    assert guard.check(scope(client="10.1.2.3", host="localhost")) is None
    assert guard.check(scope(client="::ffff:10.1.2.3", host="localhost")) is None
    refused = guard.check(scope(client="192.0.2.7", host="localhost"))
    assert refused is not None and (refused.status, refused.code) == (403, "client_not_allowed")
    assert "192.0.2.7" in refused.detail
    not_an_address = guard.check(scope(client="unix-peer", host="localhost"))
    assert not_an_address is not None and not_an_address.code == "client_not_allowed"


def test_answers_stay_right_past_the_cache_limit():
    guard = CallerGuard(allow_from=[ipaddress.ip_network("10.0.0.0/8")])
    for last in range(1200):  # more distinct peers than the guard remembers
        address = f"10.0.{last // 256}.{last % 256}"
        assert guard.check(scope(client=address, host="localhost")) is None
        assert guard.check(scope(client=f"192.0.{last // 256}.{last % 256}", host="localhost")) is not None


def test_the_caller_token_is_compared_whole():
    guard = CallerGuard(caller_token=Secret("s3cret-caller"))
    assert guard.check_caller(scope(x_sidecar_caller="s3cret-caller")) is None
    for given in ({}, {"x_sidecar_caller": "s3cret"}, {"x_sidecar_caller": "s3cret-caller "}):
        refusal = guard.check_caller(scope(**given))
        assert refusal is not None and (refusal.status, refusal.code) == (401, "caller_unauthenticated")
        assert "s3cret" not in refusal.detail
    assert CallerGuard().check_caller(scope()) is None


def test_details_are_for_callers_on_this_machine_or_with_the_caller_token():
    guard = CallerGuard(caller_token=Secret("s3cret-caller"))
    assert guard.trusted(scope(client="127.0.0.1"))
    assert guard.trusted(scope(client="::1"))
    assert guard.trusted(scope(client="::ffff:127.0.0.1"))
    assert guard.trusted({"type": "http", "headers": [], "client": None})  # a Unix socket
    assert not guard.trusted(scope(client="10.1.2.3"))
    assert guard.trusted(scope(client="10.1.2.3", x_sidecar_caller="s3cret-caller"))
    assert not CallerGuard().trusted(scope(client="10.1.2.3", x_sidecar_caller="anything"))
