"""Security: the credential serves only the callers it is meant for (issue 11), against real servers.

Each rule is tried as an attacker would: a rebinding Host, a browser Origin, a foreign address, no caller
token, TRACE and CONNECT, huge heads and bodies, slow heads and bodies, dot segments, injected forwarding
headers and trailers. Malformed input goes over raw sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx2
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from proxy.app import create_app
from proxy.server.limits import MAX_PIPELINED
from proxy.server.serving import bind_unix, running
from proxy.settings import RouteSettings, SecretStr
from tests.conftest import (
    FAST_POLICY,
    RunningSidecar,
    Stack,
    raw_request,
    run_sidecar,
    sidecar_process,
    stack_env,
)


def _error(response: httpx2.Response) -> str:
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"] == response.headers["x-sidecar-error"]
    return response.headers["x-sidecar-error"]


async def _metric(client: httpx2.AsyncClient, sidecar: RunningSidecar, code: str) -> float:
    text = (await client.get(f"{sidecar.url}/-/metrics")).text
    for line in text.splitlines():
        if line.startswith(f'sidecar_errors_total{{code="{code}"}}'):
            return float(line.split()[-1])
    return 0.0


async def test_hosts_that_are_not_the_sidecars_name_are_refused(
    stack: Stack, sidecar: RunningSidecar, client: httpx2.AsyncClient
):
    before = stack.emulator.apigw.requests
    for host in ("rebind.attacker.example", "sidecar.example.com", "anything.localhost", "127.0.0.1.nip.io"):
        response = await client.get(f"{sidecar.url}/x", headers={"Host": host})
        assert response.status_code == 421, host
        assert _error(response) == "host_not_allowed"
    assert stack.emulator.apigw.requests == before  # nothing reached the upstream
    assert await _metric(client, sidecar, "host_not_allowed") == 4
    port = sidecar.url.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", "localhost", f"[::1]:{port}"):
        assert (await client.get(f"{sidecar.url}/x", headers={"Host": host})).status_code == 200, host
    # A single label (a compose service, or a name LLMNR poisoning answers) must be listed; the fix says how.
    response = await client.get(f"{sidecar.url}/x", headers={"Host": "sidecar"})
    assert response.status_code == 421
    assert "SIDECAR_ALLOWED_HOSTS=sidecar in the sidecar's environment" in response.json()["detail"]


async def test_allowed_hosts_lists_names_and_suffixes(stack: Stack, client: httpx2.AsyncClient):
    async with run_sidecar(stack.settings(allowed_hosts=("sidecar", "api.internal", "*.svc.cluster.local"))) as sidecar:
        for host, status in [
            ("sidecar:8080", 200),
            ("legacy_app", 421),
            ("api.internal", 200),
            ("sidecar.ns.svc.cluster.local:8080", 200),
            ("svc.cluster.local", 421),
            ("api.internal.attacker.example", 421),
        ]:
            assert (await client.get(f"{sidecar.url}/x", headers={"Host": host})).status_code == status, host


async def test_browser_requests_from_other_origins_are_refused(
    stack: Stack, sidecar: RunningSidecar, client: httpx2.AsyncClient
):
    before = stack.emulator.apigw.requests
    for headers in (
        {"Origin": "http://rebind.attacker.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
    ):
        response = await client.post(f"{sidecar.url}/form", headers=headers, content=b"a=1")
        assert response.status_code == 403, headers
        assert _error(response) == "origin_not_allowed"
    assert stack.emulator.apigw.requests == before
    # Same-origin navigation and tools without the headers pass.
    assert (await client.get(f"{sidecar.url}/x", headers={"Sec-Fetch-Site": "none"})).status_code == 200
    async with run_sidecar(stack.settings(allowed_origins=("https://tool.internal",))) as listed:
        headers = {"Origin": "https://tool.internal", "Sec-Fetch-Site": "cross-site"}
        assert (await client.get(f"{listed.url}/x", headers=headers)).status_code == 200


async def test_source_addresses_outside_allow_from_are_refused(stack: Stack, client: httpx2.AsyncClient):
    # Settings that say "listen on every interface": the check applies (the test still binds loopback only).
    wide = stack.settings(listen="0.0.0.0:8080", allow_from="10.0.0.0/8")
    async with run_sidecar(wide) as sidecar:
        response = await client.get(f"{sidecar.url}/x")
        assert response.status_code == 403
        assert _error(response) == "client_not_allowed"
        assert "127.0.0.1 is not in SIDECAR_ALLOW_FROM" in response.json()["detail"]
    async with run_sidecar(stack.settings(listen="0.0.0.0:8080")) as sidecar:  # default: loopback and private
        assert (await client.get(f"{sidecar.url}/x")).status_code == 200


async def test_the_caller_token_is_required_and_never_forwarded(stack: Stack, client: httpx2.AsyncClient):
    async with run_sidecar(stack.settings(caller_token=SecretStr("caller-secret-1"))) as sidecar:
        for headers in ({}, {"X-Sidecar-Caller": "wrong"}, {"X-Sidecar-Caller": "caller-secret-1x"}):
            response = await client.get(f"{sidecar.url}/x", headers=headers)
            assert response.status_code == 401
            assert _error(response) == "caller_unauthenticated"
            assert "caller-secret-1" not in response.text
        response = await client.get(f"{sidecar.url}/x", headers={"X-Sidecar-Caller": "caller-secret-1"})
        assert response.status_code == 200
        assert not [h for h in response.json()["headers"] if h[0] == "x-sidecar-caller"]
        # Probes need no caller token.
        assert (await client.get(f"{sidecar.url}/-/healthz")).status_code == 200


async def test_trace_and_connect_are_refused(stack: Stack, sidecar: RunningSidecar):
    before = stack.emulator.apigw.requests
    status, headers, _ = await raw_request(
        sidecar.url, b"TRACE /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    assert (status, headers["x-sidecar-error"]) == (405, ["method_not_allowed"])
    status, headers, _ = await raw_request(
        sidecar.url, b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n"
    )
    assert status in (400, 405)
    assert stack.emulator.apigw.requests == before


async def test_route_method_and_path_allowlists(stack: Stack, client: httpx2.AsyncClient, tmp_path: Path):
    route = RouteSettings(
        prefix="/ro",
        upstream_url=stack.upstream_url,
        methods=("get", "HEAD"),
        paths=("/ro/items/*",),
        **{k: v for k, v in stack.settings().values().items() if k in ("token_url", "client_id")},
        client_secret=stack.settings().client_secret,
        refresh_token=stack.settings().refresh_token,
    )
    async with run_sidecar(stack.settings(routes=(route,))) as sidecar:
        assert (await client.get(f"{sidecar.url}/ro/items/7")).status_code == 200
        response = await client.delete(f"{sidecar.url}/ro/items/7")
        assert (response.status_code, _error(response)) == (405, "method_not_allowed")
        response = await client.get(f"{sidecar.url}/ro/admin")
        assert (response.status_code, _error(response)) == (403, "path_not_allowed")
        # * matches one segment: it does not cross into /ro/items/7/secret, nor climb out with ..; (Tomcat's form).
        response = await client.get(f"{sidecar.url}/ro/items/7/secret")
        assert (response.status_code, _error(response)) == (403, "path_not_allowed")
        before = stack.emulator.apigw.requests
        for raw in (b"/ro/items/x/..;/..;/admin", b"/ro/items/..%2f..%2fadmin", b"/ro/items/%252e%252e/admin"):
            status, headers, _ = await raw_request(
                sidecar.url, b"GET " + raw + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            )
            assert (status, headers["x-sidecar-error"]) == (400, ["bad_request"]), raw
        assert stack.emulator.apigw.requests == before


async def test_a_huge_header_block_gets_431_without_growing_memory(stack: Stack, sidecar: RunningSidecar):
    before = stack.emulator.apigw.requests
    for block in (b"X-Big: " + b"a" * 20_000 + b"\r\n", b"".join(b"X-%d: v\r\n" % i for i in range(3000))):
        status, headers, body = await raw_request(
            sidecar.url, b"GET /x HTTP/1.1\r\nHost: localhost\r\n" + block + b"\r\n"
        )
        assert (status, headers["x-sidecar-error"]) == (431, ["headers_too_large"])
        assert json.loads(body)["error"] == "headers_too_large"
    # 4 MiB of header that never ends: refused once past the limit; the rest is read and dropped.
    host, port = sidecar.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /x HTTP/1.1\r\nHost: localhost\r\nX-Big: ")
    with contextlib.suppress(ConnectionError):
        for _ in range(64):
            writer.write(b"a" * 65536)
            await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 431")
    assert stack.emulator.apigw.requests == before


async def test_a_head_over_the_limit_gets_431_where_its_read_cannot_be_followed_byte_by_byte(
    stack: Stack, sidecar: RunningSidecar
):
    """After a chunked body in the same read, the parser's own report of the head is what is measured. The POST's
    answer is under way when the GET's head is refused: the 431 follows it, and nothing is lost."""
    refused = sidecar.parts.limits.errors["headers_too_large"]
    chunked = b"POST /x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    big = b"GET /x HTTP/1.1\r\nHost: localhost\r\n" + b"".join(b"X-P%d: %s\r\n" % (i, b"v" * 6000) for i in range(3))
    host, port = sidecar.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(chunked + big + b"\r\n")  # one write: the chunked body and the big head in one read
    answers = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert sidecar.parts.limits.errors["headers_too_large"] == refused + 1
    assert answers.startswith(b"HTTP/1.1 200 ")  # the POST's answer, whole
    assert answers.count(b"HTTP/1.1 200 ") == 1 and b"HTTP/1.1 431 " in answers  # then the refusal, last
    assert answers.index(b"HTTP/1.1 431 ") > answers.index(b"HTTP/1.1 200 ")
    # Two requests queued ahead of the refused head: both are answered, in order, and then the refusal.
    reader, writer = await asyncio.open_connection(host, int(port))
    queued = b"".join(b"GET /q/%d HTTP/1.1\r\nHost: localhost\r\n\r\n" % i for i in range(2))
    writer.write(queued + big.replace(b"GET /x", b"GET /q/big") + b"\r\n")
    answers = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", answers)  # each answer's status line (bodies hold none)
    assert statuses == [b"200", b"200", b"431"]


@pytest.mark.parametrize("length", [b"5 ", b"5\t"])
async def test_a_content_length_with_trailing_whitespace_gets_a_400_not_a_traceback(
    stack: Stack, sidecar: RunningSidecar, length: bytes, caplog: pytest.LogCaptureFixture
):
    before = stack.emulator.apigw.requests
    request = (
        b"POST /up HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: " + length + b"\r\n\r\nhello"
    )
    status, headers, body = await raw_request(sidecar.url, request)
    assert (status, headers["x-sidecar-error"]) == (400, ["bad_request"])
    # The sidecar's own 400: its Content-Length check, or (older httptools) the parser's.
    assert b"plain digits" in body or b"not valid HTTP/1.1" in body
    assert stack.emulator.apigw.requests == before
    assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records)


async def test_whitespace_padding_counts_toward_the_head_limit(stack: Stack, sidecar: RunningSidecar):
    before = stack.emulator.apigw.requests
    padded = b"GET /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nX-Pad: " + b" " * 20_000 + b"v\r\n\r\n"
    status, headers, _ = await raw_request(sidecar.url, padded)
    assert (status, headers["x-sidecar-error"]) == (431, ["headers_too_large"])
    # The same padding over two reads: the first part alone is past the limit.
    host, port = sidecar.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(padded[: len(padded) - 10])
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert stack.emulator.apigw.requests == before


async def test_bodies_over_the_limit_get_413_before_anything_is_sent(stack: Stack, client: httpx2.AsyncClient):
    async with run_sidecar(stack.settings(max_body_bytes=100_000)) as sidecar:
        before = stack.emulator.apigw.requests
        response = await client.post(f"{sidecar.url}/up", content=b"x" * 100_001)
        assert (response.status_code, _error(response)) == (413, "body_too_large")
        assert stack.emulator.apigw.requests == before

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(40):
                yield b"y" * 8192

        response = await client.post(f"{sidecar.url}/up", content=chunks())
        assert (response.status_code, _error(response)) == (413, "body_too_large")
        # The upstream request was started (chunked bodies stream) and then aborted, never completed.
        assert stack.emulator.apigw.authorized == 0 or stack.emulator.apigw.cut_off == 1
        ok = await client.post(f"{sidecar.url}/up", content=b"z" * 100_000)
        assert ok.status_code == 200 and ok.json()["body_bytes"] == 100_000


async def _open(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def test_slow_heads_and_stalled_bodies_are_cut_off(stack: Stack):
    async with run_sidecar(stack.settings(read_timeout=0.5)) as sidecar:
        sidecar.parts.limits.head_timeout = 0.3
        # A slowloris: the head never completes.
        reader, writer = await _open(sidecar.url)
        writer.write(b"GET /x HTTP/1.1\r\nHost: localhost\r\nX-1: a\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
        # A connection that never says anything is closed without a word.
        reader, writer = await _open(sidecar.url)
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        # A body that stops arriving.
        reader, writer = await _open(sidecar.url)
        writer.write(b"POST /x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n0123456789")
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout" in answer


async def test_connections_over_max_clients_are_refused_at_once(stack: Stack, client: httpx2.AsyncClient):
    async with run_sidecar(stack.settings(max_clients=3)) as sidecar:
        held = [await _open(sidecar.url) for _ in range(3)]
        reader, writer = await _open(sidecar.url)
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 503") and b"too_many_clients" in answer
        for _, held_writer in held:
            held_writer.close()
            await held_writer.wait_closed()
        # Capacity comes back as soon as connections go.
        for _ in range(50):
            response = await client.get(f"{sidecar.url}/-/metrics")
            if response.status_code == 200:
                break
        assert 'sidecar_errors_total{code="too_many_clients"} 1.0' in response.text


async def test_slow_uploads_cannot_take_the_whole_upstream_pool(stack: Stack, client: httpx2.AsyncClient):
    # Two upstream connections: one slot for streamed uploads, one always free for the rest.
    async with run_sidecar(stack.settings(max_connections=2, pool_timeout=0.3)) as sidecar:
        release = asyncio.Event()

        async def slow() -> AsyncIterator[bytes]:
            yield b"a" * 10
            await release.wait()
            yield b"b" * 10

        first = asyncio.create_task(client.post(f"{sidecar.url}/up", content=slow()))
        await asyncio.wait_for(stack.emulator.apigw.seen.wait(), 10)  # the upload holds its slot

        async def quick() -> AsyncIterator[bytes]:
            yield b"c" * 10

        response = await client.post(f"{sidecar.url}/up", content=quick())
        assert (response.status_code, _error(response)) == (503, "too_many_uploads")
        assert (await client.get(f"{sidecar.url}/x")).status_code == 200
        release.set()
        assert (await first).json()["body_bytes"] == 20


async def test_dot_segments_never_cross_routes(stack: Stack, client: httpx2.AsyncClient, tmp_path: Path):
    base = stack.settings()
    common = {
        "token_url": base.token_url,
        "client_id": base.client_id,
        "client_secret": base.client_secret,
        "refresh_token": base.refresh_token,
    }
    routes = (
        RouteSettings(prefix="/b", upstream_url=f"{stack.api_url}/prod/stageB", **common),
        RouteSettings(prefix="/a", upstream_url=f"{stack.api_url}/prod/stageA", **common),
    )
    async with run_sidecar(stack.settings(upstream_url=None, routes=routes)) as sidecar:
        for target in (b"/b/../../stageA/admin", b"/b/../a/admin", b"/b/%2e%2e/a/admin", b"/b/.%2E/x", b"/.."):
            status, headers, body = await raw_request(
                sidecar.url, b"GET " + target + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            )
            assert (status, headers["x-sidecar-error"]) == (400, ["bad_request"]), (target, body)
        status, _, body = await raw_request(
            sidecar.url, b"GET /b/x/./y/../z HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        assert status == 200
        assert json.loads(body)["raw_path"] == "/prod/stageB/x/z"


async def test_forwarding_headers_and_trailers_from_the_client_are_not_forwarded(stack: Stack, sidecar: RunningSidecar):
    status, _, body = await raw_request(
        sidecar.url,
        b"POST /x HTTP/1.1\r\nHost: localhost\r\nForwarded: for=1.2.3.4;host=evil\r\nX-Real-IP: 1.2.3.4\r\n"
        b"Transfer-Encoding: chunked\r\nTrailer: X-Injected\r\nConnection: close\r\n\r\n"
        b"5\r\nhello\r\n0\r\nX-Injected: yes\r\nAuthorization: stolen\r\n\r\n",
    )
    assert status == 200, body
    names = [name for name, _ in json.loads(body)["headers"]]
    for name in ("forwarded", "x-real-ip", "x-injected", "trailer"):
        assert name not in names
    assert names.count("authorization") == 1
    assert "x-forwarded-for" in names


async def test_a_unix_socket_listener_with_file_permissions(stack: Stack, tmp_path: Path):
    path = str(tmp_path / "sidecar.sock")
    app = create_app(stack.settings(listen=f"unix:{path}"), policy=FAST_POLICY)
    sock = bind_unix(path, 0o660)
    async with running(app, sock=sock, limits=app.sidecar.limits) as url:
        assert url == f"unix:{path}"
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        transport = httpx2.AsyncHTTPTransport(uds=path)
        async with httpx2.AsyncClient(transport=transport, trust_env=False, timeout=30) as client:
            response = await client.get("http://localhost/x")
            assert response.status_code == 200
            refused = await client.get("http://localhost/x", headers={"Host": "evil.example"})
            assert refused.status_code == 421
    _stale_sockets_are_replaced_and_nothing_else(path)


def _stale_sockets_are_replaced_and_nothing_else(path: str) -> None:
    # The socket file left behind (as by a killed sidecar) is replaced; anything else at the path is not touched.
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    bind_unix(path, 0o600).close()
    Path(path).unlink()
    Path(path).write_text("not a socket")
    with pytest.raises(OSError, match="cannot listen"):
        bind_unix(path, 0o600)


async def _crlf_token_endpoint(request: Request) -> JSONResponse:
    return JSONResponse({"id_token": "aaa.bbb.ccc\r\nX-Injected: yes", "token_type": "Bearer", "expires_in": 3600})


async def test_a_token_with_line_breaks_is_refused_never_sent(
    stack: Stack, client: httpx2.AsyncClient, caplog: pytest.LogCaptureFixture
):
    endpoint = Starlette(routes=[Route("/oauth2/token", _crlf_token_endpoint, methods=["POST"])])
    async with running(endpoint) as url, run_sidecar(stack.settings(token_url=f"{url}/oauth2/token")) as sidecar:
        for _ in range(3):
            response = await client.get(f"{sidecar.url}/x")
            assert (response.status_code, _error(response)) == (503, "token_unusable")
            assert "not a JWT" in response.json()["detail"]
    assert stack.emulator.apigw.requests == 0
    assert "Traceback" not in caplog.text


async def test_no_core_file_or_same_user_process_can_read_the_secrets(stack: Stack):
    env = stack_env(stack, SIDECAR_REFRESH_TOKEN=stack.emulator.refresh_token)
    async with sidecar_process(env) as sidecar:
        limits = await asyncio.to_thread(Path(f"/proc/{sidecar.process.pid}/limits").read_text)
        await sidecar.stop()
    core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"], core
    # PR_GET_DUMPABLE (3) in a process that ran the same start-up step: 0, so /proc/PID/mem and ptrace are closed
    # to other processes of the same user, and the kernel writes no core.
    probe = (
        "import ctypes; from proxy.secrets import keep_out_of_core_dumps; keep_out_of_core_dumps(); "
        "print(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))"
    )
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", probe, stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert (process.returncode, out.strip()) == (0, b"0")


async def _answer_then_eof(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything the sidecar sends until it closes the connection; fails if it is still open after ``seconds``."""
    return await asyncio.wait_for(reader.read(), seconds)


@pytest.mark.parametrize(
    ("extra", "settings", "code"),
    [
        (b"Host: rebind.attacker.example\r\n", {}, b"host_not_allowed"),
        (b"Host: localhost\r\nOrigin: https://evil.example\r\n", {}, b"origin_not_allowed"),
        (b"Host: localhost\r\n", {"caller_token": SecretStr("caller-secret-1")}, b"caller_unauthenticated"),
    ],
)
async def test_every_refusal_of_the_caller_closes_its_connection(
    stack: Stack, extra: bytes, settings: dict[str, object], code: bytes
):
    async with run_sidecar(stack.settings(**settings)) as sidecar:
        host, port = sidecar.url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /x HTTP/1.1\r\n" + extra + b"\r\n")  # keep-alive: the client would hold the slot
        answer = await _answer_then_eof(reader, 5)
        writer.close()
    assert code in answer and b"connection: close" in answer.lower()


async def test_bytes_that_start_no_request_do_not_keep_an_idle_connection_open(stack: Stack):
    app = create_app(stack.settings(), policy=FAST_POLICY)
    app.sidecar.limits.keep_alive_timeout = 1
    async with running(app, limits=app.sidecar.limits) as url:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = int(
            next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")).split(b":")[1]
        )
        await reader.readexactly(length)
        writer.write(b"\r\n")  # starts no message, and used to cancel the keep-alive timer for good
        assert await _answer_then_eof(reader, 5) == b""
        writer.close()


async def test_peers_outside_allow_from_are_refused_before_they_cost_a_client_slot(
    stack: Stack, client: httpx2.AsyncClient
):
    # Dual-stack: 127.0.0.1 arrives as ::ffff:127.0.0.1 (IPv4, refused), ::1 is allowed.
    settings = stack.settings(listen="[::]:8080", allow_from="::1/128", max_clients=3)
    async with run_sidecar(settings, host="::") as sidecar:
        port = int(sidecar.url.rsplit(":", 1)[1])
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(10)]  # connect, never send or read
        response = await client.get(f"http://[::1]:{port}/x")
        assert response.status_code == 200
        refused = await _answer_then_eof(held[0][0], 5)
        assert b"403" in refused.split(b"\r\n")[0] and b"client_not_allowed" in refused
        for _, writer in held:
            writer.close()


async def test_a_flood_of_pipelined_requests_is_bounded_per_connection(stack: Stack, sidecar: RunningSidecar):
    host, port = sidecar.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    flood = b"GET /-/healthz HTTP/1.1\r\nHost: localhost\r\n\r\n" * 5000  # about 225 KiB in one write
    writer.write(flood)
    data = await _answer_then_eof(reader, 30)
    writer.close()
    answers = data.count(b"HTTP/1.1 200 ")
    assert answers == MAX_PIPELINED + 1  # the one in flight, and the queued ones; then the connection closed
    last_head = data[data.rindex(b"HTTP/1.1 200 ") :].split(b"\r\n\r\n")[0].lower()
    assert b"connection: close" in last_head
    # Others are served meanwhile, and the refusal is counted.
    async with httpx2.AsyncClient(trust_env=False, timeout=10) as client:
        assert (await client.get(f"{sidecar.url}/x")).status_code == 200
        metrics = (await client.get(f"{sidecar.url}/-/metrics")).text
    assert 'sidecar_errors_total{code="too_many_pipelined"} 1.0' in metrics


async def test_a_trickled_upload_is_cut_off_below_the_minimum_rate(stack: Stack):
    # The read timeout is 1 s: a byte every 0.25 s never stalls, but averages far below 1 KiB/s after it.
    async with run_sidecar(stack.settings(read_timeout=1.0)) as sidecar:
        host, port = sidecar.url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /up HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n")
        answer = asyncio.create_task(reader.read())
        with contextlib.suppress(ConnectionError):
            for _ in range(40):  # 10 s of trickling, if nothing cuts it off
                if answer.done():
                    break
                writer.write(b"1\r\na\r\n")
                await writer.drain()
                await asyncio.sleep(0.25)
        data = await asyncio.wait_for(answer, 10)
        writer.close()
    assert data.startswith(b"HTTP/1.1 408 ") and b"body_too_slow" in data
