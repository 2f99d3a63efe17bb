"""The coalescing transport: a response's head and body leave in one system call, in order.

These run on uvloop, as the sidecar does: uvloop writes sockets with write(2)/writev(2), which Linux counts
in ``/proc/self/io``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from proxy.server.coalesce import CoalescingTransport


def write_syscalls() -> int:
    """This process's write system calls so far (Linux ``/proc/self/io``)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("syscw:"):
            return int(line.split()[1])
    raise AssertionError("no syscw in /proc/self/io")


class Peer:
    """A real TCP server on an ephemeral loopback port that keeps everything one connection sends."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.closed = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            self.received += data
        self.closed.set()
        writer.close()


@contextlib.asynccontextmanager
async def connected(open_connections: int = 1) -> AsyncIterator[tuple[CoalescingTransport, Peer]]:
    peer = Peer()
    server = await asyncio.start_server(peer.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
    try:
        yield CoalescingTransport(transport, loop, range(open_connections)), peer
    finally:
        transport.close()
        server.close()
        await server.wait_closed()


def run_on_uvloop(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


def on_uvloop(check: Callable[[CoalescingTransport, Peer], Awaitable[None]], open_connections: int = 1) -> None:
    async def main() -> None:
        async with connected(open_connections) as (transport, peer):
            await check(transport, peer)

    run_on_uvloop(main)


def test_a_head_waits_for_its_body_and_both_leave_in_one_system_call() -> None:
    on_uvloop(_one_system_call)


async def _one_system_call(transport: CoalescingTransport, peer: Peer) -> None:
    before = write_syscalls()
    transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\n")
    assert write_syscalls() == before  # held for the body
    assert transport.get_write_buffer_size() == 38  # and counted as buffered meanwhile
    transport.write(b"body")
    assert write_syscalls() == before + 1  # both at once, no waiting for the step to end
    transport.write(b"more")
    transport.write(b"tail")
    assert write_syscalls() == before + 2
    transport.write(b"!")
    transport.close()  # what is held goes out before the close
    await asyncio.wait_for(peer.closed.wait(), 10)
    assert bytes(peer.received) == b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nbodymoretail!"


def test_with_other_clients_connected_a_step_s_writes_leave_together_when_it_ends() -> None:
    on_uvloop(_batched, open_connections=32)


async def _batched(transport: CoalescingTransport, peer: Peer) -> None:
    before = write_syscalls()
    for part in (b"head ", b"body ", b"next head ", b"next body"):
        transport.write(part)
    assert write_syscalls() == before
    assert transport.get_write_buffer_size() == 29
    await asyncio.sleep(0)  # one loop step: the flush was scheduled for its end
    assert write_syscalls() == before + 1
    transport.close()
    await asyncio.wait_for(peer.closed.wait(), 10)
    assert bytes(peer.received) == b"head body next head next body"


def test_held_writes_go_out_when_the_step_ends() -> None:
    on_uvloop(_flushed_when_the_step_ends)


async def _flushed_when_the_step_ends(transport: CoalescingTransport, peer: Peer) -> None:
    transport.write(b"a head whose body is not in hand yet")
    await asyncio.sleep(0)  # one loop step, not a wait for readiness: the flush was scheduled for it
    assert transport.get_write_buffer_size() == 0
    transport.close()
    await asyncio.wait_for(peer.closed.wait(), 10)
    assert bytes(peer.received) == b"a head whose body is not in hand yet"


def test_abort_drops_what_is_held() -> None:
    on_uvloop(_abort_drops)


async def _abort_drops(transport: CoalescingTransport, peer: Peer) -> None:
    transport.write(b"sent")
    transport.flush()
    transport.write(b"never sent")
    transport.abort()
    await asyncio.wait_for(peer.closed.wait(), 10)
    assert bytes(peer.received) == b"sent"


class Client(asyncio.Protocol):
    def __init__(self) -> None:
        self.lost = asyncio.Event()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()


def test_what_is_held_for_a_client_that_left_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
        loop = asyncio.get_running_loop()
        client = Client()
        transport, _ = await loop.create_connection(lambda: client, "127.0.0.1", server.sockets[0].getsockname()[1])
        try:
            await asyncio.wait_for(client.lost.wait(), 10)
            wrapped = CoalescingTransport(transport, loop)
            for _ in range(10):  # uvloop warns "socket.send() raised exception." from the 6th lost write on
                wrapped.write(b"an answer nobody will read")
                wrapped.flush()
            assert wrapped.get_write_buffer_size() == 0
        finally:
            transport.close()
            server.close()
            await server.wait_closed()

    run_on_uvloop(main)
    assert "raised exception" not in caplog.text
