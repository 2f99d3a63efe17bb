"""uvicorn's httptools protocol, with the writes of one event-loop step sent in a single system call.

uvicorn writes a response head as soon as the app sends ``http.response.start`` and every body chunk as
it comes; uvloop sends each write at once. A small proxied answer therefore cost two ``send`` calls on
the client socket (head, then body), and on loopback each ``send`` also runs the receiver's TCP work.
``CoalescingTransport`` keeps the writes made during one step of the event loop and hands them to the
real transport together at the start of the next one, so head and body leave in one ``writev``.

Order is kept (the held writes always go first), nothing is held past the current step, and ``close``
sends what is held before closing. Flow control is unchanged: the real transport still pauses the
protocol when its buffer fills, and at most one step's writes are ever held here.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CoalescingTransport:
    """Wraps an ``asyncio.Transport``: ``write`` calls within one loop step become one ``writelines``."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is None:
            self._held = [data]
            self._loop.call_soon(self.flush)
        else:
            held.append(data)

    def flush(self) -> None:
        held = self._held
        if held is None:
            return
        self._held = None
        if len(held) == 1:
            self._transport.write(held[0])
        else:
            self._transport.writelines(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.flush()
        self._transport.set_protocol(protocol)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_write_buffer_size(self) -> int:
        held = self._held
        return self._transport.get_write_buffer_size() + (sum(map(len, held)) if held else 0)

    def __getattr__(self, name: str) -> Any:
        # pause_reading, resume_reading, get_extra_info, ...: the real transport's own.
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol writing through a ``CoalescingTransport`` (``uvicorn.Config(http=...)``)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]


__all__ = ["CoalescingHttpToolsProtocol", "CoalescingTransport"]
