"""A raw-socket fuzz of the listener: 1,200 generated malformed requests (seeded, so a failure repeats).

Each must get a 4xx or a closed connection; the sidecar must keep serving; and nothing ambiguous may reach
the upstream: no fuzz request arrives there whole. (A chunked request whose body turns out malformed may
have started upstream, depending on when the client library sends the head; it is then aborted, and the
upstream discards it.)
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable

import httpx2

from tests.conftest import RunningSidecar, Stack

CASES = 1200
CONCURRENCY = 50
SEED = 11

Mutation = Callable[[random.Random], bytes]


def _head(rng: random.Random, method: bytes = b"GET", target: bytes = b"/x", extra: bytes = b"") -> bytes:
    noise = b"".join(b"X-N%d: %d\r\n" % (i, rng.randrange(10**6)) for i in range(rng.randrange(4)))
    return method + b" " + target + b" HTTP/1.1\r\nHost: localhost\r\n" + noise + extra


MUTATIONS: dict[str, Mutation] = {
    "cl_and_te": lambda r: (
        _head(r, b"POST", extra=b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n") + b"0\r\n\r\n"
    ),
    "double_cl": lambda r: (
        _head(r, b"POST", extra=b"Content-Length: %d\r\nContent-Length: %d\r\n\r\nabcdef")
        % (r.randrange(1, 3), r.randrange(4, 6))
    ),
    "bad_cl": lambda r: (
        _head(r, b"POST", extra=b"Content-Length: " + r.choice([b"-1", b"1,1", b"0x10", b"+5", b"1 2"]))
        + b"\r\n\r\nabcd"
    ),
    "obs_fold": lambda r: _head(r, extra=b"X-Folded: a\r\n " + b"b" * r.randrange(1, 20) + b"\r\n\r\n"),
    "bare_lf": lambda r: _head(r).replace(b"\r\n", b"\n") + b"\n",
    "bad_chunk_size": lambda r: (
        _head(r, b"POST", extra=b"Transfer-Encoding: chunked\r\n\r\n")
        + r.choice([b"zz\r\nab\r\n0\r\n\r\n", b"fffffffffffffffffffff\r\n", b"5\r\nabcdefgh\r\n0\r\n\r\n", b"-1\r\n"])
    ),
    "te_not_chunked": lambda r: (
        _head(
            r,
            b"POST",
            extra=b"Transfer-Encoding: " + r.choice([b"xchunked", b"chunked, identity", b"gzip"]) + b"\r\n\r\n",
        )
        + b"0\r\n\r\n"
    ),
    "space_before_colon": lambda r: _head(r, extra=b"Content-Length : 0\r\n\r\n"),
    "nul_in_header": lambda r: _head(r, extra=b"X-A: a\x00b\r\n\r\n"),
    "cr_in_header": lambda r: _head(r, extra=b"X-A: a\rb\r\n\r\n"),
    "bad_method": lambda r: _head(r, r.choice([b"G@T", b"GE T", b"\x01GET", b"get\x7f"])) + b"\r\n",
    "control_in_target": lambda r: _head(r, target=b"/a" + bytes([r.choice([0, 1, 9, 11, 127])]) + b"b") + b"\r\n",
    "bad_version": lambda r: (
        _head(r).replace(b"HTTP/1.1", r.choice([b"HTTP/1.x", b"HTTP/11", b"HTTQ/1.1", b"HTTP/"])) + b"\r\n"
    ),
    "http2_preface": lambda r: b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(r.randrange(256) for _ in range(9)),
    "h2c_upgrade": lambda r: _head(
        r,
        extra=b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAA\r\n\r\n",
    ),
    "websocket": lambda r: _head(
        r, extra=b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    ),
    "huge_header": lambda r: _head(r, extra=b"X-Big: " + b"a" * r.randrange(17_000, 40_000) + b"\r\n\r\n"),
    "many_headers": lambda r: (
        _head(r, extra=b"".join(b"X-%d: v\r\n" % i for i in range(r.randrange(2500, 4000)))) + b"\r\n"
    ),
    "rebinding_host": lambda r: (
        b"GET /x HTTP/1.1\r\nHost: " + r.choice([b"a.example", b"x.localhost", b"1.2.3.4.nip.io"]) + b"\r\n\r\n"
    ),
    "cross_site": lambda r: _head(r, extra=b"Sec-Fetch-Site: cross-site\r\n\r\n"),
    "foreign_origin": lambda r: _head(r, extra=b"Origin: http://evil%d.example\r\n\r\n" % r.randrange(100)),
    "trace_connect": lambda r: r.choice(
        [_head(r, b"TRACE") + b"\r\n", b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n"]
    ),
    "dot_segments": lambda r: (
        _head(r, target=r.choice([b"/..", b"/a/../..", b"/%2e%2e/x", b"/a/.%2E/b", b"/%2E"])) + b"\r\n"
    ),
    "injected_byte": lambda r: _inject(r),
    "ows_content_length": lambda r: _head(
        r, b"POST", extra=b"Content-Length: 4" + r.choice([b" ", b"\t", b"  "]) + b"\r\n\r\nabcd"
    ),
    "ambiguous_dot": lambda r: (
        _head(
            r, target=r.choice([b"/a/..;/b", b"/..%2fx", b"/a/..%5cb", b"/%252e%252e/x", b"/%c0%ae%c0%ae/x", b"/a%00"])
        )
        + b"\r\n"
    ),
    "padded_head": lambda r: _head(r, extra=b"X-Pad: " + b" \t" * r.randrange(9_000, 20_000) + b"v\r\n\r\n"),
    "pipelined_refusals": lambda r: (_head(r, target=b"/..") + b"\r\n") * r.randrange(20, 200),
    "blank_lines_only": lambda r: b"\r\n" * r.randrange(1, 2000),
}


def _inject(rng: random.Random) -> bytes:
    """A valid head with a NUL or a lone CR put somewhere inside its request line or a header."""
    head = _head(rng)
    position = rng.randrange(1, len(head) - 2)
    return head[:position] + rng.choice([b"\x00", b"\r"]) + head[position:] + b"\r\n"


async def _send(url: str, data: bytes) -> bytes:
    """Send ``data``; what comes back up to the end of the first response head, or b"" if the sidecar closes.
    (No half-close: uvicorn ends a connection at end-of-stream, which would hide the answers.)"""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    answer = b""
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(15):  # an unfinished head is answered within the 1 s head timeout
            while b"\r\n\r\n" not in answer and (chunk := await reader.read(65536)):
                answer += chunk
    except ConnectionError:
        pass
    finally:
        writer.close()
    return answer


async def test_malformed_requests_get_4xx_or_a_closed_connection(
    stack: Stack, sidecar: RunningSidecar, client: httpx2.AsyncClient
):
    sidecar.parts.limits.head_timeout = 1.0  # a request that never completes ends within a second, not ten
    rng = random.Random(SEED)
    names = list(MUTATIONS)
    cases = [(name, MUTATIONS[name](rng)) for name in (names[i % len(names)] for i in range(CASES))]
    apigw = stack.emulator.apigw
    before = apigw.completed
    limit = asyncio.Semaphore(CONCURRENCY)
    outcomes: Counter[str] = Counter()
    bad: list[tuple[str, bytes, bytes]] = []

    async def one(name: str, data: bytes) -> None:
        async with limit:
            answer = await _send(sidecar.url, data)
        status = answer[9:12] if answer.startswith(b"HTTP/1.1 ") else b""
        if answer and not (status.startswith(b"4") and status != b"4"):
            bad.append((name, data[:80], answer[:80]))
        outcomes[status.decode() or "closed"] += 1

    await asyncio.gather(*(one(name, data) for name, data in cases))
    assert not bad, bad[:5]
    assert outcomes["closed"] < CASES // 10, outcomes  # nearly every refusal is an answer that says why
    assert sum(outcomes.values()) == CASES
    assert apigw.completed == before  # nothing from the fuzz reached the upstream whole
    # Still serving, and every refusal was counted.
    assert (await client.get(f"{sidecar.url}/after")).status_code == 200
    assert "sidecar_errors_total" in (await client.get(f"{sidecar.url}/-/metrics")).text
